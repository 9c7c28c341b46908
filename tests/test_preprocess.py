"""Tests of pneumoct.preprocess: windowing, resampling and the M3Lung-Sys 2D lung crop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoct.preprocess.lung_crop import (
    crop_to_box,
    expand_bbox,
    m3lung_crop_volume,
    m3lung_lung_crop,
    m3lung_lung_crop_8bit,
    mask_bbox,
    otsu_threshold,
    uncrop_to_slice,
)
from pneumoct.preprocess.resample import resample_mask, resample_volume, resampled_shape, zoom_to_shape
from pneumoct.preprocess.windowing import (
    WINDOW_PRESETS,
    apply_preset,
    apply_window,
    m3lung_inference_windows,
    sample_m3lung_window,
    sliding_window_normalise,
)
from pneumoct.types import InputWarning, SliceInfo, StudyVolume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNG_DIR = SHARED_DATA / "covid19-ct-seg-png"


# ------------------------------------------------------------------------------------------------ windowing
def test_apply_window_known_values():
    hu = np.array([-2000, -1350, -1000, -600, 150, 3000], dtype=np.int16)
    out = apply_window(hu, -600, 1500)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 350 / 1500, 0.5, 1.0, 1.0], atol=1e-6)
    # mediastinum window: 40 +- 200
    np.testing.assert_allclose(apply_preset(np.array([-160.0, 40.0, 140.0, 240.0]), "mediastinum"),
                               [0.0, 0.5, 0.75, 1.0], atol=1e-6)
    vol = np.full((2, 3, 4), -600, dtype=np.int16)
    assert apply_window(vol, -600, 1200).shape == (2, 3, 4)
    with pytest.raises(ValueError):
        apply_window(hu, 0, 0)


def test_presets():
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert WINDOW_PRESETS["mediastinum"] == (40.0, 400.0)
    assert WINDOW_PRESETS["m3lung"] == (-600.0, 1200.0)


def test_m3lung_inference_windows_stack():
    hu = np.array([[-1300.0, -600.0], [-100.0, 100.0]], dtype=np.float32)
    stack = m3lung_inference_windows(hu)
    assert stack.shape == (3, 2, 2) and stack.dtype == np.float32
    # order follows centres (-700, -600, -500): a higher centre gives a darker value
    np.testing.assert_allclose(stack[:, 0, 1], [700 / 1200, 0.5, 500 / 1200], atol=1e-6)
    assert np.all(stack[0] >= stack[1]) and np.all(stack[1] >= stack[2])
    np.testing.assert_allclose(stack[1], apply_window(hu, -600, 1200))
    assert stack[0, 0, 0] == pytest.approx(0.0, abs=1e-6)  # -1300 = lower edge of the -700 window
    assert m3lung_inference_windows(np.zeros((4, 5, 6)), centers=(-650, -550)).shape == (2, 4, 5, 6)


def test_sample_m3lung_window_range_and_seed():
    draws = [sample_m3lung_window(np.random.default_rng(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng = np.random.default_rng(123)
    samples = np.array([sample_m3lung_window(rng) for _ in range(2000)])
    assert np.all(samples[:, 1] == 1200.0)
    assert samples[:, 0].min() >= -700 and samples[:, 0].max() < -500
    assert samples[:, 0].min() < -690 and samples[:, 0].max() > -510  # spans the range
    again = np.random.default_rng(123)
    np.testing.assert_array_equal(samples, [sample_m3lung_window(again) for _ in range(2000)])
    assert sample_m3lung_window(np.random.default_rng(124))[0] != sample_m3lung_window(np.random.default_rng(7))[0]
    with pytest.raises(TypeError):
        sample_m3lung_window(np.random.RandomState(0))  # type: ignore[arg-type]


def _bimodal(rng: np.random.Generator) -> np.ndarray:
    lung = rng.normal(-800, 40, 10000)
    tissue = rng.normal(40, 20, 4000)
    padding = np.full(3000, -3024.0)
    bone = rng.normal(1500, 50, 500)
    return np.concatenate([lung, tissue, padding, bone]).round().astype(np.int16)


def test_sliding_window_normalise_bimodal():
    vals = _bimodal(np.random.default_rng(0))
    out, (low, high) = sliding_window_normalise(vals, Q=1500, S=10)
    assert out.dtype == np.float32 and out.shape == vals.shape
    assert high - low == pytest.approx(1500)
    # the window holds both dense modes (lung and tissue), not the padding spike or bone
    assert low <= -960 and high >= 120
    assert low > -3024 and high < 1300
    assert out.min() == 0.0 and out.max() == 1.0
    # a narrow window picks the densest mode (lung)
    _, (lo2, hi2) = sliding_window_normalise(vals, Q=400, S=10)
    assert lo2 <= -930 and hi2 >= -670 and hi2 < -40
    # restricted to a mask over the tissue values it moves there
    mask = (vals > -300) & (vals < 400)
    _, (lo3, hi3) = sliding_window_normalise(vals, Q=400, S=10, mask=mask)
    assert lo3 <= -40 and hi3 >= 120 and lo3 > -400
    # integer (histogram) and float (sorted) paths agree
    _, (lo_f, hi_f) = sliding_window_normalise(vals.astype(np.float64), Q=1500, S=10)
    assert lo_f == pytest.approx(low) and hi_f == pytest.approx(high)


def test_sliding_window_normalise_constant_and_errors():
    const = np.full((3, 4, 5), 42, dtype=np.int16)
    out, (low, high) = sliding_window_normalise(const)
    assert np.all(np.isfinite(out)) and out.shape == const.shape
    np.testing.assert_allclose(out, 0.5, atol=0.01)
    assert low <= 42 <= high
    with pytest.raises(ValueError):
        sliding_window_normalise(const, mask=np.zeros(const.shape, bool))
    with pytest.raises(ValueError):
        sliding_window_normalise(const, Q=0)


# ------------------------------------------------------------------------------------------------- resample
def _sphere_study(radius_mm: float = 20.0) -> tuple[StudyVolume, float]:
    shape = (48, 96, 96)
    spacing = (2.5, 0.8, 0.8)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    c = [n * s / 2 for n, s in zip(shape, spacing)]
    inside = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius_mm**2
    hu = np.where(inside, 40, -1000).astype(np.int16)
    origin = (-100.0, -120.0, 50.0)
    slices = [SliceInfo(k, 50.0 - k * spacing[0], sop_instance_uid=f"1.2.3.{k}", source=f"{k}.dcm")
              for k in range(shape[0])]
    study = StudyVolume(hu=hu, spacing=spacing, origin=origin, direction=np.diag([1.0, 1.0, -1.0]),
                        slices=slices, source_format="dicom", warnings=[InputWarning("x", "y")],
                        metadata={"modality": "CT", "nested": {"a": 1}})
    return study, 4.0 / 3.0 * np.pi * radius_mm**3


def test_resample_volume_geometry_and_sphere_volume():
    study, true_vol = _sphere_study()
    target = (1.25, 1.25, 1.25)
    res = resample_volume(study, target)
    assert res.hu.dtype == np.int16
    assert res.spacing == target
    assert res.shape == resampled_shape(study.shape, study.spacing, target) == (96, 61, 61)
    # physical extent n * spacing kept to within half a new voxel per axis
    for n0, s0, n1, s1 in zip(study.shape, study.spacing, res.shape, res.spacing):
        assert abs(n0 * s0 - n1 * s1) <= s1 / 2 + 1e-9
    assert res.origin == study.origin
    np.testing.assert_array_equal(res.direction, study.direction)
    assert len(res.slices) == res.shape[0]
    np.testing.assert_allclose([s.position_mm for s in res.slices], 50.0 - 1.25 * np.arange(res.shape[0]))
    assert all(s.sop_instance_uid is None and s.source is None for s in res.slices)
    assert res.metadata["modality"] == "CT" and res.metadata is not study.metadata
    res.metadata["nested"]["a"] = 2
    assert study.metadata["nested"]["a"] == 1  # deep copy
    assert [w.code for w in res.warnings] == ["x"] and res.warnings is not study.warnings
    # sphere volume within 3 % of the source and of the analytic value
    vol_src = (study.hu > -480).sum() * np.prod(study.spacing)
    vol_res = (res.hu > -480).sum() * np.prod(res.spacing)
    assert abs(vol_res - vol_src) / vol_src < 0.03
    assert abs(vol_res - true_vol) / true_vol < 0.03
    # sphere centre stays put (physical position, first voxel centre fixed at origin)
    com_src = np.array(np.nonzero(study.hu > -480)).mean(axis=1) * np.array(study.spacing)
    com_res = np.array(np.nonzero(res.hu > -480)).mean(axis=1) * np.array(res.spacing)
    np.testing.assert_allclose(com_res, com_src, atol=0.5)


def test_resample_mask_keeps_labels():
    study, _ = _sphere_study()
    mask = np.zeros(study.shape, dtype=np.uint8)
    sphere = study.hu > -480
    half = np.zeros_like(sphere)
    half[..., : study.shape[2] // 2] = True
    mask[sphere & half] = 1
    mask[sphere & ~half] = 2
    target = (1.25, 1.25, 1.25)
    out = resample_mask(mask, study.spacing, target_spacing=target)
    assert out.dtype == np.uint8
    assert out.shape == resampled_shape(mask.shape, study.spacing, target)
    assert set(np.unique(out)) == {0, 1, 2}
    for lab in (1, 2):
        v0 = (mask == lab).sum() * np.prod(study.spacing)
        v1 = (out == lab).sum() * np.prod(target)
        assert abs(v1 - v0) / v0 < 0.05
    res = resample_volume(study, target)
    on_grid = resample_mask(mask, study.spacing, res.shape, target_spacing=res.spacing)
    np.testing.assert_array_equal(on_grid, out)  # exactly the resampled study's grid
    by_shape = resample_mask(mask, study.spacing, (60, 40, 40))  # extent-preserving spacing n*s/m
    assert by_shape.shape == (60, 40, 40) and set(np.unique(by_shape)) == {0, 1, 2}
    assert abs((by_shape == 1).sum() * (2.0 * 1.92 * 1.92) - (mask == 1).sum() * np.prod(study.spacing)) < 0.05 * (
        (mask == 1).sum() * np.prod(study.spacing))
    smooth = resample_mask(mask, study.spacing, target_spacing=target, order=1)
    assert set(np.unique(smooth)) <= {0, 1, 2} and smooth.dtype == np.uint8
    b = resample_mask(sphere, study.spacing, target_spacing=target, order=1)
    assert b.dtype == bool and abs(b.sum() * np.prod(target) - sphere.sum() * np.prod(study.spacing)) / (
        sphere.sum() * np.prod(study.spacing)) < 0.03
    with pytest.raises(ValueError):
        resample_mask(mask, study.spacing)


def test_zoom_to_shape_convention():
    ramp = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(zoom_to_shape(ramp, (8,), order=1),
                               [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0], atol=1e-6)
    labels = np.array([[0, 1], [2, 3]], dtype=np.int32)
    up = zoom_to_shape(labels, (4, 4), order=0)
    assert up.dtype == np.int32
    np.testing.assert_array_equal(up, np.kron(labels, np.ones((2, 2), dtype=np.int32)))
    stack = np.random.default_rng(0).normal(size=(3, 10, 12))
    assert zoom_to_shape(stack, (20, 24)).shape == (3, 20, 24)
    np.testing.assert_allclose(zoom_to_shape(np.full((5, 7), 3.0), (11, 2)), 3.0)


# ------------------------------------------------------------------------------------------------ lung crop
LUNG_R = (50, 28)  # semi-axes (rows, cols) of each lung ellipse
LUNG_CENTRES = ((110, 82), (110, 174))
TABLE_ROWS = (212, 229)


def _synthetic_slice(lungs: bool = True, lung_scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """256x256 HU slice: air -1000, body ellipse +40, two lung ellipses -850, a hollow table below the body."""
    rng = np.random.default_rng(seed)
    h = w = 256
    rr, cc = np.mgrid[:h, :w]
    img = np.full((h, w), -1000.0)
    body = ((rr - 115) / 88.0) ** 2 + ((cc - 128) / 115.0) ** 2 <= 1.0  # rows 27..203
    img[body] = 40.0
    lung_mask = np.zeros((h, w), dtype=bool)
    if lungs:
        for r0, c0 in LUNG_CENTRES:
            e = ((rr - r0) / (LUNG_R[0] * lung_scale)) ** 2 + ((cc - c0) / (LUNG_R[1] * lung_scale)) ** 2 <= 1.0
            lung_mask |= e
        img[lung_mask] = -850.0
    # table: a plate with an enclosed air slot (hollow tray), separated from the body by air
    img[TABLE_ROWS[0]:TABLE_ROWS[1], 20:236] = 300.0
    img[TABLE_ROWS[0] + 5:TABLE_ROWS[1] - 5, 40:216] = -1000.0
    img += rng.normal(0, 15, img.shape)
    return img.round().astype(np.int16), lung_mask


def test_lung_crop_synthetic_slice():
    hu, gt = _synthetic_slice()
    crop = m3lung_lung_crop(hu, return_steps=True)
    assert not crop.fallback and crop.found
    r0, r1, c0, c1 = crop.bbox
    g = mask_bbox(gt)
    # both lungs inside the box, with the 10-pixel margin around the step-5 mask
    assert gt[r0:r1, c0:c1].sum() == gt.sum()
    assert crop.bbox == expand_bbox(mask_bbox(crop.lung_mask), 10, hu.shape)
    assert all(abs(a - b) <= 13 for a, b in zip(crop.bbox, (g[0] - 10, g[1] + 10, g[2] - 10, g[3] + 10)))
    assert r0 <= g[0] - 7 and r1 >= g[1] + 7 and c0 <= g[2] - 7 and c1 >= g[3] + 7
    # table (and its enclosed air slot) excluded
    assert r1 < TABLE_ROWS[0]
    assert not crop.lung_mask[TABLE_ROWS[0]:].any()
    # the step-5 mask is the lungs
    dice = 2 * (crop.lung_mask & gt).sum() / (crop.lung_mask.sum() + gt.sum())
    assert dice > 0.95
    assert set(crop.steps) == {"step2_threshold", "step3_opening", "step4_components", "step5_opening"}
    assert crop.steps["step2_threshold"][0, 0] and not crop.steps["step4_components"][0, 0]  # outside air dropped
    assert crop.image.shape == (224, 224) and crop.image.dtype == np.float32
    assert crop.image.min() >= -1100 and crop.image.max() <= 400  # HU by default
    windowed = m3lung_lung_crop(hu, window="m3lung", out_size=(128, 96))
    assert windowed.image.shape == (128, 96) and 0.0 <= windowed.image.min() <= windowed.image.max() <= 1.0
    assert windowed.bbox == crop.bbox


def test_lung_crop_body_restriction_drops_table_air():
    hu, _ = _synthetic_slice()
    loose = m3lung_lung_crop(hu, restrict_to_body=False)
    # without the body test the enclosed air slot of the hollow table survives Step 4 and stretches the box
    assert loose.bbox[1] > TABLE_ROWS[0]
    assert m3lung_lung_crop(hu).bbox[1] < TABLE_ROWS[0]


def test_lung_crop_fallback_without_lungs():
    hu, _ = _synthetic_slice(lungs=False)
    crop = m3lung_lung_crop(hu)
    assert crop.fallback and not crop.found
    assert crop.bbox == (0, 256, 0, 256)
    assert not crop.lung_mask.any()
    assert crop.image.shape == (224, 224)
    air = np.full((64, 64), -1000, dtype=np.int16)
    assert m3lung_lung_crop(air).fallback


def test_crop_coordinate_mapping():
    hu, _ = _synthetic_slice()
    crop = m3lung_lung_crop(hu, out_size=None)
    r0, r1, c0, c1 = crop.bbox
    np.testing.assert_array_equal(crop.image, crop_to_box(hu, crop.bbox).astype(np.float32))
    # identity size: map back exactly
    back = crop.map_to_slice(crop.image, fill=np.nan)
    np.testing.assert_array_equal(back[r0:r1, c0:c1], hu[r0:r1, c0:c1])
    assert np.isnan(back[0, 0])
    # resized: a single bright pixel maps back to (about) where it was
    sized = m3lung_lung_crop(hu, out_size=(224, 224))
    heat = np.zeros((224, 224))
    heat[50, 170] = 1.0
    rr, cc = sized.to_slice_coords(np.array([50]), np.array([170]))
    up = sized.map_to_slice(heat)
    peak = np.unravel_index(np.argmax(up), up.shape)
    assert abs(peak[0] - rr[0]) <= 1 and abs(peak[1] - cc[0]) <= 1
    r2, c2 = sized.to_crop_coords(rr, cc)
    np.testing.assert_allclose([r2[0], c2[0]], [50, 170], atol=1e-9)
    # corners: the outer edges of the crop map onto the box edges
    rr, cc = sized.to_slice_coords(np.array([-0.5, 223.5]), np.array([-0.5, 223.5]))
    np.testing.assert_allclose(rr, [r0 - 0.5, r1 - 0.5])
    np.testing.assert_allclose(cc, [c0 - 0.5, c1 - 0.5])
    labels = uncrop_to_slice(np.ones((3, 224, 224), dtype=np.uint8), sized.bbox, hu.shape, order=0)
    assert labels.shape == (3, 256, 256) and labels.sum() == 3 * (r1 - r0) * (c1 - c0)


def test_crop_volume_one_registered_box():
    slices, gts = [], []
    for k, scale in enumerate([0.0, 0.0, 0.5, 0.8, 1.0, 0.9, 0.6]):
        hu, gt = _synthetic_slice(lungs=scale > 0, lung_scale=max(scale, 0.1), seed=k)
        slices.append(hu)
        gts.append(gt)
    vol = np.stack(slices)
    res = m3lung_crop_volume(vol, out_size=(112, 112), window="lung")
    np.testing.assert_array_equal(res.slice_has_lung, [False, False, True, True, True, True, True])
    assert not res.fallback
    assert res.image.shape == (7, 112, 112) and 0.0 <= res.image.min() and res.image.max() <= 1.0
    union = mask_bbox(np.stack(gts))
    r0, r1, c0, c1 = res.bbox
    assert all(g[r0:r1, c0:c1].sum() == g.sum() for g in gts)
    assert res.bbox == expand_bbox(mask_bbox(res.lung_mask), 10, vol.shape[1:])
    assert abs(r0 - (union[0] - 10)) <= 3 and abs(r1 - (union[1] + 10)) <= 3
    # the same box as the largest slice alone (it contains the others)
    assert res.bbox == m3lung_lung_crop(vol[4]).bbox
    assert m3lung_crop_volume(np.full((3, 32, 32), -1000, np.int16)).fallback


def test_lung_crop_8bit_variant():
    hu, gt = _synthetic_slice()
    img8 = (apply_window(hu, -600, 1500) * 255).round().astype(np.uint8)
    thr = otsu_threshold(img8)
    assert 20 < thr < 220  # between the air/lung and the tissue classes
    crop8 = m3lung_lung_crop_8bit(img8)
    crop_hu = m3lung_lung_crop(hu)
    assert not crop8.fallback
    assert all(abs(a - b) <= 3 for a, b in zip(crop8.bbox, crop_hu.bbox))
    assert gt[crop8.bbox[0]:crop8.bbox[1], crop8.bbox[2]:crop8.bbox[3]].sum() == gt.sum()
    assert crop8.image.shape == (224, 224) and crop8.image.max() <= 255
    rgb = np.repeat(img8[..., None], 3, axis=-1)
    assert m3lung_lung_crop_8bit(rgb).bbox == crop8.bbox
    assert m3lung_lung_crop_8bit(img8, threshold=thr, smooth_sigma=0).bbox[1] < TABLE_ROWS[0]


@pytest.mark.realdata
def test_lung_crop_8bit_real_png_coverage():
    if not (PNG_DIR / "ct").is_dir():
        pytest.skip(f"real data folder absent: {PNG_DIR}")
    from PIL import Image

    files = sorted((PNG_DIR / "ct").glob("*.png"))
    assert len(files) >= 50
    pick = files[:: max(1, len(files) // 50)][:50]
    cov, dice = [], []
    for f in pick:
        img = np.asarray(Image.open(f).convert("L"))
        gt = np.asarray(Image.open(PNG_DIR / "lungs" / f.name).convert("L")) > 127
        crop = m3lung_lung_crop_8bit(img, out_size=None)
        r0, r1, c0, c1 = crop.bbox
        if gt.sum():
            cov.append(gt[r0:r1, c0:c1].sum() / gt.sum())
        dice.append(2 * (crop.lung_mask & gt).sum() / max(crop.lung_mask.sum() + gt.sum(), 1))
    assert np.mean(cov) >= 0.95
    assert np.mean(dice) >= 0.75  # the step-5 mask is a usable lung mask (benchmark: ~0.86 on all 1614)
