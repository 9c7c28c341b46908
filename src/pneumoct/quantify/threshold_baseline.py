"""Threshold lesion baseline: ground-glass and consolidation by Hounsfield units inside the lung.

This is a **baseline**, not a learned model. It labels lung voxels by density (ground-glass ≈ −750…−300 HU,
consolidation ≈ −300…+100 HU) after removing thin bright structures (vessels, bronchial walls, fissures), and is
meant as a transparent reference for the learned lesion segmenter and as a fallback when no model is available.
See ``docs/quantification.md`` for the method and its known failure modes.

All morphology is 2D, per axial slice (in-plane), on the lung's bounding box only, so a 512×512×150 study runs in
about a second or two on two CPU cores. Output labels follow :mod:`pneumoct.types`: ``LESION_GGO`` (1) and
``LESION_CONSOLIDATION`` (2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO

METHOD = "threshold-baseline"

__all__ = ["LesionFinding", "find_lesions_threshold", "inplane_disk", "METHOD"]


@dataclass
class LesionFinding:
    """A lesion mask produced by some lesion finder.

    mask: (Z, Y, X) uint8, canonical orientation; 0 background, 1 ground-glass (``LESION_GGO``),
        2 consolidation (``LESION_CONSOLIDATION``).
    probability_map: optional (Z, Y, X) float32 voxel probability of "lesion"; ``None`` for the threshold baseline,
        which has no calibrated voxel probability (use
        :func:`pneumoct.quantify.measures.lesion_probability_from_area` for a per-slice score).
    method: who made the mask; ``"threshold-baseline"`` for :func:`find_lesions_threshold`.
    params: the parameters used and a few counters, JSON-serialisable.
    """

    mask: np.ndarray
    probability_map: np.ndarray | None = None
    method: str = METHOD
    params: dict[str, Any] = field(default_factory=dict)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def inplane_disk(radius_mm: float, spacing_yx: Sequence[float]) -> np.ndarray:
    """2D footprint of the pixels whose centres lie within ``radius_mm`` of the centre (anisotropic pixels ok).

    Returns a boolean (2r_y+1, 2r_x+1) array; a radius below one pixel gives the 1×1 identity footprint.
    """
    sy, sx = float(spacing_yx[0]), float(spacing_yx[1])
    ry = int(np.floor(radius_mm / sy + 1e-9)) if radius_mm > 0 else 0
    rx = int(np.floor(radius_mm / sx + 1e-9)) if radius_mm > 0 else 0
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    return (yy * sy) ** 2 + (xx * sx) ** 2 <= radius_mm**2 + 1e-9


def _dilate_inplane(mask: np.ndarray, fp2d: np.ndarray) -> np.ndarray:
    """Per-slice binary dilation, computed only around each slice's occupied bounding box (fast on sparse masks)."""
    out = np.zeros_like(mask)
    ry, rx = fp2d.shape[0] // 2, fp2d.shape[1] // 2
    Y, X = mask.shape[1:]
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        sl = mask[z]
        rows = np.flatnonzero(sl.any(axis=1))
        cols = np.flatnonzero(sl.any(axis=0))
        y0, y1 = max(rows[0] - ry, 0), min(rows[-1] + ry + 1, Y)
        x0, x1 = max(cols[0] - rx, 0), min(cols[-1] + rx + 1, X)
        out[z, y0:y1, x0:x1] = ndi.binary_dilation(sl[y0:y1, x0:x1], structure=fp2d)
    return out


def _open_inplane(mask: np.ndarray, fp2d: np.ndarray) -> np.ndarray:
    """Per-slice binary opening with ``fp2d`` (erosion then dilation), clipped to ``mask``."""
    if fp2d.size == 1:
        return mask.copy()
    eroded = ndi.binary_erosion(mask, structure=fp2d[None])  # fast on sparse masks (early exit)
    return _dilate_inplane(eroded, fp2d) & mask


def _bbox_region(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped to the array), or None if empty."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        out.append(slice(max(int(idx[0]) - margin[ax], 0), min(int(idx[-1]) + margin[ax] + 1, mask.shape[ax])))
    return tuple(out)  # type: ignore[return-value]


def _close_inplane(mask: np.ndarray, fp2d: np.ndarray) -> np.ndarray:
    """Per-slice binary closing with ``fp2d``; the caller keeps a margin of at least the footprint radius."""
    if fp2d.size == 1:
        return mask.copy()
    return ndi.binary_erosion(_dilate_inplane(mask, fp2d), structure=fp2d[None], border_value=1)


def find_lesions_threshold(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing: Sequence[float],
    *,
    ggo_range: tuple[float, float] = (-750.0, -300.0),
    consolidation_range: tuple[float, float] = (-300.0, 100.0),
    min_lesion_ml: float = 0.1,
    vessel_radius_mm: float = 2.5,
    pleural_margin_mm: float = 1.5,
    smoothing_sigma_mm: float = 0.75,
    halo_px: int = 1,
    consolidation_edge_hu: float = -450.0,
) -> LesionFinding:
    """Find ground-glass (1) and consolidation (2) voxels by HU thresholds inside the lung.

    Steps (morphology in-plane, per axial slice, on the lung's bounding box):

    1. **Denoise**: Gaussian smoothing in-plane (σ = ``smoothing_sigma_mm``), normalised over lung voxels only
       (normalised convolution), so the chest wall and mediastinum do not bleed into the lung rim.
    2. **Dense mask**: lung voxels with smoothed HU ≥ ``ggo_range[0]`` (everything denser than aerated lung).
    3. **Thin-structure suppression**: opening of the dense mask with a disk of radius ``vessel_radius_mm``.
       "Vessel" (not lesion) = what the opening removes (vessels, bronchial walls, fissures: anything narrower than
       about 2×radius in-plane) ∪ consolidation-range cores too thin for the disk (a vessel whose partial-volume
       sleeve made the dense region look broad) ∪ anything above ``consolidation_range[1]`` (contrast, calcium).
       A ``halo_px`` halo around vessels is excluded from the GGO class.
    4. **Classes**: consolidation = opened-dense ∩ ``consolidation_range``, itself opened with the disk, on the
       whole lung mask (dense subpleural consolidation is kept). GGO = opened-dense ∩ ``ggo_range`` inside the lung
       eroded by ``pleural_margin_mm`` (avoids the partial-volume rim along the chest wall), minus the halo. Then:
       GGO-range voxels touching consolidation with HU ≥ ``consolidation_edge_hu`` become consolidation (its
       partial-volume edge); GGO is kept only within a disk radius (3D geodesic steps) of GGO broad enough to hold
       the disk (drops partial-volume sleeves of vessels and the thin shell around consolidation); dense voxels in
       gaps of the GGO narrower than the disk (per-slice closing) join the GGO (vessels crossing ground glass).
       Ranges are half-open at the GGO/consolidation boundary: GGO is ``lo <= h < hi``, consolidation
       ``lo <= h <= hi``.
    5. **Size filter**: 3D connected components (26-connectivity) of GGO ∪ consolidation smaller than
       ``min_lesion_ml`` are dropped.

    Args:
        hu: (Z, Y, X) Hounsfield units, canonical orientation.
        lung_mask: (Z, Y, X) lung labels (any value > 0 is lung).
        spacing: (z, y, x) voxel spacing in mm.

    Returns:
        :class:`LesionFinding` with ``method == "threshold-baseline"``.

    Raises:
        ValueError: shapes differ, spacing invalid, or ``hu`` has no negative values (not Hounsfield units).
    """
    hu = np.asarray(hu)
    lung_mask = np.asarray(lung_mask)
    if hu.ndim != 3 or hu.shape != lung_mask.shape:
        raise ValueError(f"hu and lung_mask must be 3D arrays of the same shape, got {hu.shape} and {lung_mask.shape}")
    sp = _check_spacing(spacing)
    g_lo, g_hi = (float(v) for v in ggo_range)
    c_lo, c_hi = (float(v) for v in consolidation_range)
    if not (g_lo < g_hi <= c_lo < c_hi):
        raise ValueError("expected ggo_range[0] < ggo_range[1] <= consolidation_range[0] < consolidation_range[1]")

    voxel_ml = float(np.prod(sp)) / 1000.0
    fp_vessel = inplane_disk(vessel_radius_mm, sp[1:])
    fp_pleura = inplane_disk(pleural_margin_mm, sp[1:])
    sigma_px = (0.0, smoothing_sigma_mm / sp[1], smoothing_sigma_mm / sp[2])
    params: dict[str, Any] = {
        "method": METHOD,
        "ggo_range_hu": [g_lo, g_hi],
        "consolidation_range_hu": [c_lo, c_hi],
        "min_lesion_ml": float(min_lesion_ml),
        "vessel_radius_mm": float(vessel_radius_mm),
        "vessel_footprint_px_yx": [int(s) for s in fp_vessel.shape],
        "pleural_margin_mm": float(pleural_margin_mm),
        "smoothing_sigma_mm": float(smoothing_sigma_mm),
        "halo_px": int(halo_px),
        "consolidation_edge_hu": float(consolidation_edge_hu),
        "connectivity": 26,
        "morphology": "2D per axial slice",
    }

    out = np.zeros(hu.shape, dtype=np.uint8)
    lung_full = lung_mask > 0
    zs = np.flatnonzero(lung_full.any(axis=(1, 2)))
    if zs.size == 0:
        params.update(note="lung mask is empty; nothing searched", lesion_components=0)
        return LesionFinding(mask=out, params=params)
    ys = np.flatnonzero(lung_full[zs[0] : zs[-1] + 1].any(axis=(0, 2)))
    xs = np.flatnonzero(lung_full[zs[0] : zs[-1] + 1].any(axis=(0, 1)))
    pad_y = max(fp_vessel.shape[0] // 2, fp_pleura.shape[0] // 2, 3) + 1
    pad_x = max(fp_vessel.shape[1] // 2, fp_pleura.shape[1] // 2, 3) + 1
    # the crop is padded in-plane with non-lung so every morphology border is "outside the lung"
    bz = slice(int(zs[0]), int(zs[-1]) + 1)
    by = slice(int(ys[0]), int(ys[-1]) + 1)
    bx = slice(int(xs[0]), int(xs[-1]) + 1)
    lung = np.pad(lung_full[bz, by, bx], ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    h = np.pad(hu[bz, by, bx].astype(np.float32), ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    if float(h[lung].min()) >= 0.0:
        raise ValueError("hu has no negative values inside the lung: this does not look like Hounsfield units")

    # 1. normalised in-plane Gaussian smoothing over lung voxels only
    if smoothing_sigma_mm > 0:
        w = lung.astype(np.float32)
        num = ndi.gaussian_filter(h * w, sigma_px, truncate=2.5)
        den = ndi.gaussian_filter(w, sigma_px, truncate=2.5)
        np.divide(num, den, out=h, where=lung)
        del num, den, w

    # 2. dense mask and 3. thin-structure suppression
    dense = lung & (h >= g_lo)
    opened = _open_inplane(dense, fp_vessel)
    cons_cand = opened & (h >= c_lo) & (h <= c_hi)
    cons = _open_inplane(cons_cand, fp_vessel)
    # vessels / bronchial walls / fissures: dense structures too thin for the disk, thin consolidation-range cores
    # whose partial-volume sleeve made the dense region look broad, and anything above the consolidation range
    # (contrast-filled vessels, calcification)
    vessel = (dense & ~opened) | (cons_cand & ~cons) | (opened & (h > c_hi))
    if halo_px > 0 and vessel.any():
        k = 2 * int(halo_px) + 1
        halo = ndi.maximum_filter(vessel.view(np.uint8), size=(1, k, k)).view(bool)
    else:
        halo = vessel

    # 4. classes. Consolidation uses the whole lung mask (dense subpleural consolidation is kept); GGO uses the lung
    # eroded at the pleura and excludes the partial-volume halo of vessels.
    lung_ggo = np.zeros_like(lung)
    reg = _bbox_region(opened, (0, fp_pleura.shape[0] // 2 + 1, fp_pleura.shape[1] // 2 + 1))
    if reg is not None:  # only where there are candidates (the crop's padding keeps the margin in bounds)
        lung_ggo[reg] = ndi.binary_erosion(lung[reg], structure=fp_pleura[None]) if fp_pleura.size > 1 else lung[reg]
    ggo = opened & (h >= g_lo) & (h < g_hi) & lung_ggo & ~halo
    # 4b. consolidation edge: GGO-range voxels touching consolidation (26-neighbourhood) at or above
    # `consolidation_edge_hu` are the partial-volume edge of the consolidation
    n_edge = 0
    if cons.any() and ggo.any():
        reg = _bbox_region(cons, (1, 1, 1))
        near = np.zeros_like(cons)
        near[reg] = ndi.maximum_filter(cons[reg].view(np.uint8), size=3).view(bool)
        edge = near & ggo & (h >= float(consolidation_edge_hu))
        cons |= edge
        ggo &= ~edge
        n_edge = int(edge.sum())
    # 4c. GGO must itself be broad: GGO voxels are kept only within `reach` 3D steps (26-neighbourhood, through
    # GGO) of a part that holds the disk in-plane. This removes partial-volume sleeves along vessels and the thin
    # shell around a consolidation, but keeps narrow parts of a lesion (e.g. where a vessel cuts it in one slice)
    n_ggo_before = int(ggo.sum())
    if ggo.any():
        reach = max(fp_vessel.shape) // 2
        broad = _open_inplane(ggo, fp_vessel)
        if reach > 0 and broad.any():
            ggo = ndi.binary_dilation(broad, structure=np.ones((3, 3, 3), bool), iterations=reach, mask=ggo)
        else:
            ggo = broad
    n_sleeve = n_ggo_before - int(ggo.sum())
    # 4d. vessels crossing ground glass: dense voxels in gaps of the GGO narrower than the disk (per-slice closing)
    # belong to the GGO lesion
    n_fill = 0
    if ggo.any():
        fill = _close_inplane(ggo, fp_vessel) & ~ggo & dense & ~cons & lung_ggo
        ggo |= fill
        n_fill = int(fill.sum())

    # 5. 3D size filter (26-connectivity) on GGO ∪ consolidation
    lesion = ggo | cons
    labels, n = ndi.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    n_kept = 0
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes * voxel_ml >= float(min_lesion_ml)
        keep[0] = False
        n_kept = int(keep[1:].sum())
        kept = keep[labels]
        ggo &= kept
        cons &= kept
    crop = np.zeros(lung.shape, dtype=np.uint8)
    crop[ggo] = LESION_GGO
    crop[cons] = LESION_CONSOLIDATION
    out[bz, by, bx] = crop[:, pad_y : pad_y + (by.stop - by.start), pad_x : pad_x + (bx.stop - bx.start)]

    params.update(
        thin_structure_voxels=int(vessel.sum()),
        consolidation_edge_voxels_relabelled=n_edge,
        thin_ggo_voxels_dropped=n_sleeve,
        ggo_gap_voxels_filled=n_fill,
        lesion_components=n_kept,
        lesion_components_dropped_small=int(n - n_kept),
        ggo_voxels=int(np.count_nonzero(crop == LESION_GGO)),
        consolidation_voxels=int(np.count_nonzero(crop == LESION_CONSOLIDATION)),
    )
    return LesionFinding(mask=out, probability_map=None, method=METHOD, params=params)
