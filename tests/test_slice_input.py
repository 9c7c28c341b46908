"""The one 2D input path (crop to the lungs, resize, window, optional CLAHE) and its inverse."""
import numpy as np
import pytest

from pneumoct.preprocess.slice_input import (crop_slice, crop_volume_slices, harmonise, lung_slice_box,
                                             map_back_to_slice, window_input)


def test_crop_and_map_back_are_registered():
    img = np.full((200, 240), -1000.0, np.float32)
    lung = np.zeros((200, 240), bool)
    lung[40:160, 30:210] = True
    img[90:100, 100:110] = 0.0  # a bright square inside the lungs
    c = crop_slice(img, lung, 64, mask=(img > -500).astype(np.uint8))
    assert c.image.shape == (64, 64) and c.mask.max() == 1
    back = map_back_to_slice(c.mask, c, order=0)
    assert back.shape == img.shape
    rows, cols = np.nonzero(back)
    assert abs(rows.mean() - 94.5) < 2 and abs(cols.mean() - 104.5) < 2  # same place on the slice
    r0, r1, c0, c1 = c.box
    assert r0 < 40 and r1 > 160 and c0 < 30 and c1 > 210  # the margin around the lungs


def test_too_little_lung_gives_no_crop():
    lung = np.zeros((100, 100), bool)
    lung[0, 0] = True
    assert lung_slice_box(lung) is None
    z, crops = crop_volume_slices(np.zeros((2, 100, 100)), np.stack([lung, np.ones((100, 100), bool)]), 32)
    assert z.tolist() == [1] and crops[0] is None


def test_window_and_harmonise():
    x = window_input(np.array([[-1000.0, -600.0, 0.0]]), -600, 1200)
    np.testing.assert_allclose(x, [[1 / 6, 0.5, 1.0]], atol=1e-6)
    rng = np.random.default_rng(0)
    dark = (rng.random((2, 64, 64)) * 0.2).astype(np.float32)  # low-contrast, dark images
    h = harmonise(dark)
    assert h.shape == dark.shape and h.min() >= 0 and h.max() <= 1
    assert h.std() > dark.std() * 1.5  # contrast stretched
    assert harmonise(dark, "none") is dark
    with pytest.raises(ValueError):
        harmonise(dark, "gamma")


def test_slice_inputs_chain_matches_crop_slice_and_inverts():
    """SliceInputs (one chain per study, shared by every 2D model) crops exactly as crop_slice (the training
    path), caches per size, maps back as map_back_to_slice, and records what it ran."""
    from pneumoct.preprocess.slice_input import SliceInputs, map_back_to_slice, window_input

    rng = np.random.default_rng(0)
    hu = rng.normal(-700, 200, (5, 60, 80)).astype(np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[1:4, 10:50, 12:70] = True
    lung[2, :, :] = False  # a slice without lung
    inp = SliceInputs(hu, lung)
    assert list(inp.z) == [1, 3]
    c48 = inp.crops(48)
    assert inp.crops(48) is c48  # cached
    for i, k in enumerate(inp.z):
        ref = crop_slice(hu[k], lung[k], 48)
        np.testing.assert_array_equal(c48[i], ref.image)
        assert inp.crop(k).box == ref.box
        m = rng.random((48, 48)).astype(np.float32)
        np.testing.assert_array_equal(inp.invert(m, k), map_back_to_slice(m, ref))
    assert inp.crop(2) is None
    with pytest.raises(ValueError):
        inp.invert(np.zeros((48, 48), np.float32), 2)
    x = inp.inputs(48, -600.0, 1200.0, model="a")
    np.testing.assert_array_equal(x, window_input(c48, -600.0, 1200.0))
    inp.inputs(32, -700.0, 1200.0, "clahe", model="b")
    rec = inp.record()
    assert [s["step"] for s in rec] == ["lung_box", "crop_resize", "window"]
    assert rec[1]["sizes"] == [32, 48] and rec[0]["slices_with_crop"] == 2
    assert [(w["model"], w["size"], w["input_transform"]) for w in rec[2]["inputs"]] == [("a", 48, "none"),
                                                                                         ("b", 32, "clahe")]
