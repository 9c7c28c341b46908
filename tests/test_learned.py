"""Learned models inside diagnose: loading, per-slice outputs, the patient block, provenance, report maps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoct.learned import bundled_weights_dir, load_bundled_models, run_learned_models
from pneumoct.models import build_model
from pneumoct.pipeline import DiagnoseOptions, analyse_study, diagnose
from pneumoct.report.html import build_report
from pneumoct.train.checkpoint import save_checkpoint
from pneumoct.types import CLASS_NAMES

from toy import toy_chest

torch.set_num_threads(1)


def _save(root, key, name, kwargs, meta):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    model.eval()
    save_checkpoint(root / key, model, name, kwargs, meta)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-weight stand-ins for the three bundled models (the plumbing is under test, not the accuracy)."""
    root = tmp_path_factory.mktemp("weights")
    _save(root, "lesion_presence", "multiscale_cam_tiny", {"num_classes": 2, "in_channels": 1, "input_norm": "local"},
          {"family": "multiscale_cam", "input_size": 48, "channels": 1, "window": [-600.0, 1200.0],
           "trained_on": "test data", "data_kind": "real"})
    _save(root, "m3lung_slice", "m3lung_slice_cpu", {"num_classes": 4, "in_channels": 1},
          {"family": "m3lung_slice", "input_size": 64, "channels": 1, "window_centers": [-700.0, -600.0, -500.0],
           "trained_on": "synthetic phantoms", "data_kind": "synthetic"})
    _save(root, "m3lung_patient", "m3lung_patient_cpu", {"num_classes": 4},
          {"family": "m3lung_patient", "trained_on": "synthetic phantoms", "data_kind": "synthetic"})
    return root


def test_run_learned_models_shapes_and_nan_outside_lungs(weights):
    study, _, _ = toy_chest()
    from pneumoct.preprocess.lung_mask import segment_lungs

    lungs = segment_lungs(study).labels
    models = load_bundled_models(weights)
    assert set(models) == {"lesion_presence", "m3lung_slice", "m3lung_patient"}
    out = run_learned_models(study.hu, lungs, models)
    z = study.shape[0]
    has_lung = lungs.reshape(z, -1).sum(1) > 0.002 * lungs[0].size
    assert out.lesion_probability.shape == (z,)
    assert np.isnan(out.lesion_probability[~has_lung]).all()
    assert np.isfinite(out.lesion_probability[has_lung]).all()
    cp = out.slice_class_probabilities[has_lung]
    np.testing.assert_allclose(cp.sum(1), 1.0, atol=1e-5)
    assert out.patient_probabilities.shape == (4,) and abs(out.patient_probabilities.sum() - 1) < 1e-6
    # maps are registered to the slice grid: zero outside the lung box, right shape
    k = int(np.flatnonzero(has_lung)[len(np.flatnonzero(has_lung)) // 2])
    cam = out.slice_map("cam", k)
    assert cam.shape == study.hu.shape[1:]
    box = out.inputs.crop(k).box
    outside = np.ones_like(cam, bool)
    outside[box[0]:box[1], box[2]:box[3]] = False
    assert cam[outside].max() == 0 and cam.max() > 0
    assert out.slice_map("prototype", k).shape == study.hu.shape[1:]
    assert set(out.provenance) == {"lesion_presence", "m3lung_slice", "m3lung_patient"}


def test_diagnose_uses_models_and_keeps_rule(weights, tmp_path):
    from pneumoct.io.writers import write_volume

    study, _, _ = toy_chest()
    path = tmp_path / "toy.nii.gz"
    write_volume(path, study.hu, study)
    res = diagnose(path, tmp_path / "out", DiagnoseOptions(weights_dir=str(weights)))
    on_disk = json.loads((tmp_path / "out" / "result.json").read_text())
    assert on_disk["patient"]["model"]["name"] == "m3lung_patient"
    assert "synthetic" in on_disk["patient"]["model"]["trained_on"]
    assert on_disk["patient"]["rule_result"]["model"]["kind"] == "rule"
    assert set(on_disk["patient"]["probabilities"]) == set(CLASS_NAMES)
    learned = on_disk["models"]["learned"]
    assert learned["lesion_presence"]["data_kind"] == "real" and len(learned["m3lung_slice"]["sha256"]) == 64
    # one recorded 2D input chain for the run: every 2D model's input is listed in it
    chain = on_disk["models"]["slice_input_chain"]
    assert [s["step"] for s in chain] == ["lung_box", "crop_resize", "window"]
    assert {w["model"] for w in chain[2]["inputs"]} == {"lesion_presence", "m3lung_slice"}
    slices = on_disk["slices"]
    with_lung = [s for s in slices if s.get("lung_in_slice")]
    assert with_lung and all(0.0 <= s["lesion_probability"] <= 1.0 for s in slices)
    assert all(abs(sum(s["class_probabilities"].values()) - 1) < 1e-3 for s in with_lung)
    assert all(s["lesion_probability"] == 0.0 for s in slices if not s.get("lung_in_slice"))
    assert "SYNTHETIC" in on_disk["data_note"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Learned models used" in html and "m3lung_patient" in html
    assert res["timing_s"]["learned_models"] > 0


def test_no_models_option_and_missing_weights(tmp_path):
    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(use_learned_models=False))
    assert out.result["patient"]["model"]["kind"] == "rule"
    assert "learned" not in out.result["models"]
    assert out.result["models"]["lesions"] == "threshold-baseline" and out.result["segmentation"]["ran"] is False
    out2 = analyse_study(study, DiagnoseOptions(weights_dir=str(tmp_path / "empty")))
    assert out2.result["patient"]["model"]["kind"] == "rule"


def test_report_map_panels_show_slices_with_evidence(weights):
    """Panels are drawn on slices with evidence (lesion area or probability >= 0.5), at most six, one prototype map
    caption per panel (slice choice itself: tests/test_report_explanations.py)."""
    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(weights_dir=str(weights)))
    html = build_report(out.result, study, out.lung_labels, out.lesion_mask, learned=out.learned)
    assert "Where the models looked" in html
    n_panels = html.count('alt="map slice')
    n_proto = html.count("M3Lung-Sys prototype map (synthetic-trained)")
    evidence = [s["lesion_area_mm2"] > 0 or s["lesion_probability"] >= 0.5 for s in out.result["slices"]]
    assert (n_panels > 0) == any(evidence)
    assert n_proto <= 6 and n_proto <= n_panels


def test_bundled_weights_small_and_loadable():
    d = bundled_weights_dir()
    if not (d / "lesion_presence" / "model.json").exists():
        pytest.skip("no bundled weights in this checkout")
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 50 * 1024 * 1024
    models = load_bundled_models(d)
    assert models["lesion_presence"].meta["data_kind"] == "real"
    for key in ("m3lung_slice", "m3lung_patient"):
        if key in models:
            assert models[key].meta["data_kind"] == "synthetic"


def test_calibration_is_monotone_and_shifts():
    from pneumoct.learned import calibrate

    p = np.linspace(0.01, 0.99, 50).astype(np.float32)
    assert np.array_equal(calibrate(p, None), p)
    q = calibrate(p, {"a": 1.0, "b": 2.0})
    assert np.all(np.diff(q) > 0) and np.all(q > p)  # same order, shifted up
    np.testing.assert_allclose(calibrate(np.array([0.5]), {"a": 3.0, "b": 0.0}), [0.5], atol=1e-6)


def test_area_probability_and_slice_probability_modes(weights):
    from pneumoct.learned import area_probability
    from pneumoct.preprocess.lung_mask import segment_lungs

    cal = {"w_log1p_area_mm2": 1.0, "bias": -4.0}
    f = area_probability(np.array([0.0, 50.0, 500.0]), cal)
    assert np.all(np.diff(f) > 0)
    np.testing.assert_allclose(f[0], 1 / (1 + np.exp(4.0)), rtol=1e-5)
    # with an area calibration in the model's meta, "area" mode uses it; "model" mode the network
    study, _, _ = toy_chest()
    lungs = segment_lungs(study).labels
    models = load_bundled_models(weights)
    models["lesion_presence"].info["meta"]["area_calibration"] = cal
    area = np.linspace(0, 400, study.shape[0])
    a = run_learned_models(study.hu, lungs, models, threshold_area_mm2=area)
    m = run_learned_models(study.hu, lungs, models, threshold_area_mm2=area, slice_probability="model")
    ok = np.isfinite(a.lesion_probability)
    np.testing.assert_allclose(a.lesion_probability[ok], area_probability(area[ok], cal), rtol=1e-5)
    np.testing.assert_allclose(m.lesion_probability[ok], m.lesion_probability_model[ok], rtol=1e-5)
    assert a.lesion_probability_kind == "area" and m.lesion_probability_kind == "model"
    del models["lesion_presence"].info["meta"]["area_calibration"]


def test_diagnose_learned_lesions_option(tmp_path):
    """--lesions learned: the bundled segmenter's mask feeds the quantification; binary masks are split into
    ground-glass / consolidation by HU; without a segmenter the baseline is used."""
    from pneumoct.preprocess.lung_mask import segment_lungs
    from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO

    torch.manual_seed(0)

    class AllLesion(torch.nn.Module):  # logits > 0 everywhere: every voxel the segmenter sees is "lesion"
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(5.0))

        def forward(self, x):
            return {"logits": torch.zeros_like(x[:, :1]) + self.bias}

    from pneumoct import models as registry

    if "test_all_lesion" not in registry.list_models():
        registry.register("test_all_lesion")(lambda **kw: AllLesion())
    save_checkpoint(tmp_path / "w" / "lesion_seg", AllLesion(), "test_all_lesion", {},
                    {"family": "segmentation", "num_classes": 1, "input_size": 32, "channels": 1,
                     "window": [-600.0, 700.0], "classes": ["background", "lesion"], "trained_on": "nothing"})
    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(lesions="learned", weights_dir=str(tmp_path / "w"),
                                               use_learned_models=False))
    assert out.result["models"]["lesions"].startswith("learned:lesion_seg")
    lungs = segment_lungs(study).labels > 0
    m = out.lesion_mask
    assert m[lungs].all() or (m[lungs] > 0).mean() > 0.95  # "all lesion" inside the lungs
    assert set(np.unique(m)) <= {0, LESION_GGO, LESION_CONSOLIDATION}
    assert np.all(study.hu[m == LESION_CONSOLIDATION] >= -300) and np.all(study.hu[m == LESION_GGO] < -300)
    base = analyse_study(study, DiagnoseOptions(lesions="learned", weights_dir=str(tmp_path / "none"),
                                                use_learned_models=False))
    assert base.result["models"]["lesions"] == "threshold-baseline"


def _all_lesion_weights(root):
    """weights/lesion_seg = a segmenter that calls every voxel it sees "lesion" (the gate is under test)."""

    class AllLesion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(5.0))

        def forward(self, x):
            return {"logits": torch.zeros_like(x[:, :1]) + self.bias}

    from pneumoct import models as registry

    if "test_all_lesion" not in registry.list_models():
        registry.register("test_all_lesion")(lambda **kw: AllLesion())
    save_checkpoint(root / "lesion_seg", AllLesion(), "test_all_lesion", {},
                    {"family": "segmentation", "num_classes": 1, "input_size": 32, "channels": 1,
                     "window": [-600.0, 700.0], "classes": ["background", "lesion"], "trained_on": "nothing"})
    return root


def test_learned_lesions_are_the_default_and_joint_mode_gates_segmentation(tmp_path, weights):
    """JCS joint diagnosis (Fig. 1): with segment_when="positive" the segmenter runs only when the classifier's
    abnormal probability reaches the threshold; a negative study gets no lesion mask and says so. The default
    (always) segments every study with the learned segmenter."""
    import shutil

    root = tmp_path / "w"
    shutil.copytree(weights, root)
    _all_lesion_weights(root)
    study, _, _ = toy_chest()
    assert DiagnoseOptions().lesions is None and DiagnoseOptions().segment_when == "always"  # None = learned

    always = analyse_study(study, DiagnoseOptions(weights_dir=str(root), write_report=False))
    seg = always.result["segmentation"]
    assert seg["ran"] is True and "gate" not in seg
    assert always.result["models"]["lesions"].startswith("learned:lesion_seg")
    assert always.result["quantification"]["lesion_volume_ml"] > 0
    # the segmenter is named in models.learned (and so in the report's table) beside the classifiers
    assert always.result["models"]["learned"]["lesion_seg"]["architecture"] == "test_all_lesion"
    assert {"lesion_presence", "m3lung_patient"} <= set(always.result["models"]["learned"])
    abnormal = always.result["patient"]["abnormal_probability"]

    # gate below the classifier's abnormal probability: positive, segmented, same mask as "always"
    pos = analyse_study(study, DiagnoseOptions(weights_dir=str(root), segment_when="positive",
                                               positive_threshold=max(0.0, abnormal - 0.01)))
    assert pos.result["segmentation"]["gate"]["positive"] is True and pos.result["segmentation"]["ran"] is True
    assert pos.result["segmentation"]["gate"]["classifier"] == "m3lung_patient"
    np.testing.assert_array_equal(pos.lesion_mask, always.lesion_mask)

    # gate above it: negative, not segmented, empty mask and zero lesion volume, and the result says why
    neg = analyse_study(study, DiagnoseOptions(weights_dir=str(root), segment_when="positive",
                                               positive_threshold=min(1.0, abnormal + 0.01)))
    g = neg.result["segmentation"]
    assert g["gate"]["positive"] is False and g["ran"] is False
    assert g["gate"]["abnormal_probability"] == pytest.approx(abnormal, abs=1e-3)
    assert not neg.lesion_mask.any() and neg.result["quantification"]["lesion_volume_ml"] == 0
    assert neg.result["models"]["lesions"].startswith("not segmented")
    assert "negative" in neg.result["data_note"]
    # the threshold baseline's per-slice area is still reported beside the (empty) learned mask
    assert any(s["threshold_lesion_area_mm2"] > 0 for s in neg.result["slices"])


def test_joint_mode_without_patient_model_gates_on_the_rule(tmp_path):
    root = _all_lesion_weights(tmp_path / "w")
    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(weights_dir=str(root), segment_when="positive", lesions="learned",
                                               use_learned_models=False, positive_threshold=1.01))
    g = out.result["segmentation"]["gate"]
    assert g["classifier"].startswith("rule") and g["positive"] is False and not out.lesion_mask.any()
    with pytest.raises(ValueError):
        analyse_study(study, DiagnoseOptions(weights_dir=str(root), segment_when="sometimes"))


def test_joint_mode_gate_uses_the_validated_burden_when_installed(tmp_path, weights):
    """With the headline calibration installed the JCS gate is the calibrated lesion burden (real-data fitted), not
    the phantom-trained patient network."""
    import shutil

    cal = Path(__file__).resolve().parents[1] / "src" / "pneumoct" / "weights" / "lesion_burden"
    if not (cal / "calibration.json").is_file():
        pytest.skip("no headline calibration in this checkout")
    root = tmp_path / "w"
    shutil.copytree(weights, root)
    _all_lesion_weights(root)
    shutil.copytree(cal, root / "lesion_burden")
    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(weights_dir=str(root), lesions="learned", segment_when="positive",
                                               write_report=False))
    gate = out.result["segmentation"]["gate"]
    assert gate["classifier"] == "lesion_burden on the threshold baseline"
    assert gate["positive"] == (gate["abnormal_probability"] >= 0.5) == out.result["segmentation"]["ran"]
