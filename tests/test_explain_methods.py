"""pneumoct.explain.methods: the explanation maps are *checked*, not only drawn.

Tiny networks are trained for a few seconds on a learnable toy task (class 1 = a bright Gaussian blob at a random
position in noise, class 0 = noise only), then each method's map is scored against the blob mask with
``pneumoct.explain.scores`` and compared with two controls: a uniform random map and the same maps scored against
the masks of *other* images (shuffled masks). Timings on one thread: ~25-40 s for the module.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoct.explain import boxes_from_saliency, box_hit_rate, normalise_map, score_explanations
from pneumoct.explain.methods import (
    ExplanationResult,
    applicable_methods,
    default_method,
    evaluate_explanations,
    explain,
    explain_slices,
    gradcam,
    model_family,
    to_slice_grid,
)
from pneumoct.models import build_model
from pneumoct.models.m3lung import slice_loss
from pneumoct.models.multiscale_cam import recalibrate_batchnorm

torch.set_num_threads(1)

S = 48          # toy image side
SIGMA = 3.0     # blob sigma, px; the lesion mask is the disc of radius 2 sigma
TOL = 4.0       # pointing-game tolerance for 48 px images (the 15 px default is meant for 256 px slices)
REPO = Path(__file__).resolve().parents[1]


def _blobs(n: int, seed: int):
    """x (n, 1, S, S), y (n,), lesion masks (n, S, S) bool, centres (n, 2)."""
    g = np.random.default_rng(seed)
    x = g.normal(0.0, 0.3, (n, 1, S, S)).astype(np.float32)
    y = np.arange(n) % 2
    g.shuffle(y)
    yy, xx = np.mgrid[:S, :S]
    ctr = g.uniform(8, S - 8, (n, 2))
    m = np.zeros((n, S, S), bool)
    for i in range(n):
        if y[i]:
            d2 = (yy - ctr[i, 0]) ** 2 + (xx - ctr[i, 1]) ** 2
            x[i, 0] += 1.5 * np.exp(-d2 / (2 * SIGMA ** 2))
            m[i] = d2 <= (2 * SIGMA) ** 2
    return torch.from_numpy(x), torch.from_numpy(y).long(), m, ctr


def _train(net, loss_fn, epochs: int, lr: float):
    torch.manual_seed(0)
    x, y, _, _ = _blobs(160, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            loss = loss_fn(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    # short runs leave BN running stats behind the weights (see recalibrate_batchnorm); leaves eval mode
    recalibrate_batchnorm(net, [x[i:i + 80] for i in range(0, len(x), 80)])
    return net


def _ce(key):
    return lambda out, y: torch.nn.functional.cross_entropy(out[key], y)


@pytest.fixture(scope="module")
def test_set():
    xt, yt, mt, ctr = _blobs(32, seed=1)
    pos = yt.numpy() == 1
    return xt[pos][:12], mt[pos][:12], ctr[pos][:12]


@pytest.fixture(scope="module")
def ms_net():
    torch.manual_seed(0)
    return _train(build_model("multiscale_cam_cpu", num_classes=2), _ce("logits"), epochs=3, lr=1e-3)


@pytest.fixture(scope="module")
def jcs_net():
    torch.manual_seed(0)
    # stage strides (1, 1, 1, 2): an output stride of 8 keeps a 6x6 Grad-CAM grid on 48 px inputs
    net = build_model("jcs_classifier_cpu", num_classes=2, in_channels=1, stage_strides=(1, 1, 1, 2))
    return _train(net, _ce("logits"), epochs=3, lr=3e-3)


@pytest.fixture(scope="module")
def m3_net():
    torch.manual_seed(0)
    net = build_model("m3lung_slice_cpu", num_classes=2, in_channels=1)
    return _train(net, lambda out, y: slice_loss(out, y), epochs=3, lr=3e-3)


def _shuffled(masks):
    return np.roll(masks, 1, axis=0)  # every map scored against another image's blob


def _means(maps: dict, masks) -> dict:
    d = score_explanations({k: list(v) for k, v in maps.items()}, list(masks), tolerance_px=TOL, with_boxes=False)
    return {k: {m: d[k][m]["mean"] for m in ("pointing_game", "energy_inside")} for k in d}


# --------------------------------------------------------------------------------- Hu et al. (CAM, IG)
def test_multiscale_cam_and_ig_localise_blob(ms_net, test_set):
    x, masks, _ = test_set
    with torch.no_grad():
        assert (ms_net(x)["logits"].argmax(1) == 1).float().mean() > 0.9  # the toy is learnt
    rep = evaluate_explanations(ms_net, "multiscale_cam", x, masks, ["cam", "integrated_gradients"], class_idx=1,
                                score_kwargs={"tolerance_px": TOL, "box_kwargs": {"min_area_px": 4}})
    res = rep["methods"]
    assert rep["n_scored"] == len(x) and rep["params"]["integrated_gradients"]["n_steps"] == 25
    chance = rep["chance_energy"]
    rnd = res["random"]
    for name in ("cam", "integrated_gradients", "integrated_gradients/conv3", "integrated_gradients/conv4",
                 "integrated_gradients/conv5", "cam/conv3"):
        r = res[name]
        assert r["pointing_game"] >= 0.9 and r["pointing_game"] >= rnd["pointing_game"] + 0.5, (name, r, rnd)
        assert r["energy_inside"] >= 2.5 * chance and r["energy_inside"] > 2 * rnd["energy_inside"], (name, r)
    # IG is pixel-precise: most of the joint saliency energy sits on the blob (Hu et al., Fig. 5)
    assert res["integrated_gradients"]["energy_inside"] > 0.8
    # shuffled-mask control: the same maps scored against other images' blobs
    r = explain(ms_net, x, "integrated_gradients", class_idx=1)
    ctrl = _means({"joint": r.primary, "conv4": r.maps["conv4"]}, _shuffled(masks))
    for k in ctrl:
        assert ctrl[k]["energy_inside"] < 0.3 * res["integrated_gradients"]["energy_inside"], ctrl
        assert ctrl[k]["pointing_game"] <= 0.3, ctrl


def test_ig_boxes_hit_blob(ms_net, test_set):
    x, masks, _ = test_set
    r = explain(ms_net, x, "integrated_gradients", class_idx=1)
    for name in ("joint", "conv3"):
        recall, prec = [], []
        for i in range(len(x)):
            # Hu et al. box pipeline; 4 px minimum component area on 48 px images (20 px is meant for 256 px)
            b = boxes_from_saliency(r.maps[name][i], min_area_px=4)
            h = box_hit_rate(b, masks[i], iou_threshold=None)
            recall.append(h["lesion_recall"])
            if h["box_precision"] is not None:
                prec.append(h["box_precision"])
        assert np.mean(recall) >= 0.9, (name, recall)
        assert np.mean(prec) >= 0.8, (name, prec)


def test_ig_shapes_range_determinism_and_joint_is_product(ms_net, test_set):
    x = test_set[0][:3]
    r1 = explain(ms_net, x, "ig", class_idx=1)
    r2 = explain(ms_net, x, "integrated_gradients", class_idx=[1, 1, 1], internal_batch_size=16)
    assert isinstance(r1, ExplanationResult) and r1.method == "integrated_gradients"
    assert set(r1.maps) == {"conv3", "conv4", "conv5", "joint"} and r1.primary_name == "joint"
    assert r1.params["n_steps"] == 25 and r1.params["baseline"] == "zeros"
    np.testing.assert_array_equal(r1.class_idx, [1, 1, 1])
    for k, m in r1.maps.items():
        assert m.shape == (3, S, S) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0 and np.allclose(m.reshape(3, -1).max(1), 1.0)
        np.testing.assert_allclose(m, r2.maps[k], atol=1e-5)  # deterministic; internal batching changes nothing
    np.testing.assert_array_equal(r1.primary, explain(ms_net, x, "ig", class_idx=1).primary)
    for i in range(3):  # joint = pixel-wise product of the per-scale maps (renormalised)
        prod = r1.maps["conv3"][i].astype(np.float64) * r1.maps["conv4"][i] * r1.maps["conv5"][i]
        np.testing.assert_allclose(r1.maps["joint"][i], normalise_map(prod), atol=1e-5)
    c = explain(ms_net, x, "cam", class_idx=1)
    for i in range(3):
        prod = c.maps["conv3"][i].astype(np.float64) * c.maps["conv4"][i] * c.maps["conv5"][i]
        np.testing.assert_allclose(c.maps["joint"][i], normalise_map(prod), atol=1e-4)
    # predicted class by default; one image at a time gives the same as the batch (eval mode: independent)
    r0 = explain(ms_net, x[:1], "integrated_gradients")
    np.testing.assert_allclose(r0.primary[0], r1.primary[0], atol=1e-5)


def test_multiscale_gradcam_last_block(ms_net, test_set):
    """Grad-CAM on Conv5 (a 3x3 grid on 48 px inputs, fed by a GMP head) runs and is well formed; on this toy it
    does NOT localise the blob (pointing game 0/12 at 4 px, energy ~ chance), so no localisation is asserted here.
    Use "cam" / "integrated_gradients" for this family."""
    x, masks, _ = test_set
    r = explain(ms_net, x, "gradcam", class_idx=1)
    assert r.params["layer"] == "blocks.4" and r.primary.shape == (len(x), S, S)
    assert r.primary.min() >= 0 and r.primary.max() <= 1 and np.isfinite(r.primary).all()
    np.testing.assert_array_equal(r.primary, explain(ms_net, x, "gradcam", class_idx=1).primary)


# ------------------------------------------------------------------------------------------ JCS Grad-CAM
def test_jcs_gradcam_localises_blob(jcs_net, test_set):
    x, masks, _ = test_set
    rep = evaluate_explanations(jcs_net, "jcs_classifier", x, masks, ["gradcam"], class_idx=1,
                                score_kwargs={"tolerance_px": TOL, "box_kwargs": {"min_area_px": 4}})
    g, rnd = rep["methods"]["gradcam"], rep["methods"]["random"]
    assert rep["params"]["gradcam"]["formula"] == "JCS Eq. (1)-(2)"
    assert g["pointing_game"] >= 0.8 and rnd["pointing_game"] <= 0.3, (g, rnd)
    assert g["energy_inside"] >= 3 * rep["chance_energy"], (g, rep["chance_energy"])
    assert g["lesion_recall"] >= 0.8, g
    r = explain(jcs_net, x, "gradcam", class_idx=1)
    ctrl = _means({"gc": r.primary}, _shuffled(masks))["gc"]
    assert ctrl["energy_inside"] < 0.5 * g["energy_inside"], ctrl


def test_generic_gradcam_hooks_match_jcs_eq_1_2(jcs_net, test_set):
    x = test_set[0][:4]
    layer = jcs_net.backbone.layer4
    n_hooks = len(layer._forward_hooks)
    jcs_net.eval()
    ours, idx = gradcam(jcs_net, x, layer, 1, relu_inside=True)  # JCS Eq. (2): sum_k ReLU(w_k X^k), logit score
    ref = jcs_net.activation_map(x, 1, score="logit", create_graph=False).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_array_equal(idx, [1, 1, 1, 1])
    assert len(layer._forward_hooks) == n_hooks and not jcs_net.training  # hooks removed, mode untouched
    jcs_net.train()
    explain(jcs_net, x, "gradcam", target_layer=layer)
    assert jcs_net.training  # the caller's mode is kept
    jcs_net.eval()


# --------------------------------------------------------------------------------- M3Lung-Sys prototype
def test_m3lung_prototype_and_gradcam_maps(m3_net, test_set):
    x, masks, _ = test_set
    r = explain(m3_net, x, "prototype")
    with torch.no_grad():
        out = m3_net(x)
    assert r.primary.shape == (len(x), S, S) and r.primary.min() >= 0 and r.primary.max() <= 1
    np.testing.assert_array_equal(r.class_idx, out["lesion_logits"].argmax(1).numpy())
    ref = np.stack([normalise_map(m) for m in out["location_map_full"].numpy()])
    np.testing.assert_allclose(r.primary, ref, atol=1e-5)  # the model's own map
    r1 = explain(m3_net, x, "prototype", class_idx=1)
    r0 = explain(m3_net, x, "prototype", class_idx=0)
    same = r.class_idx == 1
    np.testing.assert_allclose(r1.primary[same], r.primary[same], atol=1e-5)
    assert not np.allclose(r1.primary, r0.primary)  # the prototype choice matters
    np.testing.assert_array_equal(r1.primary, explain(m3_net, x, "prototype", class_idx=1).primary)
    g = explain(m3_net, x, "gradcam", class_idx=1)
    assert g.params["layer"] == "trunk.stages.3" and g.primary.shape == (len(x), S, S)
    with pytest.raises(ValueError):
        explain(m3_net, x, "prototype", class_idx=2)


def test_m3lung_prototype_map_is_tied_to_the_blob(m3_net, test_set):
    """The prototype-distance map (3x3 ResBlock3 grid on 48 px) carries blob information, but on this toy it does
    not point *at* the blob: the blob region is on average *farther* from the 'with lesion' prototype than the
    background (measured with the Euclidean reading, whose feature norm dominates; the cosine default still
    fails the orientation test). Measured at 64 px / 4 epochs: map energy inside
    0.018 vs chance 0.028, its complement 0.070 (pointing 0.30 vs random 0.05). Assert only what holds here:
    the map differs between blob and background; orientation is the xfail test below."""
    x, masks, _ = test_set
    p = explain(m3_net, x, "prototype", class_idx=1).primary
    inside, outside = p[masks].mean(), p[~masks].mean()
    assert abs(inside - outside) > 0.1, (inside, outside)


@pytest.mark.xfail(strict=False, reason="M3Lung prototype-distance map is anti-localised on the toy task "
                                        "(closest-to-prototype != blob); see report / docs/explanations.md")
def test_m3lung_prototype_map_points_at_blob(m3_net, test_set):
    x, masks, _ = test_set
    m = _means({"p": explain(m3_net, x, "prototype", class_idx=1).primary}, masks)["p"]
    assert m["pointing_game"] >= 0.5 and m["energy_inside"] > 2 * float(masks.mean())


# ------------------------------------------------------------------------------------------ plumbing
def test_families_defaults_and_errors(ms_net, jcs_net, m3_net, test_set):
    x = test_set[0][:2]
    assert model_family(ms_net) == "multiscale_cam" and model_family("multiscale_cam_cpu") == "multiscale_cam"
    assert model_family(jcs_net) == "jcs" and model_family("jcs_classifier") == "jcs"
    assert model_family(m3_net) == "m3lung" and model_family("m3lung_slice") == "m3lung"
    assert default_method(ms_net) == "integrated_gradients"
    assert default_method("jcs") == "gradcam" and default_method(m3_net) == "prototype"
    assert "cam" in applicable_methods(ms_net) and "prototype" in applicable_methods("m3lung")
    with pytest.raises(ValueError):
        explain(jcs_net, x, "cam")
    with pytest.raises(ValueError):
        explain(jcs_net, x, "prototype")
    with pytest.raises(ValueError):
        explain(ms_net, x, "occlusion")
    with pytest.raises(ValueError):
        explain(ms_net, x[0], "cam")  # not (B, C, H, W)
    # a plain CNN: generic Grad-CAM on its last conv, generic IG on the logit
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    assert model_family(net) == "generic" and default_method(net) == "gradcam"
    r = explain(net, x, None, class_idx=0)
    assert r.method == "gradcam" and r.primary.shape == (2, S, S)
    r = explain(net, x, "integrated_gradients", class_idx=0, n_steps=5)
    assert set(r.maps) == {"ig"} and r.params["n_steps"] == 5


def test_explain_slices_numpy_and_batching(ms_net, test_set):
    x = test_set[0][:5]
    a = explain_slices(ms_net, "multiscale_cam", x[:, 0].numpy(), ["cam", "gradcam"], class_idx=1, batch_size=2)
    b = explain_slices(ms_net, None, x, ["cam", "gradcam"], class_idx=1, batch_size=16)
    assert set(a) == {"cam", "gradcam"}
    for k in a:
        assert a[k].primary.shape == (5, S, S)
        np.testing.assert_allclose(a[k].primary, b[k].primary, atol=1e-5)
    one = a["cam"][2]
    assert one.primary.shape == (1, S, S) and one.class_idx.tolist() == [1]


def test_to_slice_grid_registration():
    from pneumoct.preprocess.slice_input import SliceCrop

    size, box, shape = 32, (10, 74, 20, 52), (100, 90)  # box 64 rows x 32 cols -> zoom 2 x 1
    crop = SliceCrop(box=box, image=np.zeros((size, size), np.float32), slice_shape=shape)
    for p in ((8, 20), (0, 0), (31, 5)):
        m = np.zeros((size, size), np.float32)
        m[p] = 1.0
        full = to_slice_grid(m, crop)
        assert full.shape == shape
        # pixel-area convention: crop pixel p covers slice rows r0 + [p, p+1) * 64/32, its centre at +1.0
        exp_r = box[0] + (p[0] + 0.5) * (box[1] - box[0]) / size - 0.5
        exp_c = box[2] + (p[1] + 0.5) * (box[3] - box[2]) / size - 0.5
        rr, cc = np.nonzero(full >= full.max() - 1e-6)
        assert abs(rr.mean() - exp_r) <= 1.0 and abs(cc.mean() - exp_c) <= 1.0, (p, rr, cc, exp_r, exp_c)
        assert full[:box[0]].max() == 0 and full[:, box[3]:].max() == 0  # nothing outside the lung box
    stack = to_slice_grid(np.ones((2, size, size), np.float32), crop)
    assert stack.shape == (2,) + shape


def test_benchmark_script_selects_rows_and_writes_json(ms_net, test_set, tmp_path):
    spec = importlib.util.spec_from_file_location("explain_eval", REPO / "benchmarks" / "explain_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, masks, _ = test_set
    n = 6
    imgs = np.concatenate([x[:n, 0].numpy(), np.zeros((2, S, S), np.float32)])
    lesion_mask = np.concatenate([masks[:n], np.zeros((2, S, S), bool)]).astype(np.uint8)
    has_mask = np.array([True] * (n - 1) + [False, True, False])
    rows = mod.lesion_rows(lesion_mask, has_mask)
    assert rows.tolist() == list(range(n - 1))  # masked, non-empty only
    report = mod.evaluate_rows(ms_net, "multiscale_cam", imgs[rows], lesion_mask[rows], ["cam"],
                               data="toy", tolerance_px=TOL)
    out = tmp_path / "explain_toy.json"
    mod.write_report(report, out)
    import json

    back = json.loads(out.read_text())
    assert back["data"] == "toy" and back["methods"]["cam"]["n"] == n - 1
    assert back["methods"]["cam"]["pointing_game"] >= back["methods"]["random"]["pointing_game"]
