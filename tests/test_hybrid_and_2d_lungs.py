"""Hybrid lesion cases (real anatomy + simulated lesions), intensity randomisation, the train-only split, and the 2D
lung finder on body-cropped exports (the cause of the near-empty 2D `segment` masks, issue 9)."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoct.preprocess.lung_mask import segment_lungs_2d
from pneumoct.train.hybrid import simulate_lesions_2d
from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO


def _chest_slice(n=256):
    """A crude axial HU slice: body ellipse (40 HU) with two lung ellipses (-850 HU + noise) and a few vessels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    hu = np.full((n, n), -1000.0)
    body = ((yy - n / 2) / (0.42 * n)) ** 2 + ((xx - n / 2) / (0.47 * n)) ** 2 < 1
    hu[body] = 40.0
    lung = np.zeros((n, n), bool)
    for cx in (0.3 * n, 0.7 * n):
        lung |= ((yy - n / 2) / (0.3 * n)) ** 2 + ((xx - cx) / (0.15 * n)) ** 2 < 1
    hu[lung] = -850.0 + rng.normal(0, 20, lung.sum())
    for _ in range(15):
        y, x = rng.integers(0, n, 2)
        if lung[y, x]:
            hu[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2] = 30.0
    return hu.astype(np.float32), lung


def test_simulated_lesions_are_exact_inside_the_lung_and_seeded():
    hu, lung = _chest_slice()
    masks = []
    for seed in range(12):
        h2, m = simulate_lesions_2d(hu, lung, np.random.default_rng(seed), pixel_mm=1.4)
        assert m.shape == hu.shape and set(np.unique(m)) <= {0, LESION_GGO, LESION_CONSOLIDATION}
        assert not (m > 0)[~lung].any()  # never outside the lung
        if (m == LESION_GGO).any():  # ground-glass raises the lung's HU where marked
            assert h2[m == LESION_GGO].mean() > hu[m == LESION_GGO].mean() + 100
        if (m == LESION_CONSOLIDATION).sum() > 50:
            assert np.median(h2[m == LESION_CONSOLIDATION]) > -300
        assert np.allclose(h2[~lung & (np.abs(h2 - hu) > 0)], h2[~lung & (np.abs(h2 - hu) > 0)])  # finite
        masks.append(m)
    assert sum(int(m.any()) for m in masks) >= 10
    h_a, m_a = simulate_lesions_2d(hu, lung, np.random.default_rng(3), pixel_mm=1.4)
    h_b, m_b = simulate_lesions_2d(hu, lung, np.random.default_rng(3), pixel_mm=1.4)
    assert np.array_equal(m_a, m_b) and np.array_equal(h_a, h_b)


def test_atelectasis_band_is_drawn_but_not_lesion():
    hu, lung = _chest_slice()
    h2, m = simulate_lesions_2d(hu, lung, np.random.default_rng(1), pixel_mm=1.4, n_lesions=0, atelectasis_p=1.0)
    assert not m.any()
    changed = lung & (h2 > hu + 150)
    assert changed.sum() > 50  # a dense dependent band exists ...
    ys = np.nonzero(changed)[0]
    assert ys.mean() > np.nonzero(lung)[0].mean()  # ... at the back (posterior = larger row index)


def test_intensity_randomisation_stays_in_range_and_is_seeded():
    from pneumoct.train.augment import AugmentConfig, augment_slice

    cfg = AugmentConfig(window_width_range=(550.0, 1000.0), gamma=(0.7, 1.4), blur_sigma=(0.3, 1.0),
                        noise_std=(0.005, 0.03), p_intensity=1.0)
    hu, lung = _chest_slice(64)
    a, _ = augment_slice(hu, True, None, np.random.default_rng(5), cfg)
    b, _ = augment_slice(hu, True, None, np.random.default_rng(5), cfg)
    c, _ = augment_slice(hu, True, None, np.random.default_rng(6), cfg)
    assert a.min() >= 0 and a.max() <= 1 and np.array_equal(a, b) and not np.array_equal(a, c)
    plain, _ = augment_slice(hu, True, None, np.random.default_rng(5), AugmentConfig())
    assert not np.array_equal(plain, a)  # the default (papers' settings) is unchanged: no intensity step


def test_train_only_patients_never_land_in_validation():
    from types import SimpleNamespace

    from pneumoct.train.loop import split_indices
    from pneumoct.train.table import SliceTable

    n = 60
    pids = np.array([f"set/p{i // 3}" for i in range(n - 6)] + ["covid-ct-md/covid"] * 3 + ["covid-ct-md/cap"] * 3)
    t = SliceTable(images=np.zeros((n, 4, 4), np.float32), is_hu=np.ones(n, bool), class_label=np.zeros(n, np.int64),
                   lesion_label=np.zeros(n, np.int64), lesion_mask=np.zeros((n, 4, 4), np.uint8),
                   has_mask=np.ones(n, bool), patient_id=pids, patient_label=np.zeros(n, np.int64),
                   slice_index=np.zeros(n, np.int64), source=np.array(["s"] * n))
    split = SimpleNamespace(val_fraction=0.3, seed=0, kfold=None, fold=0, exclude_patients=None,
                            train_only_patients=["covid-ct-md/*"])
    tr, va = split_indices(t, np.zeros(n, np.int64), split)
    assert set(range(n - 6, n)) <= set(tr.tolist()) and not set(va.tolist()) & set(range(n - 6, n))
    assert len(va) > 0 and not set(tr.tolist()) & set(va.tolist())


@pytest.mark.parametrize("crop", [False, True])
def test_2d_lung_finder_on_full_and_body_cropped_images(crop):
    """An 8-bit export cropped through the chest (MedSeg style): the lungs reach the image edge and are not holes of
    the body. Before issue 9 only air specks came back as lung."""
    hu, lung = _chest_slice()
    grey = np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.float32)  # lung window C -600 / W 1500
    truth = lung
    if crop:  # cut through the body, the lungs reaching the top edge
        grey, truth = grey[70:216, 20:236], lung[70:216, 20:236]
    found = segment_lungs_2d(grey) > 0
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.85, dice
    labels = segment_lungs_2d(grey)
    assert set(np.unique(labels)) == {0, 1, 2}  # both lungs, right and left
