"""Hand-computed checks of pneumoct.evaluate.segmentation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pneumoct.evaluate.segmentation import (
    aggregate,
    assd,
    case_metrics,
    dice,
    e_measure,
    hd95,
    iou,
    mae,
    normalized_surface_dice,
    precision,
    rmsd,
    s_measure,
    segmentation_report,
    sensitivity,
    specificity,
    surface,
    surface_distances,
)

# 1 x 6 "1D-like" masks: pred covers columns 0-2, truth columns 1-3.
P1 = np.array([[1, 1, 1, 0, 0, 0]], dtype=bool)
T1 = np.array([[0, 1, 1, 1, 0, 0]], dtype=bool)  # TP = 2, FP = 1, FN = 1, TN = 2


def square(shape=(10, 10), r0=2, c0=2, size=4):
    m = np.zeros(shape, dtype=bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def brute_distances(pred, truth, spacing):
    """Directed surface distances by brute force over all surface-voxel pairs (reference for the EDT version)."""
    sp = np.asarray(spacing, dtype=float)
    a = np.argwhere(surface(pred)) * sp
    b = np.argwhere(surface(truth)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


# ------------------------------------------------------------------------------------------------------------ overlap
def test_overlap_metrics_by_hand():
    assert dice(P1, T1) == pytest.approx(2 * 2 / (3 + 3))
    assert iou(P1, T1) == pytest.approx(2 / 4)
    assert sensitivity(P1, T1) == pytest.approx(2 / 3)
    assert precision(P1, T1) == pytest.approx(2 / 3)
    assert specificity(P1, T1) == pytest.approx(2 / 3)
    # Dice and IoU are symmetric; sensitivity/precision swap
    assert dice(T1, P1) == dice(P1, T1)
    assert precision(T1, P1) == sensitivity(P1, T1)


def test_overlap_empty_conventions():
    z = np.zeros((3, 4), dtype=bool)
    m = z.copy()
    m[1, 1] = True
    # both empty: perfect agreement
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    assert sensitivity(z, z) is None and precision(z, z) is None
    assert specificity(z, z) == 1.0
    # empty prediction, non-empty truth
    assert dice(z, m) == 0.0 and iou(z, m) == 0.0
    assert sensitivity(z, m) == 0.0 and precision(z, m) is None
    # non-empty prediction, empty truth
    assert dice(m, z) == 0.0 and iou(m, z) == 0.0
    assert sensitivity(m, z) is None and precision(m, z) == 0.0
    assert specificity(m, z) == pytest.approx(11 / 12)
    # truth full: specificity undefined
    full = np.ones((3, 4), dtype=bool)
    assert specificity(m, full) is None


def test_mae():
    prob = np.array([[0.9, 0.2, 0.5, 0.0, 0.0, 1.0]])
    assert mae(prob, T1) == pytest.approx((0.9 + 0.8 + 0.5 + 1.0 + 0.0 + 1.0) / 6)
    assert mae(T1.astype(float), T1) == 0.0
    with pytest.raises(ValueError):
        mae(prob * 2, T1)
    with pytest.raises(ValueError):
        mae(prob[:, :3], T1)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice(P1, T1[:, :5])
    with pytest.raises(ValueError):
        dice(np.zeros(5, bool), np.zeros(5, bool))  # 1-D arrays are not images


# ---------------------------------------------------------------------------------------------------------- E-measure
def test_e_measure_by_hand():
    gt = np.array([[1, 1, 0, 0]], dtype=bool)
    fm = np.array([[1, 0, 0, 0]], dtype=bool)
    # a_gt = [.5, .5, -.5, -.5], a_fm = [.75, -.25, -.25, -.25]
    # phi = [12/13, -0.8, 0.8, 0.8]; enhanced = (1 + phi)^2 / 4
    expected = ((25 / 13) ** 2 / 4 + 0.2 ** 2 / 4 + 2 * 1.8 ** 2 / 4) / 4
    assert e_measure(fm, gt) == pytest.approx(expected, rel=1e-9)


def test_e_measure_identical_and_complementary():
    t = square()
    assert e_measure(t, t) == pytest.approx(1.0, abs=1e-12)
    assert e_measure(~t, t) == pytest.approx(0.0, abs=1e-12)
    # 3D: the formula is voxel-wise
    v = np.zeros((3, 6, 6), bool)
    v[1, 2:4, 2:4] = True
    assert e_measure(v, v) == pytest.approx(1.0, abs=1e-12)
    assert e_measure(~v, v) == pytest.approx(0.0, abs=1e-12)


def test_e_measure_special_cases():
    z = np.zeros((4, 4), bool)
    m = z.copy()
    m[0, :3] = True  # 3 of 16 pixels
    full = np.ones((4, 4), bool)
    assert e_measure(z, z) == 1.0  # empty GT: 1 - FM, averaged
    assert e_measure(m, z) == pytest.approx(13 / 16)
    assert e_measure(full, full) == 1.0  # full GT: FM, averaged
    assert e_measure(m, full) == pytest.approx(3 / 16)
    # empty prediction of a non-trivial GT: phi = 0 everywhere -> 1/4
    assert e_measure(z, m) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------- S-measure
def test_s_measure_identical_and_complementary():
    t = square()
    assert s_measure(t, t) == pytest.approx(1.0, abs=1e-9)
    assert s_measure(~t, t) < 0.3
    assert s_measure(~t, t) >= 0.0


def test_s_measure_special_cases_and_hand_value():
    z = np.zeros((4, 4), bool)
    m = z.copy()
    m[0, 0] = True
    full = np.ones((4, 4), bool)
    assert s_measure(z, z) == 1.0
    assert s_measure(m, z) == pytest.approx(15 / 16)  # 1 - mean(pred)
    assert s_measure(m, full) == pytest.approx(1 / 16)  # mean(pred)
    # empty prediction, single-pixel truth at (0, 0): u = 1/16
    # S_object = u * 0 + (1 - u) * 2*1/(1 + 1 + 0) = 15/16
    # centroid (1-based) = (1, 1): every quadrant has a constant prediction (0) and a constant truth -> SSIM = 1
    # => S = 0.5 * 15/16 + 0.5 * 1
    assert s_measure(z, m) == pytest.approx(0.5 * 15 / 16 + 0.5, rel=1e-9)


def test_s_measure_soft_and_3d():
    t = square()
    soft = np.where(t, 0.8, 0.1)
    assert 0.5 < s_measure(soft, t) < 1.0
    v = np.stack([t, t, np.zeros_like(t)])
    assert s_measure(v, v) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        s_measure(t * 2.0, t)


# ----------------------------------------------------------------------------------------------------- surface metrics
def test_square_surface_is_ring():
    assert surface(square()).sum() == 12  # 4x4 square: 16 - 2x2 interior


def test_shifted_square_one_pixel_along_x():
    t = square()
    p = np.roll(t, 1, axis=1)  # shift 1 px along x (1.0 mm)
    sp = (2.0, 1.0)
    a, b = surface_distances(p, t, sp)
    # each direction: 6 surface pixels on the other surface (0 mm), 6 at one x-step (1 mm)
    assert sorted(a.tolist()) == [0.0] * 6 + [1.0] * 6
    assert sorted(b.tolist()) == [0.0] * 6 + [1.0] * 6
    assert assd(p, t, sp) == pytest.approx(0.5)
    assert rmsd(p, t, sp) == pytest.approx(math.sqrt(0.5))
    assert hd95(p, t, sp) == pytest.approx(1.0)
    assert hd95(p, t, sp, mode="max") == pytest.approx(1.0)
    assert normalized_surface_dice(p, t, 0.5, sp) == pytest.approx(0.5)
    assert normalized_surface_dice(p, t, 1.0, sp) == pytest.approx(1.0)


def test_shifted_square_along_anisotropic_axis():
    t = square()
    p = np.roll(t, 1, axis=0)  # shift 1 px along y = 2.0 mm
    sp = (2.0, 1.0)
    a, b = surface_distances(p, t, sp)
    # pred surface: 4 side-wall pixels on the truth side walls (0), the two corners of the top row also on them (0),
    # the two inner pixels of the top row 1 mm (one x-step) from the truth side walls - closer than the 2 mm y-step -
    # and the 4 pixels of the bottom row 2 mm below the truth bottom row.  Same by symmetry for truth -> pred.
    assert sorted(a.tolist()) == [0.0] * 6 + [1.0] * 2 + [2.0] * 4
    assert sorted(b.tolist()) == sorted(a.tolist())
    assert assd(p, t, sp) == pytest.approx(10 / 12)
    assert rmsd(p, t, sp) == pytest.approx(math.sqrt((2 * 1 + 4 * 4) / 12))
    assert hd95(p, t, sp) == pytest.approx(2.0)
    assert normalized_surface_dice(p, t, 0.5, sp) == pytest.approx(12 / 24)
    assert normalized_surface_dice(p, t, 1.0, sp) == pytest.approx(16 / 24)  # tolerance below the shift
    assert normalized_surface_dice(p, t, 2.0, sp) == pytest.approx(1.0)  # tolerance at the shift
    # same shift, isotropic spacing: 1 mm
    assert hd95(p, t) == pytest.approx(1.0)


def test_shifted_square_two_pixels():
    t = square()
    p = np.roll(t, 2, axis=1)
    sp = (2.0, 1.0)
    a, b = surface_distances(p, t, sp)
    # each direction: four at 0 mm, four at 1 mm, four at 2 mm
    assert sorted(a.tolist()) == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert sorted(b.tolist()) == sorted(a.tolist())
    assert assd(p, t, sp) == pytest.approx(1.0)
    assert rmsd(p, t, sp) == pytest.approx(math.sqrt((4 * 1 + 4 * 4) / 12))
    assert hd95(p, t, sp) == pytest.approx(2.0)
    assert normalized_surface_dice(p, t, 1.0, sp) == pytest.approx(16 / 24)
    assert normalized_surface_dice(p, t, 0.0, sp) == pytest.approx(8 / 24)


def test_hd95_pooled_vs_max():
    # asymmetric case: truth is a 4x4 square, pred the square plus a far-away pixel
    t = square((12, 12), 1, 1, 4)
    p = t.copy()
    p[10, 10] = True
    a, b = surface_distances(p, t)
    assert np.all(b == 0)  # every truth surface pixel is on the pred surface
    pooled = float(np.percentile(np.concatenate([a, b]), 95))
    assert hd95(p, t) == pytest.approx(pooled)
    assert hd95(p, t, mode="max") == pytest.approx(float(np.percentile(a, 95)))
    assert hd95(p, t, mode="max") >= hd95(p, t)
    with pytest.raises(ValueError):
        hd95(p, t, mode="mean")


def test_surface_empty_conventions():
    z = np.zeros((6, 6), bool)
    m = square((6, 6), 1, 1, 3)
    assert assd(z, z) == 0.0 and rmsd(z, z) == 0.0 and hd95(z, z) == 0.0
    assert normalized_surface_dice(z, z) == 1.0
    for p, t in ((z, m), (m, z)):
        assert assd(p, t) == math.inf and rmsd(p, t) == math.inf and hd95(p, t) == math.inf
        assert normalized_surface_dice(p, t) == 0.0


def test_3d_volume_anisotropic_spacing():
    t = np.zeros((8, 8, 8), bool)
    t[2:5, 2:6, 2:6] = True
    p = np.roll(t, 1, axis=0)  # one slice up
    sp = (3.0, 0.7, 0.7)
    a, b = surface_distances(p, t, sp)
    ra, rb = brute_distances(p, t, sp)
    np.testing.assert_allclose(np.sort(a), np.sort(ra), atol=1e-9)
    np.testing.assert_allclose(np.sort(b), np.sort(rb), atol=1e-9)
    # the top face of pred (z = 5) is one slice (3 mm) above the truth's top face: max distance 3 mm
    assert a.max() == pytest.approx(3.0)
    d = np.concatenate([ra, rb])
    assert assd(p, t, sp) == pytest.approx(d.mean())
    assert hd95(p, t, sp) == pytest.approx(np.percentile(d, 95))
    assert normalized_surface_dice(p, t, 3.0, sp) == pytest.approx(1.0)
    assert normalized_surface_dice(p, t, 0.5, sp) == pytest.approx(np.mean(d <= 0.5))
    assert dice(p, t) == pytest.approx(2 * 32 / 96)
    with pytest.raises(ValueError):
        assd(p, t, (1.0, 1.0))  # wrong number of spacing values


# ------------------------------------------------------------------------------------------------------------ report
def test_case_metrics_json_and_flags():
    z = np.zeros((6, 6), bool)
    m = square((6, 6), 1, 1, 3)
    c = case_metrics(z, m, spacing=(1.0, 1.0))
    assert c["dice"] == 0.0 and c["nsd"] == 0.0
    assert c["assd"] is None and c["rmsd"] is None and c["hd95"] is None
    assert c["sensitivity"] == 0.0 and c["precision"] is None
    assert c["empty_pred"] is True and c["empty_truth"] is False
    assert c["mae"] is None
    json.dumps(c, allow_nan=False)
    same = case_metrics(m, m, prob_map=m.astype(float))
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["mae"] == 0.0


def _multiclass_cases():
    t1 = np.zeros((10, 10), np.int64)
    t1[2:6, 2:6] = 1
    t1[7:9, 7:9] = 2
    p1 = np.zeros_like(t1)
    p1[2:6, 3:7] = 1  # GGO shifted by 1 px
    p1[7:9, 7:9] = 2  # consolidation exact
    t2 = np.zeros((10, 10), np.int64)
    t2[1:4, 1:4] = 1  # no consolidation in truth
    p2 = t2.copy()
    p2[8, 8] = 2  # false-positive consolidation
    t3 = np.zeros((10, 10), np.int64)
    t3[5:8, 5:8] = 2
    p3 = np.zeros_like(t3)  # missed everything
    return [p1, p2, p3], [t1, t2, t3]


def test_report_multiclass_keys_and_conventions():
    preds, truths = _multiclass_cases()
    rep = segmentation_report(preds, truths, spacing=(2.0, 1.0), labels=(1, 2), tolerance_mm=1.0, n_boot=200)
    json.dumps(rep, allow_nan=False)
    assert rep["n_cases"] == 3 and rep["labels"] == [1, 2]
    assert set(rep["classes"]) == {"1", "2", "any"}
    ggo, cons, anyl = rep["classes"]["1"], rep["classes"]["2"], rep["classes"]["any"]
    for cls in (ggo, cons, anyl):
        assert len(cls["per_case"]) == 3
        assert {"dice", "iou", "nsd", "assd", "hd95", "rmsd", "e_measure", "s_measure", "mae"} <= set(cls["aggregate"])
    # class 1: case 1 shifted 1 px (x, 1 mm) -> Dice 2*12/32; case 2 exact; case 3 both empty
    assert ggo["per_case"][0]["dice"] == pytest.approx(24 / 32)
    assert ggo["per_case"][0]["hd95"] == pytest.approx(1.0)
    assert ggo["per_case"][1]["dice"] == 1.0
    assert ggo["per_case"][2]["dice"] == 1.0 and ggo["per_case"][2]["hd95"] == 0.0
    assert ggo["n_both_empty"] == 1 and ggo["n_empty_pred"] == 1 and ggo["n_empty_truth"] == 1
    assert ggo["aggregate"]["dice"]["mean"] == pytest.approx((24 / 32 + 1 + 1) / 3)
    # class 2: exact; false positive on empty truth; missed lesion
    assert cons["per_case"][1]["dice"] == 0.0 and cons["per_case"][1]["assd"] is None
    assert cons["per_case"][1]["sensitivity"] is None
    assert cons["per_case"][2]["precision"] is None and cons["per_case"][2]["hd95"] is None
    assert cons["n_empty_pred"] == 1 and cons["n_empty_truth"] == 1 and cons["n_both_empty"] == 0
    assert cons["aggregate"]["hd95"]["n"] == 1  # one-empty cases excluded from distance aggregates
    assert cons["aggregate"]["dice"]["n"] == 3
    assert cons["aggregate"]["dice"]["mean"] == pytest.approx(1 / 3)
    assert cons["aggregate"]["sensitivity"]["n"] == 2
    # any lesion: case 3 missed entirely
    assert anyl["per_case"][2]["dice"] == 0.0 and anyl["n_empty_pred"] == 1
    assert anyl["aggregate"]["mae"]["n"] == 0 and anyl["aggregate"]["mae"]["mean"] is None


def test_report_binary_and_prob_maps():
    t = square()
    p = np.roll(t, 1, axis=1)
    rep = segmentation_report([p, t], [t, t], spacing=[(2.0, 1.0), (1.0, 1.0)],
                              prob_maps=[p * 0.5, t.astype(float)], n_boot=100)
    assert set(rep["classes"]) == {"any"}
    pc = rep["classes"]["any"]["per_case"]
    assert pc[0]["mae"] == pytest.approx((4 * 0.5 + 4 * 1.0 + 12 * 0.5) / 100)
    assert pc[1]["mae"] == 0.0
    assert pc[0]["assd"] == pytest.approx(0.5)
    # per-class prob maps with a leading class axis
    preds, truths = _multiclass_cases()
    probs = [np.stack([(pr == 1).astype(float), (pr == 2).astype(float)]) for pr in preds]
    rep2 = segmentation_report(preds, truths, labels=(1, 2), prob_maps=probs, n_boot=50)
    assert rep2["classes"]["1"]["per_case"][1]["mae"] == 0.0
    assert rep2["classes"]["any"]["aggregate"]["mae"]["n"] == 3
    with pytest.raises(ValueError):
        segmentation_report([p], [t, t])


def test_bootstrap_interval_contains_mean_and_is_deterministic():
    vals = [0.2, 0.5, 0.9, 0.7, 0.4, None, 0.8, 0.6]
    a1 = aggregate(vals, n_boot=500, seed=3)
    a2 = aggregate(vals, n_boot=500, seed=3)
    a3 = aggregate(vals, n_boot=500, seed=4)
    assert a1 == a2
    assert a1 != a3
    assert a1["n"] == 7
    assert a1["mean"] == pytest.approx(np.mean([0.2, 0.5, 0.9, 0.7, 0.4, 0.8, 0.6]))
    assert a1["median"] == pytest.approx(0.6)
    assert a1["mean_low"] <= a1["mean"] <= a1["mean_high"]
    assert a1["median_low"] <= a1["median"] <= a1["median_high"]
    assert 0.2 <= a1["mean_low"] and a1["mean_high"] <= 0.9
    empty = aggregate([None, None])
    assert empty["n"] == 0 and empty["mean"] is None and empty["mean_low"] is None
    # report-level determinism
    preds, truths = _multiclass_cases()
    r1 = segmentation_report(preds, truths, labels=(1, 2), n_boot=100, seed=7)
    r2 = segmentation_report(preds, truths, labels=(1, 2), n_boot=100, seed=7)
    assert r1 == r2
