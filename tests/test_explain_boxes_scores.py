"""Tests for pneumoct.explain: saliency -> boxes (Hu et al.), map utilities, and explanation scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from pneumoct.explain import (
    Box,
    box_hit_rate,
    boxes_from_saliency,
    draw_boxes_rgb,
    energy_inside,
    heat_colormap,
    joint_saliency,
    normalise_map,
    overlay_map_rgb,
    pointing_game,
    resize_map_to,
    score_explanations,
    threshold_iou_dice,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEG_PNG = SHARED_DATA / "covid19-ct-seg-png"


def blob(shape, centre, sigma, amp=1.0):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return amp * np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2.0 * sigma**2))


def disc(shape, centre, radius):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def contains(b: Box, r, c) -> bool:
    return b.r0 <= r < b.r1 and b.c0 <= c < b.c1


# ------------------------------------------------------------------------------------------------ boxes
def test_two_blobs_give_two_boxes_around_them():
    shape = (128, 128)
    sal = blob(shape, (35, 40), 6.0) + blob(shape, (90, 95), 4.0, amp=0.9)
    sal = -sal  # the pipeline takes |saliency|: sign must not matter
    boxes = boxes_from_saliency(sal, min_area_px=10)
    assert len(boxes) == 2
    big = [b for b in boxes if contains(b, 35, 40)]
    small = [b for b in boxes if contains(b, 90, 95)]
    assert len(big) == 1 and len(small) == 1
    # boxes are tight-ish around the blobs, not the whole image
    for b, (r, c) in ((big[0], (35, 40)), (small[0], (90, 95))):
        assert b.r1 - b.r0 < 40 and b.c1 - b.c0 < 40
        assert abs((b.r0 + b.r1 - 1) / 2 - r) <= 1.5 and abs((b.c0 + b.c1 - 1) / 2 - c) <= 1.5
        assert b.area > 10 and b.area <= b.box_area
        assert 0 < b.score <= b.peak
    assert big[0].area > small[0].area
    assert boxes[0].score >= boxes[1].score  # sorted by score


def test_min_area_removes_small_blob():
    shape = (128, 128)
    sal = blob(shape, (35, 40), 8.0) + blob(shape, (90, 95), 2.0)
    all_boxes = boxes_from_saliency(sal, min_area_px=1)
    assert len(all_boxes) == 2
    small_area = min(b.area for b in all_boxes)
    big_area = max(b.area for b in all_boxes)
    kept = boxes_from_saliency(sal, min_area_px=small_area + 1)
    assert len(kept) == 1 and contains(kept[0], 35, 40) and kept[0].area == big_area


def test_closing_merges_split_blob_and_zero_map_gives_no_boxes():
    # a disc split by a 1-pixel gap: closing (dilation then erosion) joins it into one component
    shape = (64, 64)
    fg = disc(shape, (32, 32), 12).astype(float)
    fg[:, 32] = 0.0
    assert len(boxes_from_saliency(fg, sigma=0.01, closing_radius=0, min_area_px=5)) == 2
    assert len(boxes_from_saliency(fg, sigma=0.01, closing_radius=2, min_area_px=5)) == 1
    assert boxes_from_saliency(np.zeros(shape)) == []
    assert boxes_from_saliency(np.full(shape, 3.0)) == []


# ------------------------------------------------------------------------------------------------ map utilities
def test_joint_saliency_suppresses_blob_present_in_one_map_only():
    shape = (96, 96)
    shared = blob(shape, (30, 30), 5.0)
    only_in_a = blob(shape, (70, 70), 5.0)
    a = shared + only_in_a
    b = shared + 0.02 * np.random.default_rng(1).random(shape)
    c = 0.5 * shared
    j = joint_saliency([a, b, c])
    assert j.shape == shape and j.min() >= 0 and j.max() <= 1
    assert j[30, 30] > 0.5
    assert j[70, 70] < 0.01 * j[30, 30]
    boxes_a = boxes_from_saliency(a)
    boxes_j = boxes_from_saliency(j)
    assert len(boxes_a) == 2 and len(boxes_j) == 1 and contains(boxes_j[0], 30, 30)
    with pytest.raises(ValueError):
        joint_saliency([a, a[:10]])


def test_normalise_map():
    m = np.array([[2.0, 4.0], [6.0, np.nan]])
    n = normalise_map(m)
    # NaN counts as 0, so here it is the minimum
    assert n.min() == 0.0 and n.max() == 1.0 and n[1, 1] == 0.0 and n[0, 1] == pytest.approx(4 / 6)
    assert normalise_map(np.array([[2.0, 4.0], [6.0, 3.0]]))[0, 1] == pytest.approx(2 / 4)
    assert not normalise_map(np.full((3, 3), 5.0)).any()


def test_resize_keeps_peak_relative_position():
    small = np.zeros((8, 8))
    small[2, 5] = 1.0  # pixel centre at (2.5/8, 5.5/8) of the field of view
    big = resize_map_to(small, (64, 64))
    assert big.shape == (64, 64)
    r, c = np.unravel_index(np.argmax(big), big.shape)
    assert abs((r + 0.5) / 64 - 2.5 / 8) <= 1 / 64
    assert abs((c + 0.5) / 64 - 5.5 / 8) <= 1 / 64
    # centroid of the stretched map is registered too (symmetric bilinear spread)
    cr, cc = ndi.center_of_mass(big)
    assert abs((cr + 0.5) / 64 - 2.5 / 8) < 0.01 and abs((cc + 0.5) / 64 - 5.5 / 8) < 0.01
    # non-square, downsizing also works; a constant map stays constant
    assert resize_map_to(np.ones((7, 9)), (3, 20)).shape == (3, 20)
    assert np.allclose(resize_map_to(np.full((5, 5), 2.0), (13, 11)), 2.0)


def test_overlay_and_draw_boxes():
    gray = np.full((32, 32), 100, dtype=np.uint8)
    m = np.zeros((32, 32))
    m[8:16, 8:16] = 1.0
    ov = overlay_map_rgb(gray, m, alpha=0.5)
    assert ov.shape == (32, 32, 3) and ov.dtype == np.uint8
    assert (ov[0, 0] == 100).all()  # zero map -> untouched
    assert not (ov[10, 10] == 100).all()  # salient -> tinted
    assert tuple(heat_colormap(1.0)) != tuple(heat_colormap(0.0))
    ov_small = overlay_map_rgb(gray, np.ones((4, 4)), alpha=1.0)  # low-res map is resized
    assert (ov_small == heat_colormap(1.0)).all()
    img = draw_boxes_rgb(gray, [Box(4, 10, 5, 20, 1.0, 1.0, 10)], colour=(255, 0, 0))
    assert tuple(img[4, 12]) == (255, 0, 0) and tuple(img[9, 12]) == (255, 0, 0)
    assert tuple(img[7, 5]) == (255, 0, 0) and tuple(img[7, 19]) == (255, 0, 0)
    assert tuple(img[7, 12]) == (100, 100, 100) and tuple(img[10, 12]) == (100, 100, 100)
    assert (gray == 100).all()  # input not modified


# ------------------------------------------------------------------------------------------------ scores
def test_pointing_game_hit_miss_tolerance():
    shape = (100, 100)
    mask = np.zeros(shape, bool)
    mask[40:50, 40:50] = True
    inside = blob(shape, (45, 45), 3)
    near = blob(shape, (45, 59), 3)  # 10 px right of the mask's last column (49)
    far = blob(shape, (45, 80), 3)  # 31 px away
    assert pointing_game(inside, mask) is True
    assert pointing_game(near, mask, tolerance_px=15) is True
    assert pointing_game(near, mask, tolerance_px=5) is False
    assert pointing_game(near, mask, tolerance_px=10) is True  # boundary: distance exactly 10
    assert pointing_game(far, mask, tolerance_px=15) is False
    assert pointing_game(inside, np.zeros(shape, bool)) is None  # empty mask
    assert pointing_game(np.zeros(shape), mask) is False  # zero map: no maximum to point with
    with pytest.raises(ValueError):
        pointing_game(np.zeros((10, 10)), mask)


def test_energy_inside_known_fraction():
    mask = np.zeros((20, 20), bool)
    mask[:5, :] = True  # 100 px
    m = np.zeros((20, 20))
    m[:5, :] = 3.0  # energy 300 inside
    m[10:15, :] = 1.0  # energy 100 outside
    m[5, :] = -50.0  # negative evidence is ignored
    assert energy_inside(m, mask) == pytest.approx(0.75)
    assert energy_inside(np.ones((20, 20)), mask) == pytest.approx(0.25)  # uniform map = area fraction
    assert energy_inside(np.zeros((20, 20)), mask) == 0.0
    assert energy_inside(-np.ones((20, 20)), mask) == 0.0
    assert energy_inside(m, np.zeros((20, 20), bool)) is None


def test_threshold_iou_dice():
    shape = (64, 64)
    mask = disc(shape, (20, 20), 8)
    iou, dice = threshold_iou_dice(mask.astype(float), mask)
    assert iou == pytest.approx(1.0) and dice == pytest.approx(1.0)
    iou, dice = threshold_iou_dice(disc(shape, (50, 50), 8).astype(float), mask)
    assert iou == 0.0 and dice == 0.0
    # float threshold on the normalised map: half of the mask predicted
    m = np.zeros(shape)
    m[:, :20] = 1.0
    half = np.zeros(shape, bool)
    half[:, 10:30] = True
    iou, dice = threshold_iou_dice(m, half, threshold=0.5)
    assert iou == pytest.approx(1 / 3) and dice == pytest.approx(0.5)
    assert threshold_iou_dice(np.zeros(shape), mask) == (0.0, 0.0)
    assert threshold_iou_dice(mask.astype(float), np.zeros(shape, bool)) == (None, None)


def test_box_hit_rate():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # lesion 1
    mask[60:80, 60:80] = True  # lesion 2
    on1 = Box(8, 22, 8, 22, 1, 1, 100)  # IoU with lesion 1 bbox = 100/196
    graze2 = Box(75, 95, 75, 95, 1, 1, 100)  # overlaps lesion 2 by 5x5 px: IoU = 25/775 < 0.1
    away = Box(40, 50, 0, 10, 1, 1, 100)
    r = box_hit_rate([on1, graze2, away], mask, iou_threshold=0.1)
    assert r["n_boxes"] == 3 and r["n_lesions"] == 2
    assert r["box_precision"] == pytest.approx(1 / 3) and r["lesion_recall"] == pytest.approx(0.5)
    r = box_hit_rate([on1, graze2, away], mask, iou_threshold=None)  # any overlap
    assert r["box_precision"] == pytest.approx(2 / 3) and r["lesion_recall"] == pytest.approx(1.0)
    r = box_hit_rate([], mask)
    assert r["box_precision"] is None and r["lesion_recall"] == 0.0
    r = box_hit_rate([on1], np.zeros((100, 100), bool))
    assert r["box_precision"] is None and r["lesion_recall"] is None and r["n_lesions"] == 0


def test_score_explanations_aggregates():
    shape = (64, 64)
    masks = [disc(shape, (20, 20), 6), disc(shape, (40, 44), 8), np.zeros(shape, bool)]
    good = [m.astype(float) for m in masks[:2]] + [np.ones(shape)]
    wrong = [disc(shape, (50, 50), 6).astype(float), np.zeros(shape), np.ones(shape)]
    half = [good[0], wrong[1], np.ones(shape)]
    lowres = [resize_map_to(g, (16, 16)) for g in good]  # resized onto the mask by score_explanations
    res = score_explanations({"good": good, "wrong": wrong, "half": half, "lowres": lowres}, masks)
    g, w, h = res["good"], res["wrong"], res["half"]
    for r in res.values():
        assert r["n_images"] == 3 and r["n_scored"] == 2 and r["n_empty_mask"] == 1
    assert g["pointing_game"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert g["dice"]["mean"] == pytest.approx(1.0) and g["energy_inside"]["mean"] == pytest.approx(1.0)
    assert g["lesion_recall"]["mean"] == pytest.approx(1.0) and g["box_precision"]["mean"] == pytest.approx(1.0)
    assert w["pointing_game"]["mean"] == 0.0 and w["dice"]["mean"] == 0.0 and w["energy_inside"]["mean"] == 0.0
    assert w["box_precision"]["n"] == 1  # the zero map gives no box -> precision undefined there
    assert h["pointing_game"] == {"mean": 0.5, "std": pytest.approx(0.5), "n": 2}
    assert h["dice"]["mean"] == pytest.approx(0.5) and h["dice"]["std"] == pytest.approx(0.5)
    assert res["lowres"]["pointing_game"]["mean"] == 1.0 and res["lowres"]["dice"]["mean"] > 0.7
    with pytest.raises(ValueError):
        score_explanations({"x": good[:1]}, masks)
    empty = score_explanations({"x": [np.ones(shape)]}, [np.zeros(shape, bool)])["x"]
    assert empty["dice"] == {"mean": None, "std": None, "n": 0} and empty["n_empty_mask"] == 1


# ------------------------------------------------------------------------------------------------ real data
def test_scores_rank_blurred_gt_far_above_random_on_real_slices():
    """Validates the scoring itself: the blurred ground-truth mask is a stand-in "perfect" saliency map, a random
    map is the control. Data: covid19-ct-seg-png (COVID-19-CT-Seg, 2D PNG conversion)."""
    if not (SEG_PNG / "covid").is_dir():
        pytest.skip(f"real data not found at {SEG_PNG}")
    from PIL import Image

    files = sorted((SEG_PNG / "covid").glob("*.png"))
    if len(files) < 30:
        pytest.skip("fewer than 30 slices available")
    sel = files[:: len(files) // 30][:30]
    masks = [np.asarray(Image.open(f).convert("L")) > 127 for f in sel]
    masks = [m for m in masks if m.any()]
    assert len(masks) >= 25
    rng = np.random.default_rng(0)
    perfect = [ndi.gaussian_filter(m.astype(np.float64), 4.0) for m in masks]
    random = [rng.random(m.shape) for m in masks]
    res = score_explanations({"blurred_gt": perfect, "random": random}, masks)
    p, r = res["blurred_gt"], res["random"]
    assert p["n_scored"] == r["n_scored"] == len(masks)
    assert p["pointing_game"]["mean"] >= 0.95 and r["pointing_game"]["mean"] <= 0.4
    assert p["energy_inside"]["mean"] >= 0.5 and r["energy_inside"]["mean"] <= 0.1
    assert p["energy_inside"]["mean"] > 5 * r["energy_inside"]["mean"]
    assert p["dice"]["mean"] >= 0.6 and r["dice"]["mean"] <= 0.15
    assert p["lesion_recall"]["mean"] > r["lesion_recall"]["mean"] + 0.4
