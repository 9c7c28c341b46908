"""`diagnose --model NAME` (issue 12) for any registered 3D system, with a tiny fake system registered by
monkeypatching ``pneumoct.volumetric.SYSTEMS``: maps as NIfTI in the study's geometry, a research panel in the
report, ``models.volumetric`` in result.json, the headline unchanged, stale maps removed, ``--lesions NAME``."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk

from pneumoct import cli, volumetric
from pneumoct.errors import PneumoctInputError
from pneumoct.io.writers import write_volume
from pneumoct.pipeline import DiagnoseOptions, diagnose
from pneumoct.volumetric import VolumetricOutput

from toy import toy_chest


def _fake_analyse(study, lung_labels, weights_dir=None):
    """Research 'model': lesion probability 0.9 on five mid slices of the lungs, an evidence ramp left-right."""
    shape = study.hu.shape
    lung = lung_labels > 0
    seg = np.where(lung, 0.2, 0.0).astype(np.float32)
    z = shape[0] // 2
    seg[z - 2:z + 3][lung[z - 2:z + 3]] = 0.9
    ramp = np.linspace(0.0, 1.0, shape[2], dtype=np.float32)[None, None, :]
    ev = (ramp * lung).astype(np.float32)
    return VolumetricOutput(system="fake", class_names=("healthy", "covid19"),
                            probabilities={"healthy": 0.1, "covid19": 0.9},
                            maps={"segmentation": seg, "evidence": ev}, lesion_mask=(seg >= 0.5).astype(np.uint8),
                            info={"trained_on": "nothing (a test double)", "timing_s": {"network": 0.01}})


@pytest.fixture
def fake_system(monkeypatch):
    mod = types.ModuleType("pneumoct_fake_system")
    mod.analyse = _fake_analyse
    monkeypatch.setitem(sys.modules, "pneumoct_fake_system", mod)
    monkeypatch.setitem(volumetric.SYSTEMS, "fake", "pneumoct_fake_system:analyse")
    return mod


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    study, _, _ = toy_chest(nz=32, n=96)
    path = tmp_path_factory.mktemp("toy3d") / "toy.nii.gz"
    write_volume(path, study.hu, study)
    return path


def _headline(res):
    p = res["patient"]
    return p["label"], p["abnormal_probability"], p["probabilities"], p["headline"]


def test_model_option_writes_maps_panel_and_result(fake_system, toy_path, tmp_path):
    plain = diagnose(toy_path, tmp_path / "plain", DiagnoseOptions(use_learned_models=False))
    out = tmp_path / "with"
    res = diagnose(toy_path, out, DiagnoseOptions(use_learned_models=False, model="fake"))
    assert _headline(res) == _headline(plain)  # never the headline
    assert res["quantification"] == plain["quantification"]  # its mask is not used without --lesions
    vol = res["models"]["volumetric"]
    assert vol["system"] == "fake" and vol["research_only"] is True and vol["label"] == "covid19"
    assert vol["probabilities"] == {"healthy": 0.1, "covid19": 0.9} and vol["trained_on"] == "nothing (a test double)"
    assert vol["maps"] == {"segmentation": "fake_segmentation.nii.gz", "evidence": "fake_evidence.nii.gz"}
    assert "volumetric" in res["timing_s"] and "fake" in res["data_note"]
    notes = [c for c in res["patient"]["consistency"] if c["code"] == "volumetric_disagrees"]
    assert bool(notes) == (res["patient"]["label"] != "covid19")
    # maps in the study's geometry, beside the other masks, listed in the outputs
    ref = sitk.ReadImage(str(out / "lesion_mask.nii.gz"))
    for name in ("fake_segmentation.nii.gz", "fake_evidence.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
        assert np.allclose(img.GetOrigin(), ref.GetOrigin()) and np.allclose(img.GetDirection(), ref.GetDirection())
        assert name in res["outputs"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fake_segmentation.nii.gz")))
    assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 20, 90}
    html = (out / "report.html").read_text()
    assert 'id="volumetric"' in html and 'alt="fake map slice' in html and "Research only" in html
    assert json.loads((out / "result.json").read_text())["models"]["volumetric"]["system"] == "fake"
    # a rerun without the 3D model leaves none of its maps behind; a user's file is never touched
    (out / "fake_notes.txt").write_text("mine")
    again = diagnose(toy_path, out, DiagnoseOptions(use_learned_models=False, write_report=False))
    assert not list(out.glob("fake_*.nii.gz")) and "volumetric" not in again["models"]
    assert (out / "fake_notes.txt").read_text() == "mine"


def test_lesions_option_uses_the_3d_mask(fake_system, toy_path, tmp_path):
    res = diagnose(toy_path, tmp_path, DiagnoseOptions(use_learned_models=False, lesions="fake",
                                                       write_report=False))
    assert res["segmentation"]["method"].startswith("3d:fake")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lesion_mask.nii.gz")))
    expect = _fake_analyse(types.SimpleNamespace(hu=np.zeros(mask.shape)),
                           sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lung_mask.nii.gz"))))
    assert np.array_equal(mask > 0, expect.lesion_mask > 0)
    assert res["models"]["volumetric"]["system"] == "fake"
    with pytest.raises(PneumoctInputError, match="--lesions fake"):
        diagnose(toy_path, tmp_path, DiagnoseOptions(use_learned_models=False, lesions="fake", model="deepsc"))


def test_unknown_model_is_refused(toy_path, tmp_path):
    with pytest.raises(PneumoctInputError, match="unknown 3D model"):
        diagnose(toy_path, tmp_path, DiagnoseOptions(use_learned_models=False, model="nope"))


def test_cli_model_flag(fake_system, toy_path, tmp_path, capsys):
    rc = cli.main(["diagnose", str(toy_path), "--out", str(tmp_path), "--no-models", "--no-report", "--model", "fake"])
    assert rc == 0 and (tmp_path / "fake_evidence.nii.gz").is_file()
    with pytest.raises(SystemExit):
        cli.main(["diagnose", str(toy_path), "--out", str(tmp_path), "--model", "nope"])


@pytest.mark.parametrize("probs,head,note", [
    ({"healthy": 0.2, "covid19": 0.8}, "covid19", False),
    ({"non_pneumonia": 0.7, "covid19": 0.2, "cap": 0.1}, "healthy", False),
    ({"non_pneumonia": 0.7, "covid19": 0.2, "cap": 0.1}, "cap", True),
    ({"non_covid": 0.9, "covid19": 0.1}, "covid19", True),
    ({"non_covid": 0.9, "covid19": 0.1}, "cap", False),
    ({"a": 0.9, "b": 0.1}, "cap", False),  # classes the headline does not speak of: no claim either way
])
def test_volumetric_consistency_rule(probs, head, note):
    from pneumoct.pipeline import volumetric_consistency

    vol = VolumetricOutput(system="x", class_names=tuple(probs), probabilities=probs)
    got = volumetric_consistency(vol, {"label": head})
    assert (got is not None) == note and (got is None or got["code"] == "volumetric_disagrees")


def test_run_system_hands_a_known_lesion_mask_only_to_systems_that_take_one(fake_system, monkeypatch):
    study, _, _ = toy_chest(nz=12, n=48)
    lungs = (study.hu < -500).astype(np.uint8)
    seen = {}

    def with_mask(study, lung_labels, weights_dir=None, *, lesion_mask=None):
        seen["mask"] = lesion_mask
        return _fake_analyse(study, lung_labels, weights_dir)

    fake_system.with_mask = with_mask
    monkeypatch.setitem(volumetric.SYSTEMS, "fake_mask", "pneumoct_fake_system:with_mask")
    given = np.zeros(study.hu.shape, np.uint8)
    volumetric.run_system("fake_mask", study, lungs, lesion_mask=given)
    assert seen["mask"] is given
    out = volumetric.run_system("fake", study, lungs, lesion_mask=given)  # no lesion_mask parameter: not passed
    assert out.system == "fake"
