import numpy as np
import pytest

from pneumoct.preprocess.lung_mask import fill_holes_2d, segment_lungs, segment_lungs_2d, split_left_right
from pneumoct.types import LUNG_LEFT, LUNG_RIGHT

from toy import toy_chest

_toy_chest = toy_chest


def test_toy_chest_lungs_sides_trachea_and_consolidation():
    study, cons, trachea = _toy_chest()
    res = segment_lungs(study)
    lab = res.labels
    assert set(np.unique(lab)) == {0, LUNG_RIGHT, LUNG_LEFT}
    cols_right = np.nonzero((lab == LUNG_RIGHT).any(axis=(0, 1)))[0]
    cols_left = np.nonzero((lab == LUNG_LEFT).any(axis=(0, 1)))[0]
    # patient right is on the image left (low column index)
    assert cols_right.mean() < study.shape[2] / 2 < cols_left.mean()
    # the trachea is not lung
    assert (lab[trachea] > 0).mean() < 0.05
    assert res.info["airway"]["found"]
    # the subpleural consolidation stays inside the (left) lung mask
    assert (lab[cons] == LUNG_LEFT).mean() > 0.9
    # table and outside air are not body
    assert not res.body[:, int(study.shape[1] * 0.84), study.shape[2] // 2].any()


def test_without_fill_the_consolidation_would_be_a_hole():
    """Control: the dense lesion is not in the aerated lung, so keeping it is the closing's work."""
    study, cons, _ = _toy_chest()
    assert (study.hu[cons] > -400).mean() > 0.99


def test_empty_volume_has_no_lungs():
    study, _, _ = _toy_chest(consolidation=False)
    study.hu[:] = 40
    res = segment_lungs(study)
    assert not res.labels.any()


def test_fill_holes_2d_matches_scipy():
    from scipy import ndimage as ndi
    rng = np.random.default_rng(1)
    m = ndi.binary_opening(rng.random((64, 64)) > 0.4)
    np.testing.assert_array_equal(fill_holes_2d(m), ndi.binary_fill_holes(m))


def test_split_joined_lungs_into_two():
    m = np.zeros((6, 40, 60), bool)
    m[:, 5:35, 5:28] = True
    m[:, 5:35, 32:55] = True
    m[:, 15:18, 28:32] = True  # junction line joins them
    lab, info = split_left_right(m)
    assert "split" in info and "erosion" in info["split"]
    assert (lab[:, 20, 10] == LUNG_RIGHT).all() and (lab[:, 20, 50] == LUNG_LEFT).all()


def test_2d_variant_on_8bit_image():
    study, _, _ = _toy_chest(consolidation=False)
    sl = study.hu[study.shape[0] // 2].astype(np.float32)
    img = np.clip((sl + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    lab = segment_lungs_2d(img, pixel_mm=2.5)
    truth = sl < -600
    truth &= np.arange(sl.shape[0])[:, None] < sl.shape[0] * 0.8  # not the outside air
    from pneumoct.preprocess.lung_mask import fill_holes_2d as fh
    inside = fh(sl > -300) & (sl < -600)
    dice = 2 * ((lab > 0) & inside).sum() / ((lab > 0).sum() + inside.sum())
    assert dice > 0.9


def test_enclosed_lesion_is_filled_but_organ_dome_is_not():
    """An intrapulmonary consolidation ringed by lung is kept; a liver dome ringed by lung in one slice is not."""
    study, _, _ = toy_chest(consolidation=False)
    nz, n, _ = study.shape
    z, y, x = np.mgrid[0:nz, 0:n, 0:n].astype(np.float32)
    sz, px = study.spacing[0], study.spacing[1]
    cy, lx_right, lx_left = n * 0.48, n / 2 - n * 0.20, n / 2 + n * 0.20
    hu = study.hu.astype(np.float32)
    # central lesion in the right lung (image left), well away from the pleura
    lesion = ((y - cy) ** 2 + (x - lx_right) ** 2 + ((z - nz * 0.5) * sz / px) ** 2) <= (n * 0.05) ** 2
    hu[lesion] = 30
    # liver dome rising into the base of the left lung from below the lungs
    dome_centre_z = nz * 0.92 + 3
    dome = ((y - cy) ** 2 + (x - lx_left) ** 2 + ((z - dome_centre_z) * sz / px) ** 2) <= (n * 0.12) ** 2
    body_rows = ((y - cy) / (n * 0.30)) ** 2 + ((x - n / 2) / (n * 0.42)) ** 2 <= 1
    hu[dome & body_rows] = 55
    study.hu[:] = hu.astype(np.int16)
    lab = segment_lungs(study).labels
    assert (lab[lesion] == LUNG_RIGHT).mean() > 0.9
    dome_in_lung_region = dome & (z < nz * 0.92)
    assert dome_in_lung_region.sum() > 50
    assert (lab[dome_in_lung_region] > 0).mean() < 0.2
