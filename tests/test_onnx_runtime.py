"""ONNX Runtime path of the 2D segmenter (pneumoct.models.onnx_runtime): the export matches PyTorch, the loader
uses it only when current and intact, `segment` then never imports PyTorch, and the bundled export is current."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoct.io.writers import write_volume
from pneumoct.models.checkpoint import save_checkpoint
from pneumoct.models.onnx_runtime import ONNX_FILE, ONNX_INFO, export_onnx, load_onnx
from pneumoct.preprocess.resample import resize_bilinear
from pneumoct.segmentation import load_segmenter, segment_path
from toy import toy_chest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SRC = Path(__file__).resolve().parents[1] / "src"


def _random_segmenter(path: Path, num_classes: int = 3) -> Path:
    """A randomly initialised unet_cpu with non-trivial batch-norm statistics (a constant network would hide a
    wrong export)."""
    from pneumoct.models import build_model

    torch.manual_seed(1)
    model = build_model("unet_cpu", in_channels=1, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    meta = {"family": "segmentation", "num_classes": num_classes, "input_size": 64, "channels": 1,
            "window": [-600.0, 1500.0], "trained_on": "test", "data_kind": "random"}
    return save_checkpoint(path, model, "unet_cpu", {"in_channels": 1, "num_classes": num_classes}, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = _random_segmenter(tmp_path_factory.mktemp("onnx") / "ckpt")
    record = export_onnx(d)
    return d, record


def test_export_matches_pytorch_and_loader_prefers_it(exported, monkeypatch):
    d, record = exported
    assert (d / ONNX_FILE).is_file() and record["max_abs_diff_vs_torch"] < 1e-4
    x = np.random.default_rng(3).random((5, 64, 64), dtype=np.float32)
    monkeypatch.setenv("PNEUMOCT_BACKEND", "torch")
    ref = load_segmenter(d)
    assert ref.backend == "torch"
    monkeypatch.delenv("PNEUMOCT_BACKEND")
    fast = load_segmenter(d)
    assert fast.backend == "onnxruntime" and fast.model is None
    p_ref, p_fast = ref.probabilities(x), fast.probabilities(x)
    assert p_fast.shape == p_ref.shape == (5, 3, 64, 64)
    assert np.allclose(p_fast.sum(1), 1.0, atol=1e-5)  # softmax inside the graph
    assert np.abs(p_fast - p_ref).max() < 1e-4
    assert fast.provenance()["backend"] == "onnxruntime"


def test_stale_or_damaged_export_falls_back_to_pytorch(exported, tmp_path):
    d, _ = exported
    info = json.loads((d / "model.json").read_text())
    stale = dict(info, sha256="0" * 64)  # weights retrained since the export
    assert load_onnx(d, stale) is None
    assert load_onnx(d, info) is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in d.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    raw = bytearray((copy / ONNX_FILE).read_bytes())
    raw[-10] ^= 0xFF
    (copy / ONNX_FILE).write_bytes(bytes(raw))
    assert load_onnx(copy) is None
    assert load_segmenter(copy).backend == "torch"  # still works, from the safetensors weights
    assert json.loads((d / ONNX_INFO).read_text())["initializers_in_weights_file"] > 0  # no second weight copy
    assert (d / ONNX_FILE).stat().st_size < (d / "model.safetensors").stat().st_size / 4
    weights_copy = tmp_path / "weights_copy"
    weights_copy.mkdir()
    for f in d.iterdir():
        weights_copy.joinpath(f.name).write_bytes(f.read_bytes())
    raw = bytearray((weights_copy / "model.safetensors").read_bytes())
    raw[-4] ^= 0xFF  # the graph reads its weights from here: a damaged file is never run
    (weights_copy / "model.safetensors").write_bytes(bytes(raw))
    assert load_onnx(weights_copy) is None
    (copy / ONNX_INFO).unlink()
    assert load_segmenter(copy).backend == "torch"


def test_segment_command_runs_without_pytorch(exported, tmp_path):
    """The same `segment_path` the command runs, in a fresh interpreter: the mask equals PyTorch's and PyTorch is
    never imported."""
    d, _ = exported
    study, _, _ = toy_chest(nz=16, n=96)
    nii = tmp_path / "toy.nii.gz"
    write_volume(nii, study.hu, study)
    code = ("import sys, json; from pneumoct.segmentation import segment_path; "
            f"r = segment_path({str(nii)!r}, {str(tmp_path / 'ort')!r}, segmenter_path={str(d)!r}); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'backend': r['model']['backend']}))")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("PNEUMOCT_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "backend": "onnxruntime"}
    os.environ["PNEUMOCT_BACKEND"] = "torch"
    try:
        ref = segment_path(nii, tmp_path / "torch", segmenter_path=d)
    finally:
        del os.environ["PNEUMOCT_BACKEND"]
    assert ref["model"]["backend"] == "torch"
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ort" / "lesion_mask.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch" / "lesion_mask.nii.gz")))
    assert a.any() and (a != b).mean() < 1e-4  # float rounding may flip a voxel at the threshold, no more


def test_bundled_segmenter_export_is_current():
    """A retrained bundled segmenter must ship a fresh export (else `segment` silently falls back to PyTorch)."""
    d = SRC / "pneumoct" / "weights" / "lesion_seg"
    if not (d / "model.json").is_file():
        pytest.skip("no bundled segmenter")
    record = json.loads((d / ONNX_INFO).read_text())
    assert record["source_sha256"] == json.loads((d / "model.json").read_text())["sha256"]
    assert load_onnx(d) is not None


@pytest.mark.parametrize("src_hw,out_hw", [((128, 128), (300, 250)), ((128, 131), (60, 100)), ((7, 9), (7, 9)),
                                           ((64, 64), (511, 3)), ((5, 5), (1, 1))])
def test_resize_bilinear_matches_pytorch(src_hw, out_hw):
    m = np.random.default_rng(0).random((2,) + src_hw, dtype=np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None], size=out_hw, mode="bilinear",
                                          align_corners=False)[0].numpy()
    got = resize_bilinear(m, out_hw)
    assert got.shape == (2,) + out_hw and got.dtype == np.float32
    assert np.abs(got - ref).max() < 5e-5


def _save_random(root: Path, key: str, name: str, kwargs: dict, meta: dict) -> Path:
    from pneumoct.models import build_model

    torch.manual_seed(0)
    return save_checkpoint(root / key, build_model(name, **kwargs).eval(), name, kwargs, meta)


@pytest.fixture(scope="module")
def learned_weights(tmp_path_factory):
    """Random-weight stand-ins for diagnose's three 2D models, each exported."""
    root = tmp_path_factory.mktemp("learned")
    _save_random(root, "lesion_presence", "multiscale_cam_tiny",
                 {"num_classes": 2, "in_channels": 1, "input_norm": "local"},
                 {"family": "multiscale_cam", "input_size": 48, "channels": 1, "window": [-600.0, 1200.0]})
    _save_random(root, "m3lung_slice", "m3lung_slice_cpu", {"num_classes": 4, "in_channels": 1},
                 {"family": "m3lung_slice", "input_size": 64, "channels": 1})
    _save_random(root, "m3lung_patient", "m3lung_patient_cpu", {"num_classes": 4}, {"family": "m3lung_patient"})
    for key in ("lesion_presence", "m3lung_slice", "m3lung_patient"):
        assert export_onnx(root / key)["max_abs_diff_vs_torch"] < 1e-4
    return root


def test_learned_models_same_outputs_on_both_backends(learned_weights, monkeypatch):
    from pneumoct.learned import load_bundled_models, run_learned_models
    from pneumoct.preprocess.lung_mask import segment_lungs

    study, _, _ = toy_chest(nz=20, n=96)
    lungs = segment_lungs(study).labels
    area = np.linspace(0.0, 400.0, study.shape[0])
    fast = load_bundled_models(learned_weights)
    assert {m.backend for m in fast.values()} == {"onnxruntime"}
    monkeypatch.setenv("PNEUMOCT_BACKEND", "torch")
    ref_models = load_bundled_models(learned_weights)
    assert {m.backend for m in ref_models.values()} == {"torch"}
    a = run_learned_models(study.hu, lungs, fast, threshold_area_mm2=area, threads=1)
    b = run_learned_models(study.hu, lungs, ref_models, threshold_area_mm2=area)
    for name in ("lesion_probability", "lesion_probability_model", "slice_class_probabilities",
                 "slice_lesion_probability_m3lung", "patient_probabilities"):
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and x.shape == y.shape, name
        np.testing.assert_allclose(x, y, atol=1e-4, equal_nan=True, err_msg=name)
    assert a.cam_maps.keys() == b.cam_maps.keys() and a.prototype_maps.keys() == b.prototype_maps.keys()
    assert a.cam_maps and a.prototype_maps
    for z in a.cam_maps:  # float16 maps in [0, 1]
        assert np.abs(a.cam_maps[z].astype(np.float32) - b.cam_maps[z]).max() < 2e-3
        assert np.abs(a.prototype_maps[z].astype(np.float32) - b.prototype_maps[z]).max() < 2e-3


def test_diagnose_runs_without_pytorch(tmp_path):
    """`pneumoct.diagnose` (the code of the command) with the bundled models: PyTorch is never imported and the
    bundled exports are all current."""
    weights = SRC / "pneumoct" / "weights"
    for key in ("lesion_presence", "m3lung_slice", "m3lung_patient"):
        if not (weights / key / "model.json").is_file():
            pytest.skip("bundled models not present")
        rec = json.loads((weights / key / ONNX_INFO).read_text())
        assert rec["source_sha256"] == json.loads((weights / key / "model.json").read_text())["sha256"], key
    study, _, _ = toy_chest(nz=16, n=96)
    nii = tmp_path / "toy.nii.gz"
    write_volume(nii, study.hu, study)
    code = ("import sys, json, pneumoct; d = pneumoct.diagnose(sys.argv[1]); d.save(sys.argv[2]); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'label': d.label}))")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("PNEUMOCT_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code, str(nii), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["torch"] is False and seen["label"]
    assert (tmp_path / "out" / "result.json").is_file() and (tmp_path / "out" / "report.html").is_file()
