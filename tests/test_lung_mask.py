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


def test_split_labels_every_lung_voxel():
    """segment_lungs runs the organ-dome test on the unsplit lung beside the split: that needs the split to label
    every lung voxel right or left (joined, cut, reaching over the midline, many small pieces)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    for k in range(12):
        field = ndi.gaussian_filter(rng.random((8, 48, 72)), (0.5, 2 + k % 3, 2 + k % 4))
        m = field > np.quantile(field, 0.35 + 0.04 * k)
        if k % 3 == 0:  # two lungs joined at a junction line
            m[:, 10:38, 6:30] = True
            m[:, 10:38, 42:66] = True
            m[:, 20:22, 30:42] = True
        lab, _ = split_left_right(m, midline_col=35.5 + k % 5)
        np.testing.assert_array_equal(lab > 0, m)


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


# ----------------------------------------------------------------------- severe unilateral disease, extra pieces
def test_split_keeps_small_second_lung_and_extra_pieces_on_their_side():
    """Boxes on the working grid: a large right lung, a small left remnant (5 % of it) and a right lobe cut off by a
    gap: nothing is dropped and every piece takes the side of the midline it lies on."""
    m = np.zeros((20, 40, 80), bool)
    m[2:18, 5:35, 5:35] = True  # right lung (image left), 14 400 voxels
    m[8:11, 10:20, 50:74] = True  # left remnant, 720 voxels
    m[2:6, 5:35, 5:35] = False  # right "upper lobe" separated from the rest ...
    m[2:5, 5:35, 5:35] = True  # ... by one empty slice (z = 5)
    lab, info = split_left_right(m, midline_col=40.0)
    assert info["components"] == {"total": 3, "right": 2, "left": 1}
    assert (lab[m] > 0).all()
    assert (lab[2:5, 5:35, 5:35] == LUNG_RIGHT).all() and (lab[6:18, 5:35, 5:35] == LUNG_RIGHT).all()
    assert (lab[8:11, 10:20, 50:74] == LUNG_LEFT).all()


def test_split_small_remnant_joined_by_a_thin_bridge():
    """The remnant touches the healthy lung through a one-voxel junction line: it is split off, not merged into the
    healthy lung's side (the old rule needed the second piece to be >= 15 % of the first)."""
    m = np.zeros((10, 40, 80), bool)
    m[:, 5:35, 5:38] = True  # right lung, 9900 voxels
    m[:, 12:28, 43:58] = True  # left remnant, 2400 voxels (24 %) ...
    m[:, 20, 38:43] = True  # ... joined by a thin bridge
    lab, info = split_left_right(m, midline_col=40.0)
    assert "erosion" in info["split"]
    assert (lab[:, 5:35, 5:36] == LUNG_RIGHT).all() and (lab[:, 12:28, 45:58] == LUNG_LEFT).all()
    small = m.copy()
    small[:, 12:28, 50:58] = False  # a 1120-voxel remnant: 10 % of the whole
    lab, info = split_left_right(small, midline_col=40.0)
    assert (lab[:, 12:28, 45:50] == LUNG_LEFT).all() and (lab[:, 5:35, 5:36] == LUNG_RIGHT).all()


def test_gas_and_pieces_below_the_lungs_are_not_lung():
    """Small air pieces: lung-like ones (median ~ -850 HU) in the lungs' slices stay; gas (stomach, bowel: ~ -1000
    HU) and pieces lying below the lungs go."""
    from pneumoct.preprocess.lung_mask import LungMaskParams, _lung_like_components

    work = np.full((40, 40, 80), 40.0, np.float32)
    lung = np.zeros(work.shape, bool)
    lung[2:30, 5:35, 5:35] = True  # right lung
    lung[2:30, 5:35, 45:75] = True  # left lung
    lung[10:14, 10:20, 40:44] = True  # a small lung-like piece between them, touching neither
    work[lung] = -850.0
    gas = np.zeros(work.shape, bool)
    gas[20:28, 36:39, 50:70] = True  # stomach bubble beside the left base, pure gas
    work[gas] = -1000.0
    below = np.zeros(work.shape, bool)
    below[32:39, 10:20, 50:60] = True  # lung-dense piece entirely below the lungs (bowel with content)
    work[below] = -850.0
    kept, info = _lung_like_components(lung | gas | below, work, LungMaskParams())
    assert kept[lung].all() and not kept[gas].any() and not kept[below].any()
    assert info["small_pieces"] == {"kept_as_lung": 1, "dropped_as_gas_or_below_lungs": 2}


def ndi_dilate(mask, iterations):
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=iterations)


def _phantom_case(seed=1):
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    return generate_phantom(PhantomConfig(label="healthy", seed=seed, matrix=160, n_slices=48))


@pytest.fixture(scope="module")
def healthy_phantom():
    return _phantom_case()


def _with_consolidation(ph, region, seed=0):
    """The phantom's study with ``region`` set to consolidation HU (+30 ± 15)."""
    import dataclasses

    hu = ph.study.hu.astype(np.float32)
    hu[region] = 30 + np.random.default_rng(seed).normal(0, 15, int(region.sum()))
    return dataclasses.replace(ph.study, hu=hu.astype(np.int16))


def _check_sides(lab, truth):
    """No voxel of one true lung labelled as the other, and each true lung mostly found."""
    for side, other in ((LUNG_RIGHT, LUNG_LEFT), (LUNG_LEFT, LUNG_RIGHT)):
        assert (lab[truth == side] == other).mean() < 0.01, side


def test_white_lung_enclosed_consolidation_kept_and_labelled(healthy_phantom):
    """White lung: 85 % of the left lung (all of it deeper than ~3 mm from its surface, in 3D) is consolidation.
    Both lungs are found with the right sides, and the consolidation is in the left mask (hole filling, without the
    organ-dome guard on a lung whose aerated part is this small). Before: coverage of the left lung 0.36."""
    from scipy import ndimage as ndi

    ph = healthy_phantom
    truth = ph.lung_mask
    left = truth == LUNG_LEFT
    depth = ndi.distance_transform_edt(left, sampling=ph.study.spacing)
    fill = left & (depth > np.quantile(depth[left], 0.15))
    assert 0.8 <= fill.sum() / left.sum() <= 0.9
    res = segment_lungs(_with_consolidation(ph, fill))
    lab = res.labels
    _check_sides(lab, truth)
    assert (lab[truth == LUNG_RIGHT] == LUNG_RIGHT).mean() > 0.95
    assert (lab[left] == LUNG_LEFT).mean() > 0.8, (lab[left] == LUNG_LEFT).mean()
    assert (lab[fill] == LUNG_LEFT).mean() > 0.8
    assert res.info["dome_guard_off"] == ["left"]


def test_white_lung_dependent_consolidation_keeps_the_remnant_on_its_side(healthy_phantom):
    """White lung, dependent: the posterior 85 % of the left lung in every slice is consolidation, only an anterior
    strip stays aerated (~14 % of that lung, 12 % of the right lung's volume). The old rule dropped such a second
    lung (< 15 % of the first) or split the healthy lung in two; now the remnant is kept as the left lung, the
    stomach gas below it stays out. Known limit: the consolidation itself is not enclosed by aerated lung, so the
    hole filling cannot take it in (coverage of the left lung ~ its aerated share)."""
    ph = healthy_phantom
    truth = ph.lung_mask
    left = truth == LUNG_LEFT
    fill = np.zeros_like(left)
    for z in range(left.shape[0]):
        rows = np.nonzero(left[z])[0]
        if rows.size:
            fill[z] = left[z] & (np.arange(left.shape[1])[:, None] >= np.quantile(rows, 0.15))
    assert 0.8 <= fill.sum() / left.sum() <= 0.9
    study = _with_consolidation(ph, fill)
    res = segment_lungs(study)
    lab = res.labels
    _check_sides(lab, truth)
    assert (lab[truth == LUNG_RIGHT] == LUNG_RIGHT).mean() > 0.95
    aerated_left = left & ~fill & (study.hu < -400)
    assert (lab[aerated_left] == LUNG_LEFT).mean() > 0.9
    assert res.info["components"]["left"] >= 1 and res.info["small_pieces"]["dropped_as_gas_or_below_lungs"] >= 1
    near_lung = ndi_dilate(truth > 0, 2)
    assert ((lab > 0) & ~near_lung).sum() < 0.03 * (lab > 0).sum()  # no stomach, bowel or trachea


def test_collapsed_lobe_keeps_both_pieces_of_the_lung(healthy_phantom):
    """A 16 mm dense oblique slab (a collapsed lobe along a fissure) cuts the right lung's aerated part in two; both
    pieces are kept and labelled right (before: the smaller piece was dropped, right-lung coverage 0.45)."""
    ph = healthy_phantom
    truth = ph.lung_mask
    sp = ph.study.spacing
    right = truth == LUNG_RIGHT
    Z, Y, _ = truth.shape
    zz, yy = np.meshgrid(np.arange(Z) * sp[0], np.arange(Y) * sp[1], indexing="ij")
    zs = np.nonzero(right.any(axis=(1, 2)))[0]
    plane = np.abs((zz - 0.5 * (zs[0] + zs[-1]) * sp[0]) - 0.6 * (yy - 0.5 * Y * sp[1])) / np.sqrt(1.36)
    slab = (plane <= 8.0)[:, :, None] & ndi_dilate(right, 2)
    study = _with_consolidation(ph, slab)
    res = segment_lungs(study)
    lab = res.labels
    _check_sides(lab, truth)
    assert res.info["components"]["right"] >= 2
    above = right & ~slab & ((zz - 0.5 * (zs[0] + zs[-1]) * sp[0]) < 0.6 * (yy - 0.5 * Y * sp[1]))[:, :, None]
    below = right & ~slab & ~above
    assert above.sum() > 0.2 * right.sum() and below.sum() > 0.2 * right.sum()
    assert (lab[above] == LUNG_RIGHT).mean() > 0.95 and (lab[below] == LUNG_RIGHT).mean() > 0.95
    assert (lab[truth == LUNG_LEFT] == LUNG_LEFT).mean() > 0.95


def test_upsampled_count_equals_count_on_the_study_grid():
    import numpy as np

    from pneumoct.preprocess.lung_mask import _upsample_labels, _upsampled_count

    rng = np.random.default_rng(0)
    for f in (1, 2, 3):
        for shape in [(3, 10, 11), (2, 9, 9), (4, 12, 7)]:
            w = rng.random((shape[0], -(-shape[1] // f), -(-shape[2] // f))) < 0.4
            assert _upsampled_count(w, f, shape) == np.count_nonzero(_upsample_labels(w, f, shape))


def test_block_mean_is_the_mean_of_each_block_with_edge_padding():
    from pneumoct.preprocess.lung_mask import _block_mean

    rng = np.random.default_rng(5)
    for factor, shape in ((2, (3, 10, 12)), (2, (3, 11, 9)), (3, (2, 13, 14))):
        hu = rng.integers(-1024, 3071, shape).astype(np.int16)
        py, px = (-shape[1]) % factor, (-shape[2]) % factor
        padded = np.pad(hu, ((0, 0), (0, py), (0, px)), mode="edge").astype(np.float64)
        z, y, x = padded.shape
        ref = padded.reshape(z, y // factor, factor, x // factor, factor).mean(axis=(2, 4))
        got = _block_mean(hu, factor)
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref.astype(np.float32))
