"""DeepSC-COVID (issue 12): modules and shapes, ablation configs, losses (hand-checked values), the input chain
(patches reassemble exactly, maps go back to the study grid), training learns, checkpoints reload exactly, and the
3D system's analyse() on a study."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumoct.models import build_model, list_models
from pneumoct.models.deepsc import (ClassificationSubnet, CrossStitch, DeepSC, Inception3d, LesionSubnet,
                                    evidence_masks, match_dims)
from pneumoct.models.losses import (ClassBalancedFocalLoss, binary_focal_loss, deepsc_segmentation_loss,
                                    deepsc_total_loss, dice_loss, normalise_evidence, slice_max_loss,
                                    task_aware_loss)
from pneumoct.preprocess.volume_deepsc import (DeepSCInputSpec, join_patches, prepare, resize_volume,
                                               sample_slice_indices, split_patches)

TINY = {"stem": 4, "seg_base": 4, "cls_widths": [4, 8, 8]}


def _inputs(p=2, d=8, h=16, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) * (p * d // n)
    return torch.rand(p, 1, d, h, h, generator=g), torch.rand(1, 1, n, h, h, generator=g), idx


# ------------------------------------------------------------------------------------------------- modules
def test_modules_shapes():
    x = torch.rand(2, 3, 8, 16, 16)
    assert Inception3d(3, 8)(x).shape == (2, 8, 8, 16, 16)
    assert match_dims(x, (4, 20, 16)).shape == (2, 3, 4, 20, 16)
    assert torch.equal(match_dims(match_dims(x, (8, 20, 18)), (8, 16, 16)), x)  # pad then crop = identity
    cs = CrossStitch()
    a, b = torch.ones(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2)
    f_seg, f_cls = cs(a, b, a, b)
    assert torch.allclose(f_seg, 0.9 * a) and torch.allclose(f_cls, 0.1 * a)  # Eq. (2) at its initial weights
    cs.active = False
    assert cs(a, b, a, b)[0] is a
    fused, sides = LesionSubnet(3, 4)(x)
    assert fused.shape == (2, 1, 8, 16, 16)
    assert [tuple(s.shape[2:]) for s in sides] == [(1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16)]
    logits, feats = ClassificationSubnet(3, (4, 8, 8), 3)(x, torch.rand(2, 1, 8, 16, 16))
    assert logits.shape == (2, 3) and [tuple(f.shape[1:]) for f in feats] == [(4, 4, 8, 8), (8, 2, 4, 4), (8, 1, 2, 2)]


def test_network_shapes_and_evidence_matches_eq4():
    net = build_model("deepsc_cpu", num_classes=3, **TINY).eval()
    patches, x_cls, idx = _inputs()
    out = net(patches, x_cls, idx)
    assert out["seg_logits"].shape == (2, 1, 8, 16, 16) and out["logits"].shape == (1, 3)
    ev = net.evidence(out, torch.tensor([1]))
    assert [tuple(v.shape) for v in ev] == [(1, 1, 4, 8, 8), (1, 1, 2, 4, 4), (1, 1, 1, 2, 2)]
    # Eq. (4) = sum over layers of the spatial means of Eq. (5)'s masks (both linear in the same weights)
    assert torch.allclose(sum(v.mean() for v in ev), out["logits"][0, 1], atol=1e-5)
    assert evidence_masks(out["features"], net.classifier.fc_blocks(), torch.tensor([0]))[0].shape == ev[0].shape


@pytest.mark.parametrize("kw", [{"inception": False}, {"cross_stitch": False}, {"cls_width_mult": 0.0625}])
def test_ablations_build_and_run(kw):
    net = build_model("deepsc_cpu", num_classes=2, **{**TINY, **kw})
    out = net(*_inputs())
    assert out["logits"].shape == (1, 2)
    if kw.get("cross_stitch") is False:
        assert not any("cross" in n for n, _ in net.named_parameters())


def test_paper_model_and_config():
    from pneumoct.train.config import load_config
    from pneumoct.train.deepsc_options import DeepSCOptions

    assert {"deepsc", "deepsc_cpu"} <= set(list_models())
    cfg = load_config("configs/deepsc_paper.yaml")
    net = build_model(cfg.model.name, **cfg.model.kwargs)
    assert net.classifier.widths == [64, 128, 256] and net.num_classes == 3
    assert cfg.class_names == ["non_pneumonia", "covid19", "cap"]
    spec = DeepSCOptions.from_config(cfg.deepsc).spec()
    assert spec.patch == (24, 256, 256) and spec.cls_slices == 48 and spec.hu_window == (-1400.0, 200.0)


@pytest.mark.parametrize("over", [["deepsc.lambda_ta=0"], ["deepsc.lambda_ta=1"], ["deepsc.lambda_ta=100"],
                                  ["deepsc.multi_scale_ta=false"], ["model.kwargs.inception=false"],
                                  ["model.kwargs.cross_stitch=false"]])
def test_ablation_configs_parse_and_build(over):
    from pneumoct.train.config import load_config

    cfg = load_config("configs/deepsc_cpu.yaml", over)
    assert cfg.task == "deepsc" and cfg.family == "deepsc"
    build_model(cfg.model.name, **cfg.model.kwargs)


def test_bad_deepsc_config_is_refused():
    from pneumoct.errors import PneumoctInputError
    from pneumoct.train.config import load_config

    with pytest.raises(PneumoctInputError, match="deepsc.nonsense"):
        load_config("configs/deepsc_cpu.yaml", ["deepsc.nonsense=1"])
    with pytest.raises(PneumoctInputError, match="multiples of 8"):
        load_config("configs/deepsc_cpu.yaml", ["deepsc.input.patch=[12,64,64]"])


# ------------------------------------------------------------------------------------------------- losses
def test_losses_hand_values():
    p = torch.tensor([1.0, 0.0, 1.0, 0.0])
    s = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert math.isclose(float(dice_loss(p, s)), 0.5, abs_tol=1e-5)  # Eq. (6): 1 - 2*1/(2+2)
    z = torch.zeros(1)
    ln2 = math.log(2)
    # Eq. (7) at S^ = 0.5: lesion voxel alpha 0.5^2 ln 2, background (1 - alpha) 0.5^2 ln 2
    assert math.isclose(float(binary_focal_loss(z, torch.ones(1), 0.75, 2.0)), 0.75 * 0.25 * ln2, rel_tol=1e-5)
    assert math.isclose(float(binary_focal_loss(z, torch.zeros(1), 0.75, 2.0)), 0.25 * 0.25 * ln2, rel_tol=1e-5)
    seg = deepsc_segmentation_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), lambda_dice=2.0, lambda_focal=1.0)
    expect = 2 * (1 - 2 * 0.5 / (1.0 + 1.0)) + (0.75 * 0.25 * ln2 + 0.25 * 0.25 * ln2) / 2  # Eq. (8)
    assert math.isclose(float(seg), expect, rel_tol=1e-4)
    # Eq. (9): xi_y * CE; uniform logits over 2 classes -> CE = ln 2; weight of class 0 = 2
    ce = ClassBalancedFocalLoss(weights=[2.0, 0.5], gamma=0.0)(torch.zeros(1, 2), torch.tensor([0]))
    assert math.isclose(float(ce), 2 * ln2, rel_tol=1e-5)
    # Eq. (10): 0.5 * mean((1 - 0)^2) + 1.0 * mean((0.5 - 0)^2)
    ta = task_aware_loss([torch.ones(2), torch.full((3,), 0.5)], [torch.zeros(2), torch.zeros(3)], [0.5, 1.0])
    assert math.isclose(float(ta), 0.75, rel_tol=1e-6)
    assert float(deepsc_total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0))) == 33.0  # Eq. (11)
    # weak slice loss: slice maxima 0.5 (label 1) and 0.1 (label 0)
    wl = slice_max_loss(torch.tensor([[[0.5, 0.2]], [[0.1, 0.0]]]), torch.tensor([1.0, 0.0]))
    assert math.isclose(float(wl), (ln2 - math.log(0.9)) / 2, rel_tol=1e-5)
    v = normalise_evidence(torch.tensor([-1.0, 1.0, 4.0]).view(1, 1, 3))
    assert torch.allclose(v.flatten(), torch.tensor([0.0, 0.25, 1.0]), atol=1e-5)


# ------------------------------------------------------------------------------------------------ pre-processing
def test_eq12_slice_sampling():
    assert sample_slice_indices(100, 48).tolist() == list(range(0, 96, 2))  # floor(100/48) = 2
    assert sample_slice_indices(48, 48).tolist() == list(range(48))
    assert sample_slice_indices(10, 16).tolist()[0] == 0 and sample_slice_indices(10, 16).tolist()[-1] == 9


def _blob_study(shape=(30, 40, 36)):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    lung = (((y - 20) / 14.0) ** 2 + ((x - 18) / 12.0) ** 2 <= 1) & (z >= 3) & (z < 27)
    lesion = lung & (((z - 15) / 6.0) ** 2 + ((y - 20) / 6.0) ** 2 + ((x - 18) / 6.0) ** 2 <= 1)
    hu = np.where(lung, -850, 40).astype(np.int16)
    hu[lesion] = -200
    return hu, lung.astype(np.uint8), lesion


def test_chain_values_patches_and_exact_round_trip():
    hu, lung, lesion = _blob_study()
    # sizes equal to the lung box and no z resampling: the model grid IS the box, so the way back is exact
    pv = prepare(hu, lung, (2.0, 1.0, 1.0), DeepSCInputSpec(z_spacing_mm=None, margin_mm=0.0))
    assert pv.box == (3, 27, 6, 35, 6, 31)  # the lung's bounding box
    spec = DeepSCInputSpec(patch=(8, 29, 25), cls_slices=8, z_spacing_mm=None, margin_mm=0.0)
    pv = prepare(hu, lung, (2.0, 1.0, 1.0), spec)
    assert pv.volume.shape == (24, 29, 25) and pv.n_real == 24
    v = pv.volume
    assert v.min() >= 0 and v.max() <= 1
    assert math.isclose(float(v[pv.lung].min()), (-850 + 1400) / 1600, abs_tol=1e-6)  # [-1400, 200] -> [0, 1]
    assert float(np.abs(v[~pv.lung]).max()) == 0.0  # lung-masked
    patches = pv.patches()
    assert patches.shape == (3, 8, 29, 25) and np.array_equal(join_patches(patches), v)
    assert np.array_equal(pv.cls_input(), v[sample_slice_indices(24, 8)])
    model_lesion = pv.to_model_grid(lesion, binary=True)
    assert np.array_equal(pv.to_study_grid(model_lesion) > 0.5, lesion)
    assert pv.to_study_grid(model_lesion).shape == hu.shape
    assert np.array_equal(pv.slice_labels_to_model(lesion.any(axis=(1, 2))), lesion.any(axis=(1, 2))[3:27])
    with pytest.raises(ValueError):
        split_patches(np.zeros((10, 2, 2)), 8)


def test_chain_with_resize_and_padding_goes_back_to_the_study_grid():
    hu, lung, lesion = _blob_study()
    spec = DeepSCInputSpec(patch=(8, 16, 16), cls_slices=8, z_spacing_mm=3.0, margin_mm=2.0)
    pv = prepare(hu, lung, (2.0, 1.0, 1.0), spec)
    assert pv.volume.shape[0] % 8 == 0 and pv.volume.shape[1:] == (16, 16)
    assert pv.n_real == round(pv.box_shape[0] * 2.0 / 3.0) and not pv.volume[pv.n_real:].any()  # zero padding
    back = pv.to_study_grid(pv.to_model_grid(lesion)) >= 0.5
    dice = 2 * (back & lesion).sum() / (back.sum() + lesion.sum())
    assert back.shape == hu.shape and dice > 0.85
    # a map on the sampled slices spreads linearly over all model slices
    ramp = np.repeat(pv.cls_index.astype(np.float32)[:, None, None], 16, 1).repeat(16, 2)
    spread = pv.cls_to_model_grid(ramp)
    inner = np.arange(pv.cls_index[0], pv.cls_index[-1] + 1)
    assert np.allclose(spread[inner, 0, 0], inner, atol=1e-5)
    rec = pv.record()
    assert rec["hu_window"] == [-1400.0, 200.0] and rec["n_patches"] == pv.volume.shape[0] // 8


def test_resize_area_keeps_mean():
    a = np.random.default_rng(0).random((8, 32, 32)).astype(np.float32)
    assert math.isclose(float(resize_volume(a, (4, 16, 16)).mean()), float(a.mean()), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ training
def _tiny_cfg(**deepsc):
    from pneumoct.train.config import parse_config

    raw = {"name": "deepsc_test", "model": {"name": "deepsc_cpu", "kwargs": {"num_classes": 2, **TINY}},
           "task": "deepsc", "data": {"target": "covid"}, "train": {"batch_size": 2, "seed": 0, "monitor": "val_dice"},
           "deepsc": {"input": {"patch": [8, 32, 32], "cls_slices": 8, "z_spacing_mm": None},
                      "pretrain_epochs": 12, "finetune_epochs": 3, "pretrain_lr": 0.003, "finetune_lr": 0.001,
                      **deepsc}}
    return parse_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Healthy vs COVID-19 phantoms (clear lesions), a tiny network: a learnable task in a few seconds."""
    from pneumoct.train.task_deepsc import fit_deepsc
    from pneumoct.train.volumes import phantom_volume_cohort

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is also what the CPU config uses
    try:
        tr = phantom_volume_cohort(4, seed=5, labels=("healthy", "covid19"), matrix=64, n_slices=16)
        va = phantom_volume_cohort(3, seed=6, labels=("healthy", "covid19"), matrix=64, n_slices=16)
        out = tmp_path_factory.mktemp("deepsc_run")
        metrics = fit_deepsc(_tiny_cfg(), out, progress=False, cases=(tr, va))
    finally:
        torch.set_num_threads(threads)
    return out, metrics, va


def test_training_learns(trained):
    out, metrics, _ = trained
    h = metrics["history"]
    assert len(h) == 15 and [r["stage"] for r in h] == [1] * 12 + [2] * 3
    assert h[11]["train_loss"] < 0.8 * h[0]["train_loss"]  # the loss falls during pre-training
    best = metrics["best"]
    assert best["stage"] == 2 and best["val_dice"] > 0.3  # lesion Dice on held-out phantoms (chance: 0)
    assert (out / "DONE").is_file() and (out / "best" / "fingerprint.json").is_file()
    card = (out / "model_card.md").read_text()
    assert "synthetic phantoms" in card.lower()


def test_checkpoint_reload_gives_identical_outputs(trained):
    from pneumoct.models.checkpoint import load_checkpoint, save_checkpoint
    from pneumoct.train.task_deepsc import predict_item, prepare_items

    out, _, va = trained
    model, info = load_checkpoint(out / "best", expected_name="deepsc_cpu")
    assert info["meta"]["family"] == "deepsc" and info["meta"]["classes"] == ["non_covid", "covid19"]
    item = prepare_items(va[:1], info["meta"]["classes"], DeepSCInputSpec.from_dict(info["meta"]["input_spec"]))[0]
    p1, s1 = predict_item(model, item)
    again = save_checkpoint(out / "copy", model, info["model_name"], info["model_kwargs"], info["meta"])
    model2, _ = load_checkpoint(again)
    p2, s2 = predict_item(model2, item)
    assert np.array_equal(p1, p2) and np.array_equal(s1, s2)


def test_system_analyse_on_a_study(trained, monkeypatch):
    from pneumoct.models import deepsc_system
    from pneumoct.types import SliceInfo, StudyVolume

    out, _, va = trained
    case = va[1]
    study = StudyVolume(case.hu, case.spacing, (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]),
                        [SliceInfo(i, -i * case.spacing[0]) for i in range(case.hu.shape[0])], "nifti")
    res = deepsc_system.analyse(study, case.lung, weights_dir=str(out / "best"))
    res.check(study.shape)
    assert set(res.maps) == {"segmentation", "evidence"} and res.lesion_mask.dtype == np.uint8
    assert not res.maps["segmentation"][case.lung == 0].any()  # nothing outside the lungs
    assert res.info["input_chain"]["cls_slices"] == 8 and "phantom" in res.info["trained_on"]


def test_bundled_weights():
    """The shipped weights/deepsc: small, loadable, and saying what they were trained on."""
    import json

    from pneumoct.fingerprint import load_fingerprint
    from pneumoct.learned import bundled_weights_dir
    from pneumoct.models.deepsc_system import load

    d = bundled_weights_dir() / "deepsc"
    if not (d / "model.json").is_file():
        pytest.skip("no bundled deepsc weights in this checkout")
    assert (d / "model.safetensors").stat().st_size < 5 * 1024 * 1024
    model, info = load(d.parent)
    meta = info["meta"]
    assert meta["family"] == "deepsc" and meta["classes"] == ["healthy", "covid19", "other_viral", "cap"]
    assert meta["data_kind"] == "real+synthetic" and set(meta["data"]["sources"]) == {"covid-ct-md", "phantom"}
    fp = load_fingerprint(d)
    assert fp["model"]["key"] == "deepsc" and set(fp["sources"]) == {"covid-ct-md", "phantom"}
    card = (d / "model_card.md").read_text()
    assert "covid-ct-md/covid" in card and "phantom" in card.lower() and "held-out" in card.lower()
    assert json.loads((d / "model.json").read_text())["sha256"] == info["sha256"]


def test_evaluate_command_scores_a_3d_checkpoint_on_a_phantom_cohort(trained, tmp_path):
    """`pneumoct evaluate --checkpoint RUN --data phantom_cohort:DIR` on whole studies (read -> lungs -> system)."""
    import json

    from pneumoct.cli import main
    from pneumoct.synth.writer import synthesize_cohort

    out, _, _ = trained
    cohort = tmp_path / "cohort"
    synthesize_cohort(cohort, 4, seed=77, labels=("healthy", "covid19"), matrix=64, n_slices=16, formats=("nifti",))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["evaluate", "--checkpoint", str(out / "best"), "--data", f"phantom_cohort:{cohort}",
                     "--out", str(tmp_path / "ev"), "--bootstrap", "50"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 4 and "synthetic phantoms" in m["data"] and "patient level" in m["data"]
    assert "groupwise_by_lesion_volume_ratio" in m  # each phantom's ratio from its voxel truth
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5 and "prob_covid19" in rows[0]
