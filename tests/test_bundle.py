"""Installing a run as a diagnose model keeps its provenance (synthetic vs real) and never half-installs."""
import json

import pytest
import torch

from pneumoct.errors import PneumoctInputError
from pneumoct.learned import load_bundled_models
from pneumoct.models import build_model
from pneumoct.train.bundle import install_run, main
from pneumoct.train.checkpoint import save_checkpoint


def _fake_run(root, sources):
    kwargs = {"num_classes": 4}
    save_checkpoint(root / "best", build_model("m3lung_patient_cpu", **kwargs), "m3lung_patient_cpu", kwargs,
                    {"family": "m3lung_patient", "data": {"sources": sources, "synthetic": False}})
    (root / "metrics.json").write_text(json.dumps({"best": {"epoch": 3, "val_acc": 0.75}}))
    (root / "model_card.md").write_text("# card\n")
    return root


@pytest.mark.parametrize("sources,kind", [(["phantom"], "synthetic"), (["covid-ct-md", "lung-crop:medseg"], "real"),
                                          (["covid19-ct-seg-png", "medseg", "phantom"], "real+synthetic")])
def test_install_records_provenance(tmp_path, sources, kind):
    torch.manual_seed(0)
    run = _fake_run(tmp_path / "run", sources)
    dest = install_run(run, "m3lung_patient", tmp_path / "w")
    assert (dest / "model_card.md").exists() and not (tmp_path / "w" / "m3lung_patient.partial").exists()
    model = load_bundled_models(tmp_path / "w")["m3lung_patient"]
    assert model.meta["data_kind"] == kind
    assert model.backend == "onnxruntime"  # installed with its ONNX export: diagnose runs it without PyTorch
    assert model.meta["validation_summary"]["val_acc"] == 0.75
    if kind == "real":
        assert model.meta["trained_on"].endswith("covid-ct-md, medseg")
    if kind == "real+synthetic":  # a mixed run names both, never "synthetic only" nor "real" alone
        assert model.meta["trained_on"] == ("real public CT: covid19-ct-seg-png, medseg + synthetic phantoms "
                                            "(pneumoct.synth)")


def test_install_refuses_unfinished_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(PneumoctInputError):
        install_run(tmp_path / "run", "m3lung_slice", tmp_path / "w")
    assert main([str(tmp_path / "run"), "--as", "m3lung_slice", "--weights", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w" / "m3lung_slice").exists()


def test_model_card_banner_says_synthetic_mixed_or_nothing():
    from pneumoct.train.run import MIXED_LINE, SYNTHETIC_LINE, synthetic_banner

    assert synthetic_banner(["phantom"]) == SYNTHETIC_LINE
    assert synthetic_banner(["covid19-ct-seg-png", "medseg", "phantom"]) == MIXED_LINE  # never "synthetic only"
    assert synthetic_banner(["covid-ct-md", "lung-crop:medseg"]) is None
