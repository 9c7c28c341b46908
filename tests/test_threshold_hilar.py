"""Threshold baseline: hilar bronchus-and-vessel blobs are not lesions, peripheral lesions still are."""
from __future__ import annotations

import json

import numpy as np
from scipy import ndimage as ndi

from pneumoct.quantify import find_lesions_threshold
from pneumoct.types import LUNG_LEFT, LUNG_RIGHT

SP = (2.5, 1.0, 1.0)


def _chest(seed: int = 0):
    """Body +40 HU, two ellipsoid lungs -850 HU with a soft-tissue mediastinum between them; at mid height in the
    right lung a hilar blob resting on the mediastinum (a main bronchus, 8 mm lumen of air in a 5 mm +40 HU wall and
    cuff, beside a 15 mm +40 HU pulmonary artery, 30 mm long) and, at the same height, a peripheral consolidation
    sphere (r 9 mm) against nothing but aerated lung; Gaussian blur and noise."""
    rng = np.random.default_rng(seed)
    Z, Y, X = 40, 120, 160
    zz, yy, xx = np.meshgrid(np.arange(Z) * SP[0], np.arange(Y) * SP[1], np.arange(X) * SP[2], indexing="ij")
    cy, W = Y * SP[1] / 2, X * SP[2]
    hu = np.full((Z, Y, X), -1000.0)
    hu[((yy - cy) / (0.46 * Y)) ** 2 + ((xx - W / 2) / (0.48 * W)) ** 2 <= 1] = 40
    inz = (zz >= 2 * SP[0]) & (zz <= (Z - 3) * SP[0])
    lung = np.zeros((Z, Y, X), np.uint8)
    lung[(((yy - cy) / (0.36 * Y)) ** 2 + ((xx - 0.27 * W) / (0.18 * W)) ** 2 <= 1) & inz] = LUNG_RIGHT
    lung[(((yy - cy) / (0.36 * Y)) ** 2 + ((xx - 0.73 * W) / (0.18 * W)) ** 2 <= 1) & inz] = LUNG_LEFT
    hu[lung > 0] = -850
    medial_x = 0.45 * W  # medial edge of the right lung (mediastinum beyond)
    zmid = Z * SP[0] / 2
    inhil = np.abs(zz - zmid) <= 15.0
    # main bronchus: centre 8 mm lateral of the mediastinum, lumen r 4 mm, wall and cuff to r 9 mm
    rb = np.hypot(yy - (cy - 4.0), xx - (medial_x - 8.0))
    wall = (rb <= 9.0) & (rb > 4.0) & inhil & (lung == LUNG_RIGHT)
    lumen = (rb <= 4.0) & inhil & (lung == LUNG_RIGHT)
    # pulmonary artery beside it, r 7.5 mm, touching the mediastinum
    ra = np.hypot(yy - (cy + 11.0), xx - (medial_x - 7.0))
    artery = (ra <= 7.5) & inhil & (lung == LUNG_RIGHT)
    hu[wall | artery] = 40
    hu[lumen] = -1000
    hilar = (wall | artery) & (lung == LUNG_RIGHT)
    # peripheral consolidation at the same height, lateral in the right lung
    les = (np.sqrt((zz - zmid) ** 2 + (yy - cy) ** 2 + (xx - 0.16 * W) ** 2) <= 9.0) & (lung == LUNG_RIGHT)
    hu[les] = 20
    hu = ndi.gaussian_filter(hu, (0.3, 0.5, 0.5)) + rng.normal(0, 15, hu.shape)
    return hu.astype(np.int16), lung, hilar, les


def test_hilar_blob_dropped_peripheral_lesion_kept():
    hu, lung, hilar, les = _chest()
    f = find_lesions_threshold(hu, lung, SP)
    found = f.mask > 0
    assert np.mean(found[hilar]) < 0.1, "hilar bronchus + artery is not a lesion"
    assert np.mean(found[les]) > 0.8, "peripheral consolidation is still found"
    assert f.params["consolidation_components_dropped"]["hilar"] >= 1
    json.dumps(f.params, allow_nan=False)


def test_hilar_rule_is_what_drops_it():
    """With the hilar rule switched off the same blob is marked (the test case really exercises the rule)."""
    hu, lung, hilar, les = _chest()
    off = find_lesions_threshold(hu, lung, SP, hilar_max_ml=0.0)
    assert np.mean(off.mask[hilar] > 0) > 0.5
    assert off.params["consolidation_components_dropped"]["hilar"] == 0


def test_large_medial_consolidation_kept():
    """A consolidation larger than ``hilar_max_ml`` that rests on the mediastinum (perihilar pneumonia) is kept."""
    hu, lung, hilar, les = _chest(seed=1)
    Z, Y, X = hu.shape
    zz, yy, xx = np.meshgrid(np.arange(Z) * SP[0], np.arange(Y) * SP[1], np.arange(X) * SP[2], indexing="ij")
    big = (np.sqrt(((zz - Z * SP[0] / 2) / 1.3) ** 2 + (yy - 0.5 * Y) ** 2 + (xx - 0.42 * X) ** 2) <= 20.0)
    big &= lung == LUNG_RIGHT
    assert big.sum() * np.prod(SP) / 1000 > 15.0
    h = hu.astype(np.float64)
    h[big] = 20 + np.random.default_rng(2).normal(0, 15, big.sum())
    f = find_lesions_threshold(h.astype(np.int16), lung, SP)
    assert np.mean(f.mask[big] > 0) > 0.8


def test_hilar_blob_reaching_lateral_is_dropped():
    """The lobar bronchi and interlobar arteries reach 3-4 cm lateral of the mediastinum: a hilar blob resting on
    the mediastinum and reaching 45 mm out (a third of it beyond 30 mm) is hilar at the default depth (40 mm), not
    at 30 mm (the old setting, which left such a blob of a healthy phantom marked as consolidation)."""
    hu, lung, hilar, les = _chest(seed=3)
    Z, Y, X = hu.shape
    zz, yy, xx = np.meshgrid(np.arange(Z) * SP[0], np.arange(Y) * SP[1], np.arange(X) * SP[2], indexing="ij")
    W, cy = X * SP[2], Y * SP[1] / 2
    medial_x = 0.55 * W  # medial edge of the left lung (no lesion there)
    h = hu.astype(np.float64)
    h[hilar] = -850 + np.random.default_rng(5).normal(0, 15, hilar.sum())
    dx = np.clip(xx - medial_x, 0.0, None)  # mm lateral of the mediastinum; widens outward like a hilum
    blob = ((np.abs(yy - cy) <= 3.0 + dx * 6.0 / 45.0) & (np.abs(zz - Z * SP[0] / 2) <= 8.0) & (dx <= 45.0)
            & (lung == LUNG_LEFT))
    assert blob.sum() * np.prod(SP) / 1000 < 15.0
    h[blob] = 40 + np.random.default_rng(4).normal(0, 15, blob.sum())
    h = h.astype(np.int16)
    old = find_lesions_threshold(h, lung, SP, hilar_depth_mm=30.0)
    assert np.mean(old.mask[blob] > 0) > 0.5, "the case must exercise the depth (kept at 30 mm)"
    f = find_lesions_threshold(h, lung, SP)
    assert np.mean(f.mask[blob] > 0) < 0.1
    assert f.params["consolidation_components_dropped"]["hilar"] >= 1
    assert np.mean(f.mask[les] > 0) > 0.8, "the peripheral consolidation is still found"


def test_depth_from_the_mediastinum_on_its_box_equals_the_whole_slice_transform():
    """The hilar rule's depth runs the Euclidean transform on the mediastinum's box grown by the depth it tests:
    within that depth the same distances as on the whole slice; beyond it only "farther" is kept."""
    from pneumoct.quantify.threshold_baseline import _depth_from

    rng = np.random.default_rng(3)
    med = np.zeros((6, 90, 110), bool)
    med[1, 30:50, 50:58] = True
    med[2, 10:14, 5:9] = True  # near the edge: the grown box is clipped
    med[4] = rng.random((90, 110)) > 0.995
    zs = np.array([True, True, True, False, True, True])  # 0 and 5: no mediastinum there
    sp = (1.2, 0.9)
    depth = _depth_from(med, zs, sp, 20.0)
    for z in (1, 2, 4):
        full = ndi.distance_transform_edt(~med[z], sampling=sp)
        np.testing.assert_array_equal(depth[z] <= 20.0, full <= 20.0)
        near = full <= 20.0
        np.testing.assert_allclose(depth[z][near], full[near], rtol=1e-6)
    assert np.isinf(depth[[0, 5]]).all() and (depth[3] == 0).all()
