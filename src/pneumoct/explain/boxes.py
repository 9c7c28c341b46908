"""Saliency-map utilities: normalise, combine, register, draw, and extract lesion boxes.

Model-agnostic: every function takes plain 2D numpy arrays, so any explanation method (integrated gradients,
Grad-CAM / activation mapping, occlusion, ...) can be fed in once the networks exist.

References
----------
* Hu et al., "Weakly Supervised Deep Learning for COVID-19 Infection Detection and Classification from CT Images"
  (``/work/shared/seeds/weakly-supervised-multiscale.txt``), Methods, "Weakly Supervised Lesions Localisation":
  A. Category-Specific Saliency (integrated gradients at Conv3/4/5, joint saliency = pixel-wise product) and
  B. Bounding Box Extraction (|saliency| -> 5x5 Gaussian -> Isodata -> closing -> components above an area -> boxes).
* Wu et al., JCS (``/work/shared/seeds/jcs.txt``), Sec. III-A-2, Eqs. (1)-(2): activation maps are computed on the
  feature grid and normalised to (0, 1); ``resize_map_to`` stretches such a map onto the input slice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_isodata
from skimage.morphology import disk

__all__ = [
    "Box",
    "GAUSS_5X5_SIGMA",
    "boxes_from_saliency",
    "boxes_from_mask",
    "saliency_foreground",
    "restrict_map_to_region",
    "dilate_region_mm",
    "map_informativeness",
    "rescale_boxes",
    "normalise_map",
    "joint_saliency",
    "resize_map_to",
    "heat_colormap",
    "overlay_map_rgb",
    "draw_boxes_rgb",
]

#: sigma of the 5x5 Gaussian kernel. The paper gives only the kernel size; OpenCV's ``GaussianBlur(ksize=5,
#: sigma=0)`` derives sigma = 0.3*((5-1)*0.5 - 1) + 0.8 = 1.1 from it, and we use the same value with a radius-2
#: (5-tap) kernel.
GAUSS_5X5_SIGMA = 1.1


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, half-open in rows ``[r0, r1)`` and columns ``[c0, c1)`` (numpy slicing order).

    ``score`` is the mean and ``peak`` the max of the smoothed |saliency| over the component's pixels. ``area`` is
    the component's pixel count, which is not the box area (``box_area``).
    """

    r0: int
    r1: int
    c0: int
    c1: int
    score: float
    peak: float
    area: int

    @property
    def box_area(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_2d_float(m, name: str = "map") -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2D (H, W), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def normalise_map(m) -> np.ndarray:
    """Min-max scale a 2D map to [0, 1] (float64). NaN/inf become 0 first. A constant map returns all zeros."""
    a = _as_2d_float(m)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0.0:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def joint_saliency(maps: Sequence, *, normalise: bool = True, absolute: bool = True) -> np.ndarray:
    """Joint saliency: the pixel-wise product of several maps of the same shape.

    Hu et al., Methods, A. Category-Specific Saliency: "a joint saliency can be obtained ... by pixel-wise
    multiplication between the multi-scale integrated gradients" (Conv3, Conv4, Conv5). Maps computed at different
    resolutions must be registered to one shape first (``resize_map_to``). With ``absolute`` each map's magnitude is
    used (negative attributions of two maps would otherwise multiply to a positive one); with ``normalise`` each map
    is scaled to [0, 1] before the product, so that no layer dominates by its scale. The result is in [0, 1] when
    ``normalise`` is true. A region survives only where *all* maps are high.
    """
    maps = list(maps)
    if not maps:
        raise ValueError("joint_saliency needs at least one map")
    arrays = [_as_2d_float(m, f"maps[{i}]") for i, m in enumerate(maps)]
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"maps[{i}] has shape {a.shape}, expected {shape}; register with resize_map_to first")
    out = np.ones(shape, dtype=np.float64)
    for a in arrays:
        if absolute:
            a = np.abs(a)
        out *= normalise_map(a) if normalise else a
    return out


def resize_map_to(m, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D map onto ``shape``, registered by pixel centres.

    A map computed on a feature grid of an input of shape S covers exactly the same field of view as the input, so
    it is stretched to S with half-pixel-centre alignment (output pixel i samples input coordinate
    ``(i + 0.5) * in/out - 0.5``, the ``align_corners=False`` convention of deep-learning frameworks). Edges are
    clamped. Relative positions (e.g. a peak at 25 % of the width) are preserved.
    """
    a = _as_2d_float(m)
    oh, ow = (int(shape[0]), int(shape[1]))
    if oh <= 0 or ow <= 0:
        raise ValueError(f"target shape must be positive, got {shape}")
    if a.shape == (oh, ow):
        return a.copy()
    ih, iw = a.shape
    rr = (np.arange(oh) + 0.5) * (ih / oh) - 0.5
    cc = (np.arange(ow) + 0.5) * (iw / ow) - 0.5
    rr = np.clip(rr, 0, ih - 1)
    cc = np.clip(cc, 0, iw - 1)
    grid = np.meshgrid(rr, cc, indexing="ij")
    return ndi.map_coordinates(a, grid, order=1, mode="nearest")


def saliency_foreground(
    saliency,
    *,
    sigma: float = GAUSS_5X5_SIGMA,
    kernel_radius: int = 2,
    threshold: str | float = "isodata",
    closing_radius: int = 2,
    region=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first four steps of ``boxes_from_saliency``: returns ``(smoothed |saliency|, closed binary mask)``.

    A float ``threshold`` is applied to the smoothed map scaled to [0, 1] (foreground = value > threshold).
    A constant (e.g. all-zero) map has no foreground.

    ``region`` (optional bool mask of the map's shape, e.g. the lung): the threshold is computed from the pixels
    inside the region only (Isodata on their values; a float cuts the smoothed map scaled to [0, 1] over the
    region), the blur averages over region pixels only (normalised convolution, so the region's border is not
    darkened by the zeros outside), and the foreground is kept inside the region, also after the closing. Without
    it a map that is zero outside the lung would be
    thresholded into "lung vs not lung" and give one box around both lungs. An empty region, or a map constant
    inside it, has no foreground.
    """
    a = _as_2d_float(saliency, "saliency")
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != a.shape:
            raise ValueError(f"region has shape {region.shape}, expected {a.shape}")
    # Hu et al. (weakly-supervised multiscale), Methods, B. Bounding Box Extraction: "we took the absolute value
    # of the joint saliency map"
    a = np.abs(a)
    # Hu et al. (weakly-supervised multiscale), Methods, B.: "and blurred it with a 5x5 Gaussian kernel"
    # (radius 2 -> 5 taps per axis; sigma 1.1 as OpenCV derives it for ksize 5, see GAUSS_5X5_SIGMA)
    smooth = ndi.gaussian_filter(a, sigma=sigma, radius=int(kernel_radius), mode="nearest")
    if region is not None:
        # normalised convolution: the blur averages over region pixels only, so the zeros outside do not darken
        # the region's border (which would make the border "background" and the interior "foreground")
        weight = ndi.gaussian_filter(region.astype(np.float64), sigma=sigma, radius=int(kernel_radius),
                                     mode="nearest")
        inside = ndi.gaussian_filter(np.where(region, a, 0.0), sigma=sigma, radius=int(kernel_radius),
                                     mode="nearest")
        smooth = np.where(region, inside / np.maximum(weight, 1e-12), 0.0)
    vals = smooth if region is None else smooth[region]
    if vals.size == 0 or float(vals.max() - vals.min()) <= 1e-12 * max(1.0, float(np.abs(vals).max())):
        return smooth, np.zeros(smooth.shape, dtype=bool)
    # Hu et al. (weakly-supervised multiscale), Methods, B.: "we thresholded the blurred saliency map using the
    # Isodata thresholding method [31]" (threshold midway between foreground and background means, iterated)
    if isinstance(threshold, str):
        if threshold.lower() != "isodata":
            raise ValueError(f"threshold must be 'isodata' or a float in [0, 1], got {threshold!r}")
        fg = smooth > threshold_isodata(vals)
    else:
        lo, hi = float(vals.min()), float(vals.max())
        fg = (smooth - lo) / (hi - lo) > float(threshold)
    if region is not None:
        fg &= region
    # Hu et al. (weakly-supervised multiscale), Methods, B.: "we applied morphological operations (dilation
    # followed by erosion) to close the small holes in the foreground" -> binary closing with a disk. The image is
    # padded so the closing does not erode objects touching the border.
    if closing_radius and closing_radius > 0:
        r = int(closing_radius)
        padded = np.pad(fg, r, mode="constant")
        padded = ndi.binary_closing(padded, structure=disk(r).astype(bool))
        fg = padded[r:-r, r:-r]
        if region is not None:
            fg &= region
    return smooth, fg


def boxes_from_saliency(
    saliency,
    *,
    sigma: float = GAUSS_5X5_SIGMA,
    kernel_radius: int = 2,
    threshold: str | float = "isodata",
    closing_radius: int = 2,
    min_area_px: int = 20,
    connectivity: int = 2,
    region=None,
) -> list[Box]:
    """Bounding boxes of the salient regions of a 2D (joint) saliency map, Hu et al.'s pipeline.

    Steps: |saliency| -> 5x5 Gaussian blur -> Isodata threshold -> morphological closing -> connected components
    with ``area >= min_area_px`` -> minimum enclosing axis-aligned box of each component. The paper states no
    closing radius or area threshold; ``closing_radius=2`` (disk) and ``min_area_px=20`` are our defaults, meant for
    ~256x256 slices. ``connectivity`` 2 = 8-neighbour components, 1 = 4-neighbour.

    ``region`` (e.g. the lung of the slice) restricts the threshold and the foreground to it
    (``saliency_foreground``); use it with a map restricted by ``restrict_map_to_region``.

    Returns boxes sorted by decreasing ``score`` (mean smoothed |saliency| inside the component); an all-zero or
    constant map gives ``[]``.
    """
    smooth, fg = saliency_foreground(
        saliency, sigma=sigma, kernel_radius=kernel_radius, threshold=threshold, closing_radius=closing_radius,
        region=region,
    )
    if not fg.any():
        return []
    # Hu et al. (weakly-supervised multiscale), Methods, B.: "we took the connected components with areas above a
    # certain threshold"
    structure = ndi.generate_binary_structure(2, 2 if connectivity == 2 else 1)
    labels, n = ndi.label(fg, structure=structure)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(smooth), labels, idx)
    means = ndi.mean(smooth, labels, idx)
    objs = ndi.find_objects(labels)
    # per-component peak inside each component's box (ndi.maximum sorts the whole image: 40x slower)
    peaks = np.array([float(smooth[sl][labels[sl] == k + 1].max()) if sl is not None else 0.0
                      for k, sl in enumerate(objs)])
    boxes: list[Box] = []
    for k in range(n):
        if areas[k] < min_area_px or objs[k] is None:
            continue
        rs, cs = objs[k]
        # Hu et al. (weakly-supervised multiscale), Methods, B.: "and fit the minimum rectangular bounding boxes
        # around them" (axis-aligned, half-open)
        boxes.append(
            Box(
                r0=int(rs.start), r1=int(rs.stop), c0=int(cs.start), c1=int(cs.stop),
                score=float(means[k]), peak=float(peaks[k]), area=int(areas[k]),
            )
        )
    boxes.sort(key=lambda b: (-b.score, b.r0, b.c0))
    return boxes


def boxes_from_mask(mask2d, min_area_px: int = 1, *, connectivity: int = 2) -> list[Box]:
    """Bounding boxes of the connected components of a 2D mask (pixels ``> 0``), e.g. one slice of a lesion mask.

    The same ``Box`` type as ``boxes_from_saliency`` (so ``draw_boxes_rgb`` and the scores take them): ``area`` is
    the component's pixel count, ``score`` and ``peak`` are the mean and max of the binary mask over it (1.0).
    Components with fewer than ``min_area_px`` pixels are dropped (specks; for a physical size use
    ``area_mm2 / (row_mm * col_mm)``). ``connectivity`` 2 = 8-neighbour, 1 = 4-neighbour. Sorted by decreasing
    ``area``; an empty mask gives ``[]``.
    """
    m = np.asarray(mask2d)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {m.shape}")
    fg = np.nan_to_num(m.astype(np.float64)) > 0
    if not fg.any():
        return []
    structure = ndi.generate_binary_structure(2, 2 if connectivity == 2 else 1)
    labels, n = ndi.label(fg, structure=structure)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    boxes: list[Box] = []
    for k, obj in enumerate(ndi.find_objects(labels), start=1):
        if obj is None or areas[k] < max(1, int(min_area_px)):
            continue
        rs, cs = obj
        boxes.append(Box(r0=int(rs.start), r1=int(rs.stop), c0=int(cs.start), c1=int(cs.stop),
                         score=1.0, peak=1.0, area=int(areas[k])))
    boxes.sort(key=lambda b: (-b.area, b.r0, b.c0))
    return boxes


def dilate_region_mm(region, dilate_mm: float, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """A 2D bool region grown by ``dilate_mm`` (Euclidean, in mm, with ``spacing`` = (row mm, column mm))."""
    r = np.asarray(region) > 0
    if r.ndim != 2:
        raise ValueError(f"region must be 2D (H, W), got shape {r.shape}")
    if dilate_mm <= 0 or not r.any() or r.all():
        return r.copy()
    # only pixels within dilate_mm of the region can join it: the distance transform runs on the region's box
    # grown by that much (+1 px), where every pixel's nearest region pixel lies — the same pixels as on the whole
    # image, on a fraction of it
    rows, cols = np.flatnonzero(r.any(axis=1)), np.flatnonzero(r.any(axis=0))
    my = int(np.ceil(float(dilate_mm) / float(spacing[0]))) + 1
    mx = int(np.ceil(float(dilate_mm) / float(spacing[1]))) + 1
    box = (slice(max(int(rows[0]) - my, 0), int(rows[-1]) + my + 1),
           slice(max(int(cols[0]) - mx, 0), int(cols[-1]) + mx + 1))
    out = np.zeros_like(r)
    sub = r[box]
    if sub.all():
        out[box] = True
        return out
    dist = ndi.distance_transform_edt(~sub, sampling=(float(spacing[0]), float(spacing[1])))
    out[box] = dist <= float(dilate_mm)
    return out


def restrict_map_to_region(m, region, *, dilate_mm: float = 0.0, spacing: Sequence[float] = (1.0, 1.0),
                           grown: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A map shown only inside a region (e.g. the lung of the slice): returns ``(map01, region_used)``.

    The region is grown by ``dilate_mm`` (``dilate_region_mm``; a few mm keep subpleural lesions that the lung
    mask may have cut) and the map is kept inside the grown region, 0 outside, so heat on the chest wall or
    mediastinum never shows and never becomes a box. The map is min-max rescaled to [0, 1] by the values on the
    region itself (not the grown band, so a hot chest wall just outside the lung cannot set the scale; the band is
    clipped to [0, 1]): the strongest pixel of the region is 1 whatever the map did outside. An empty region gives
    an all-zero map; a map constant on the region gives 0 there too (nothing stands out). NaN/inf count as 0.
    ``grown``: ``dilate_region_mm(region, dilate_mm, spacing)`` when the caller has it already (several maps on
    one slice).
    """
    a = _as_2d_float(m)
    r0 = np.asarray(region) > 0
    if r0.shape != a.shape:
        raise ValueError(f"region has shape {r0.shape}, expected {a.shape}")
    r = dilate_region_mm(r0, dilate_mm, spacing) if grown is None else np.asarray(grown, bool)
    out = np.zeros_like(a)
    if not r0.any():
        return out, r
    vals = a[r0]
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo > 0.0:
        out[r] = np.clip((a[r] - lo) / (hi - lo), 0.0, 1.0)
    return out, r


def map_informativeness(m, region, boxes: Iterable[Box] | None = None, *, min_spread: float = 0.15,
                        max_box_cover: float = 0.5) -> dict:
    """Does a location map single anything out inside a region (the lung)? Returns a dict with ``informative``
    (bool), ``spread`` (95th minus 50th percentile of the map inside the region; map values as the model gave
    them, in [0, 1]), ``box_cover`` (share of the region's pixels inside the union of ``boxes``) and ``reason``
    (a short sentence when not informative, else "").

    Not informative when the map is nearly flat inside the region (``spread < min_spread``: the top 5 % is
    hardly above the median) or when its boxes cover more than ``max_box_cover`` of the region (a box around
    "the whole lung" says nothing about where a finding is). Both limits are display rules of this project,
    not measured cut-offs. An empty region is not informative.
    """
    a = _as_2d_float(m)
    r = np.asarray(region) > 0
    if r.shape != a.shape:
        raise ValueError(f"region has shape {r.shape}, expected {a.shape}")
    n = int(r.sum())
    if n == 0:
        return {"informative": False, "spread": 0.0, "box_cover": 0.0, "reason": "no lung in this slice"}
    p50, p95 = np.percentile(a[r], [50, 95])
    spread = float(p95 - p50)
    covered = np.zeros(a.shape, bool)
    for b in boxes or []:
        covered[b.slices] = True
    cover = float((covered & r).sum()) / n
    reasons = []
    if spread < min_spread:
        reasons.append(f"nearly flat inside the lung (95th - 50th percentile {spread:.2f} < {min_spread:g})")
    if cover > max_box_cover:
        reasons.append(f"its boxes cover {cover:.0%} of the lung (> {max_box_cover:.0%})")
    return {"informative": not reasons, "spread": spread, "box_cover": cover, "reason": "; ".join(reasons)}


def rescale_boxes(boxes: Iterable[Box], from_shape: tuple[int, int], to_shape: tuple[int, int]) -> list[Box]:
    """Boxes of an image of ``from_shape`` moved onto the same field of view resampled to ``to_shape`` (to draw
    them after resizing the picture, so the outline stays sharp). Edges are scaled and rounded outward; every box
    keeps at least one pixel. ``score``, ``peak`` and ``area`` are kept as they were."""
    fy = float(to_shape[0]) / float(from_shape[0])
    fx = float(to_shape[1]) / float(from_shape[1])
    out = []
    for b in boxes:
        r0, c0 = int(np.floor(b.r0 * fy)), int(np.floor(b.c0 * fx))
        r1, c1 = max(r0 + 1, int(np.ceil(b.r1 * fy))), max(c0 + 1, int(np.ceil(b.c1 * fx)))
        out.append(Box(r0=r0, r1=min(r1, int(to_shape[0])), c0=c0, c1=min(c1, int(to_shape[1])),
                       score=b.score, peak=b.peak, area=b.area))
    return out


# ----------------------------------------------------------------------------------------------- drawing
# A small "jet-like" heat colormap: anchors (position, R, G, B) interpolated linearly. No matplotlib needed.
_HEAT_ANCHORS = np.array(
    [
        [0.00, 0, 0, 128],
        [0.15, 0, 0, 255],
        [0.35, 0, 255, 255],
        [0.55, 255, 255, 0],
        [0.80, 255, 64, 0],
        [1.00, 128, 0, 0],
    ],
    dtype=np.float64,
)


def heat_colormap(map01) -> np.ndarray:
    """Map values in [0, 1] (clipped) to uint8 RGB heat colours, shape ``(..., 3)``: dark blue -> cyan -> yellow
    -> red -> dark red."""
    v = np.clip(np.nan_to_num(np.asarray(map01, dtype=np.float64)), 0.0, 1.0)
    out = np.empty(v.shape + (3,), dtype=np.float64)
    for ch in range(3):
        out[..., ch] = np.interp(v, _HEAT_ANCHORS[:, 0], _HEAT_ANCHORS[:, ch + 1])
    return np.round(out).astype(np.uint8)


def _gray_to_rgb(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 3:
        return a.astype(np.uint8, copy=True)
    if a.ndim != 2:
        raise ValueError(f"image must be (H, W) gray or (H, W, 3) RGB, got {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(normalise_map(a) * 255.0).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2)


def overlay_map_rgb(slice_gray_uint8, map01, alpha: float = 0.4) -> np.ndarray:
    """Blend heat colours of ``map01`` over a gray slice: ``(1 - alpha*w) * gray + alpha*w * heat`` per pixel.

    ``map01`` is clipped to [0, 1] (call ``normalise_map`` first for raw maps) and is resized onto the slice with
    ``resize_map_to`` when shapes differ. The per-pixel weight ``w`` is the map value itself, so a zero map leaves
    the slice unchanged and only salient regions are tinted. Non-uint8 slices are min-max scaled to 0..255.
    Returns ``(H, W, 3)`` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _gray_to_rgb(slice_gray_uint8).astype(np.float64)
    m = _as_2d_float(map01, "map01")
    if m.shape != rgb.shape[:2]:
        m = resize_map_to(m, rgb.shape[:2])
    m = np.clip(m, 0.0, 1.0)
    w = (alpha * m)[..., None]
    out = (1.0 - w) * rgb + w * heat_colormap(m).astype(np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_boxes_rgb(rgb, boxes: Iterable[Box], colour: tuple[int, int, int] = (0, 255, 0), thickness: int = 1):
    """Return a copy of ``rgb`` (or of a gray image turned RGB) with each box's outline drawn in ``colour``.

    The outline lies on the box's own border pixels (rows ``r0`` and ``r1-1``, columns ``c0`` and ``c1-1``),
    growing inward with ``thickness``; boxes are clipped to the image.
    """
    out = _gray_to_rgb(rgb)
    h, w = out.shape[:2]
    col = np.asarray(colour, dtype=np.uint8)
    t = max(1, int(thickness))
    for b in boxes:
        r0, r1 = max(0, b.r0), min(h, b.r1)
        c0, c1 = max(0, b.c0), min(w, b.c1)
        if r1 <= r0 or c1 <= c0:
            continue
        out[r0:min(r0 + t, r1), c0:c1] = col
        out[max(r1 - t, r0):r1, c0:c1] = col
        out[r0:r1, c0:min(c0 + t, c1)] = col
        out[r0:r1, max(c1 - t, c0):c1] = col
    return out
