"""Issue 12: the explanation scores (pneumoct.explain.scores) on 3D maps of a volume, with a region (the lungs) and
anisotropic voxels (tolerance in mm) — the way experiments/volumetric_maps.py scores the 3D systems' maps."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pneumoct.explain import energy_inside, pointing_game, threshold_iou_dice
from pneumoct.explain.scores import threshold_map

SHAPE = (12, 40, 40)  # (Z, Y, X)
SPACING = (5.0, 1.0, 1.0)  # mm: thick slices, as in CT


def ball(centre, radius_mm, spacing=SPACING, shape=SHAPE):
    zz, yy, xx = np.indices(shape)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre, spacing))
    return d2 <= radius_mm ** 2


def bump(centre, sigma_mm, spacing=SPACING, shape=SHAPE):
    zz, yy, xx = np.indices(shape)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre, spacing))
    return np.exp(-d2 / (2 * sigma_mm ** 2))


@pytest.fixture
def scene():
    lung = np.zeros(SHAPE, bool)
    lung[1:11, 5:35, 5:35] = True
    lesion = ball((6, 12, 12), 5.0)  # 1 slice up/down (5 mm), 5 px in plane
    assert lesion.any() and not (lesion & ~lung).any()
    return lung, lesion


def test_map_peaked_on_the_lesion_scores_high(scene):
    lung, lesion = scene
    good = bump((6, 12, 12), 3.0) * lung
    assert pointing_game(good, lesion, 0.0, spacing=SPACING, region=lung) is True
    e = energy_inside(good, lesion, region=lung)
    chance = lesion.sum() / lung.sum()
    assert e > 0.4 and e > 20 * chance  # chance (a uniform map) ~ 0.02
    iou, dice = threshold_iou_dice(good, lesion, region=lung)
    assert dice > 0.5 and 0 < iou <= dice


def test_map_peaked_elsewhere_scores_low(scene):
    lung, lesion = scene
    bad = bump((6, 28, 28), 3.0) * lung  # same slice, 16 mm * sqrt(2) away in plane
    assert pointing_game(bad, lesion, 10.0, spacing=SPACING, region=lung) is False
    e = energy_inside(bad, lesion, region=lung)
    assert e < lesion.sum() / lung.sum()  # below the chance level of a uniform map
    assert threshold_iou_dice(bad, lesion, region=lung) == (0.0, 0.0)


def test_tolerance_in_mm_uses_the_slice_spacing(scene):
    lung, lesion = scene
    # maximum 3 slices above the lesion centre: the lesion reaches 1 slice up, so 2 slices = 10 mm to go
    m = bump((3, 12, 12), 1.0) * lung
    assert pointing_game(m, lesion, 9.9, spacing=SPACING, region=lung) is False
    assert pointing_game(m, lesion, 10.0, spacing=SPACING, region=lung) is True  # inclusive
    assert pointing_game(m, lesion, 2.0, region=lung) is True  # without spacing: 2 voxels
    with pytest.raises(ValueError):
        pointing_game(m, lesion, 10.0, spacing=(1.0, 1.0))  # one value per axis


def test_region_restricts_the_map_and_the_mask(scene):
    lung, lesion = scene
    outside = np.zeros(SHAPE)
    outside[0, 0, 0] = 10.0  # the global maximum, outside the lungs
    m = bump((6, 12, 12), 3.0) * lung + outside
    assert pointing_game(m, lesion, 0.0) is False  # points outside the lungs
    assert pointing_game(m, lesion, 0.0, region=lung) is True  # only the lungs are read
    e_all, e_lung = energy_inside(m, lesion), energy_inside(m, lesion, region=lung)
    assert e_lung > e_all
    # a map constant inside the region earns nothing, whatever it does outside
    flat = lung.astype(float) + outside
    assert pointing_game(flat, lesion, 50.0, region=lung) is False
    assert threshold_map(flat, region=lung).sum() == 0
    assert threshold_iou_dice(flat, lesion, region=lung) == (0.0, 0.0)
    # the isodata threshold is computed inside the region: the lungs' zeros outside do not pull it down
    fg = threshold_map(bump((6, 12, 12), 3.0) * lung + 0.2 * lung, region=lung)
    assert not (fg & ~lung).any() and fg[6, 12, 12] and not fg[6, 30, 30]
    # an empty mask inside the region: undefined
    assert pointing_game(m, lesion & ~lung, region=lung) is None
    assert energy_inside(m, np.zeros(SHAPE), region=lung) is None
    with pytest.raises(ValueError):
        energy_inside(m, lesion, region=lung[:, :10])


def test_2d_pointing_game_unchanged_against_distance_transform():
    """The direct nearest-lesion distance equals the distance transform the 2D version used."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        m = ndi.gaussian_filter(rng.random((30, 30)), 2)
        mask = ndi.gaussian_filter(rng.random((30, 30)), 3) > 0.53
        if not mask.any():
            continue
        tol = float(rng.uniform(0, 12))
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        expected = bool(mask[r, c] or ndi.distance_transform_edt(~mask)[r, c] <= tol)
        assert pointing_game(m, mask, tol) is expected
    with pytest.raises(ValueError):
        pointing_game(np.zeros(5), np.zeros(5))  # 1-D is not a map
