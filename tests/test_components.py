"""pneumoct.preprocess.components: cc3d labelling numbered exactly as scipy.ndimage.label."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from pneumoct.preprocess import components

STRUCT = {(2, 4): None, (2, 8): np.ones((3, 3), bool), (3, 6): None,
          (3, 18): ndi.generate_binary_structure(3, 2), (3, 26): np.ones((3, 3, 3), bool)}


def test_cc3d_is_the_backend():
    assert components.backend() == "cc3d"  # a declared dependency: the fallback must not hide a broken install


@pytest.mark.parametrize("ndim,conn", sorted(STRUCT))
def test_same_labels_as_scipy_on_random_masks(ndim, conn):
    rng = np.random.default_rng(conn)
    for _ in range(60):
        shape = tuple(int(rng.integers(2, 25)) for _ in range(ndim))
        mask = rng.random(shape) > rng.uniform(0.1, 0.9)
        want, n_want = ndi.label(mask, structure=STRUCT[(ndim, conn)])
        got, n = components.label_cc3d(mask, conn)
        assert n == n_want and got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        lab, n2 = components.label(mask, conn)
        assert n2 == n_want
        np.testing.assert_array_equal(lab, want)


def test_views_non_bool_and_degenerate_shapes():
    rng = np.random.default_rng(0)
    vol = rng.random((9, 30, 31)) > 0.5
    view = vol[::2, 3:, ::-1]  # not contiguous
    np.testing.assert_array_equal(components.label(view, 6)[0], ndi.label(view)[0])
    as_int = (rng.random((20, 20)) * 3).astype(np.int16)  # nonzero is foreground
    np.testing.assert_array_equal(components.label(as_int, 8)[0], ndi.label(as_int, structure=np.ones((3, 3)))[0])
    for shape in [(1, 7), (7, 1), (4, 1, 9), (0, 5)]:  # cc3d does not handle one-pixel sides: SciPy does
        m = rng.random(shape) > 0.4
        conn = 26 if len(shape) == 3 else 8
        lab, n = components.label(m, conn)
        want, n_want = ndi.label(m, structure=STRUCT[(len(shape), conn)])
        assert n == n_want
        np.testing.assert_array_equal(lab, want)
    assert components.label(np.zeros((3, 4, 5), bool), 6)[1] == 0


def test_bad_connectivity_is_refused():
    with pytest.raises(ValueError, match="connectivity 6"):
        components.label(np.ones((4, 4), bool), 6)


def test_threshold_z_window_matches_scipy_filters():
    """The threshold baseline's cylinder steps reduce along z by whole-slice operations: the same voxels as
    minimum_filter1d / maximum_filter1d with a zero border (what they replaced)."""
    from pneumoct.quantify.threshold_baseline import _z_window

    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.random((rng.integers(1, 9), rng.integers(1, 6), rng.integers(1, 6))) > rng.uniform(0.1, 0.9)
        k = int(rng.integers(1, 5))
        lo = ndi.minimum_filter1d(a.view(np.uint8), 2 * k + 1, axis=0, mode="constant", cval=0).view(bool)
        hi = ndi.maximum_filter1d(a.view(np.uint8), 2 * k + 1, axis=0, mode="constant", cval=0).view(bool)
        np.testing.assert_array_equal(_z_window(a, k, np.logical_and), lo)
        np.testing.assert_array_equal(_z_window(a, k, np.logical_or), hi)


def _classical_outputs(study):
    from pneumoct.preprocess.lung_mask import segment_lungs
    from pneumoct.quantify import find_lesions_threshold, quantify

    lungs = segment_lungs(study)
    finding = find_lesions_threshold(study.hu, lungs.labels, study.spacing)
    q = quantify(finding.mask, lungs.labels, study.spacing, hu=study.hu)
    return lungs, finding, q


def _assert_same_outputs(study, monkeypatch):
    """Lung mask (labels, body, airway, its record), threshold lesions and the quantification: the same with cc3d
    as with SciPy labelling everything."""
    fast = _classical_outputs(study)
    monkeypatch.setattr(components, "_cc3d", None)
    slow = _classical_outputs(study)
    monkeypatch.undo()
    for a, b in zip(fast[:2], slow[:2]):
        np.testing.assert_array_equal(getattr(a, "labels", getattr(a, "mask", None)),
                                      getattr(b, "labels", getattr(b, "mask", None)))
    np.testing.assert_array_equal(fast[0].body_work, slow[0].body_work)
    np.testing.assert_array_equal(fast[0].airway_work, slow[0].airway_work)
    assert fast[0].info == slow[0].info and fast[1].params == slow[1].params
    assert fast[2] == slow[2]
    return fast


def test_classical_path_same_with_scipy_labelling_on_a_phantom(monkeypatch):
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    study = generate_phantom(PhantomConfig(label="cap", seed=12, matrix=192, n_slices=48)).study
    lungs, finding, _ = _assert_same_outputs(study, monkeypatch)
    assert lungs.labels.any() and finding.mask.any()  # the comparison is not between empty masks


def test_classical_path_same_with_scipy_labelling_on_a_real_study(monkeypatch):
    """REAL covid-P001: its lungs touch at a junction line, so the erosion split (labelled at every step) runs."""
    from conftest import REAL_STUDIES, require_real_data

    require_real_data()
    from pneumoct.io import read_study

    lungs, _, _ = _assert_same_outputs(read_study(REAL_STUDIES["covid19"]), monkeypatch)
    assert lungs.info["split"].startswith("joined lungs split")
