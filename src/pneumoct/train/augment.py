"""Training-time augmentation of lung-cropped slices (image and lesion mask move together).

What the papers used:

- M3Lung-Sys (Sec. III-A-2, "Multi-value Window-leveling"): "the value of the window center is assigned
  randomly from -700 to -500, and the window width is assigned with a constant of 1200", which also serves as
  data augmentation; and (Sec. IV, implementation) "Random flipping is adopted as data argumentation". At
  inference it averages over centres [-700, -600, -500] (done by the model code, not here).
- JCS (Sec. IV, implementation): "For data augmentation, we use the random horizontal flip and random crop"
  (classification and segmentation), plus image mixing for the classifier (not here; batch level).

We add a moderate random rotation and a contrast jitter for the 8-bit sets whose window cannot be changed
(their exporters already windowed them), both common practice; set them to 0 / (1, 1) to follow the papers
strictly. Geometric transforms are one resampling (flip + rotation + random resized crop), bilinear for the
image and nearest for the mask, so the mask stays registered to the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..preprocess.slice_input import LESION_MODEL_WINDOW, window_input
from ..preprocess.windowing import M3LUNG_TRAIN_CENTER_RANGE, M3LUNG_WIDTH

__all__ = ["AugmentConfig", "augment_slice", "to_unit"]


@dataclass
class AugmentConfig:
    flip: bool = True  # left-right flip with probability p_flip (M3Lung-Sys, JCS)
    p_flip: float = 0.5
    rotation_deg: float = 25.0  # uniform in [-rotation_deg, rotation_deg], with probability p_rotate
    p_rotate: float = 0.5
    crop_scale: tuple[float, float] = (0.7, 1.0)  # area fraction of a random resized crop (JCS "random crop")
    p_crop: float = 0.5
    contrast: tuple[float, float] = (0.5, 1.5)  # grey rows only: factor around the crop mean
    p_contrast: float = 0.8
    window_center_range: tuple[float, float] = M3LUNG_TRAIN_CENTER_RANGE  # HU rows (M3Lung-Sys)
    window_width: float = M3LUNG_WIDTH
    # intensity randomisation applied to every row after it is in [0, 1] (bridges 8-bit exports and HU windows;
    # all off by default so the papers' settings stay as they were): window width jitter for HU rows, gamma,
    # Gaussian blur (reconstruction kernel) and additive noise, each with probability p_intensity
    window_width_range: tuple[float, float] | None = None
    gamma: tuple[float, float] | None = None
    blur_sigma: tuple[float, float] | None = None
    noise_std: tuple[float, float] | None = None
    p_intensity: float = 0.5


def to_unit(image: np.ndarray, is_hu: bool, center: float = LESION_MODEL_WINDOW[0],
            width: float = LESION_MODEL_WINDOW[1]) -> np.ndarray:
    """Evaluation input: HU crops through the fixed window, grey crops (already in [0, 1]) clipped."""
    if is_hu:
        return window_input(image, center, width)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _source_coords(size: int, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray | None:
    """Per output pixel, the (row, col) it samples in the input: crop, then rotation, then flip (inverse order
    of the forward transforms flip → rotate → crop). None = identity."""
    do_flip = bool(cfg.flip) and rng.random() < cfg.p_flip
    angle = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)) if (
        cfg.rotation_deg > 0 and rng.random() < cfg.p_rotate) else 0.0
    lo, hi = cfg.crop_scale
    do_crop = hi < 1.0 or lo < 1.0
    scale = float(rng.uniform(lo, hi)) if (do_crop and rng.random() < cfg.p_crop) else 1.0
    if not do_flip and angle == 0.0 and scale >= 1.0:
        return None
    s = float(size)
    side = s * np.sqrt(scale)
    off_r = float(rng.uniform(0.0, s - side)) if side < s else 0.0
    off_c = float(rng.uniform(0.0, s - side)) if side < s else 0.0
    r, c = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    # output pixel centre → position in the crop window of the (flipped, rotated) image
    a = side / s
    qr = off_r + (r + 0.5) * a - 0.5
    qc = off_c + (c + 0.5) * a - 0.5
    # undo rotation about the image centre
    ctr = (s - 1) / 2.0
    t = np.deg2rad(angle)
    cos, sin = np.cos(t), np.sin(t)
    pr = ctr + cos * (qr - ctr) - sin * (qc - ctr)
    pc = ctr + sin * (qr - ctr) + cos * (qc - ctr)
    if do_flip:
        pc = (s - 1) - pc
    return np.stack([pr, pc])


def _intensity(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Gamma, blur and noise on a [0, 1] image, each drawn with probability ``p_intensity`` (none when unset)."""
    if cfg.gamma and rng.random() < cfg.p_intensity:
        x = np.clip(x, 0.0, 1.0) ** float(rng.uniform(*cfg.gamma))
    if cfg.blur_sigma and rng.random() < cfg.p_intensity:
        x = ndi.gaussian_filter(x, float(rng.uniform(*cfg.blur_sigma)))
    if cfg.noise_std and rng.random() < cfg.p_intensity:
        x = x + rng.normal(0.0, float(rng.uniform(*cfg.noise_std)), x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def augment_slice(image: np.ndarray, is_hu: bool, mask: np.ndarray | None, rng: np.random.Generator,
                  cfg: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One training view of a crop: intensity (random window for HU, contrast jitter for grey), then the same
    geometric transform on image and mask. Returns ``(x01 float32 in [0, 1], mask uint8 or None)``."""
    cfg = cfg or AugmentConfig()
    image = np.asarray(image, dtype=np.float32)
    if is_hu:
        center = float(rng.uniform(*cfg.window_center_range))
        width = float(rng.uniform(*cfg.window_width_range)) if cfg.window_width_range else cfg.window_width
        x = window_input(image, center, width)
    else:
        x = np.clip(image, 0.0, 1.0)
        if rng.random() < cfg.p_contrast:
            f = float(rng.uniform(*cfg.contrast))
            m = float(x.mean())
            x = np.clip(m + (x - m) * f, 0.0, 1.0)
    x = _intensity(x, rng, cfg)
    coords = _source_coords(int(image.shape[-1]), rng, cfg)
    if coords is not None:
        x = ndi.map_coordinates(x, coords, order=1, mode="constant", cval=0.0)
        if mask is not None:
            mask = ndi.map_coordinates(np.asarray(mask, dtype=np.uint8), coords, order=0, mode="constant", cval=0)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return x, (None if mask is None else np.asarray(mask, dtype=np.uint8))
