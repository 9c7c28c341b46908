"""The stacked CLAHE gives exactly scikit-image's equalize_adapthist on each image (the models were trained on it)."""
import numpy as np
import pytest
from skimage.exposure import equalize_adapthist

from pneumoct.preprocess.clahe import _clip_histograms, equalize_adapthist_stack
from pneumoct.preprocess.slice_input import harmonise


def _reference(x, k):
    return np.stack([equalize_adapthist(np.clip(xi, 0, 1), kernel_size=k, clip_limit=0.01).astype(np.float32)
                     for xi in x])


@pytest.mark.parametrize("shape,k", [((3, 64, 64), 8), ((2, 128, 128), 16), ((2, 100, 100), 12), ((2, 40, 56), 8),
                                     ((1, 96, 96), 12)])
def test_stack_equals_scikit_image_per_image(shape, k):
    rng = np.random.default_rng(sum(shape))
    looks = [rng.random(shape), rng.random(shape) ** 3, np.clip(rng.normal(0.4, 0.05, shape), 0, 1)]
    bands = np.zeros(shape)
    bands[:, shape[1] // 4:shape[1] // 2] = 0.7  # flat regions: tiles with one grey level, long redistributions
    looks.append(np.clip(bands + rng.normal(0, 0.01, shape), 0, 1))
    flat = np.full(shape, 0.3)
    flat[:, :3, :3] = 0.31
    looks.append(flat)
    for x in looks:
        x = x.astype(np.float32)
        np.testing.assert_array_equal(equalize_adapthist_stack(x, k), _reference(x, k))


def test_harmonise_is_unchanged_and_empty_stacks_pass():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 64, 64)).astype(np.float32)  # any leading shape
    np.testing.assert_array_equal(harmonise(x, "clahe"), _reference(x.reshape(-1, 64, 64), 8).reshape(x.shape))
    assert harmonise(x[:0], "clahe").shape == (0, 3, 64, 64)


def test_clip_histograms_matches_the_per_row_loop():
    from skimage.exposure._adapthist import clip_histogram

    rng = np.random.default_rng(2)
    hist = np.concatenate([rng.poisson(rng.uniform(0.2, 6), (40, 256)),
                           np.eye(256, dtype=np.int64)[:5] * 256,  # one bin holds the whole tile
                           rng.integers(0, 3, (5, 256))])
    for clim in (1, 2, 5, 40):
        ref = np.stack([clip_histogram(h.copy(), clim) for h in hist])
        np.testing.assert_array_equal(_clip_histograms(hist, clim), ref)
