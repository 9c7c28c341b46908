"""Threshold lesion baseline: ground-glass and consolidation by Hounsfield units inside the lung.

This is a **baseline**, not a learned model. It labels lung voxels by density (ground-glass ≈ −750…−300 HU,
consolidation ≈ −300…+100 HU) and keeps only density that looks like a lesion: broad in 3D (it holds a cylinder a
few millimetres wide and a few slices high), or a compact blob (a nodule). Vessels, vessel sleeves, bronchial walls
and fissures are thin; large vessels are tubes; tissue the lung mask took in from outside the lung (an organ dome,
the stomach wall under a gas bubble) rests on dense tissue outside the mask. It is meant as a transparent reference
for the learned lesion segmenter and as a fallback when no model is available. See ``docs/quantification.md`` for
the method, its measured performance (``benchmarks/lesion_baseline_eval.py``) and its known failure modes.

Everything runs on the lung's bounding box, on a working grid of about ``working_pixel_mm`` in-plane (512² studies
are block-averaged 2×2, 256² phantoms are used as they are), so every parameter is in mm or mL and transfers between
matrices. Morphology is 2D per axial slice, or a 2D disk stacked over a few slices (a cylinder). Output labels follow
:mod:`pneumoct.types`: ``LESION_GGO`` (1) and ``LESION_CONSOLIDATION`` (2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO

from ..parallel import map_axis, run_chunks
from ..preprocess.components import label as label_components
from ..preprocess.lung_mask import fill_holes_2d

METHOD = "threshold-baseline"

__all__ = ["LesionFinding", "find_lesions_threshold", "inplane_disk", "METHOD"]

_STRUCT26 = np.ones((3, 3, 3), dtype=bool)
_SQUARE3 = np.ones((3, 3), dtype=bool)


@dataclass
class LesionFinding:
    """A lesion mask produced by some lesion finder.

    mask: (Z, Y, X) uint8, canonical orientation; 0 background, 1 ground-glass (``LESION_GGO``),
        2 consolidation (``LESION_CONSOLIDATION``).
    probability_map: optional (Z, Y, X) float voxel probability of "lesion"; ``None`` for the threshold baseline,
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
    zs_all = np.flatnonzero(mask.any(axis=(1, 2)))

    def run(r: range) -> None:  # slices are independent: threads split them (same result)
        for z in zs_all[r.start:r.stop]:
            sl = mask[z]
            rows = np.flatnonzero(sl.any(axis=1))
            cols = np.flatnonzero(sl.any(axis=0))
            y0, y1 = max(rows[0] - ry, 0), min(rows[-1] + ry + 1, Y)
            x0, x1 = max(cols[0] - rx, 0), min(cols[-1] + rx + 1, X)
            out[z, y0:y1, x0:x1] = ndi.binary_dilation(sl[y0:y1, x0:x1], structure=fp2d)

    run_chunks(run, len(zs_all))
    return out


def _open_inplane(mask: np.ndarray, fp2d: np.ndarray) -> np.ndarray:
    """Per-slice binary opening with ``fp2d`` (erosion then dilation), clipped to ``mask``."""
    if fp2d.size == 1:
        return mask.copy()
    eroded = map_axis(lambda m: ndi.binary_erosion(m, structure=fp2d[None]), mask)  # early exit on sparse masks
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
    return map_axis(lambda m: ndi.binary_erosion(m, structure=fp2d[None], border_value=1),
                     _dilate_inplane(mask, fp2d))


def _mediastinum(lung: np.ndarray) -> np.ndarray:
    """Per slice, the non-lung pixels between the two lungs: in each row that holds lung on both sides of the
    midline column (the centre of the lung's left-right extent over the whole volume), the pixels between the
    innermost lung pixel of each side. Side-agnostic (the lung labels may be boolean)."""
    med = np.zeros_like(lung)
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    if cols.size == 0:
        return med
    c = (int(cols[0]) + int(cols[-1])) // 2
    x = np.arange(lung.shape[2], dtype=np.int32)
    right_in = np.where(lung[:, :, :c], x[None, None, :c], -1).max(axis=2)  # innermost lung column, x < c
    left_in = np.where(lung[:, :, c:], x[None, None, c:], lung.shape[2]).min(axis=2)  # innermost, x >= c
    both = (right_in >= 0) & (left_in < lung.shape[2])
    med = both[:, :, None] & (x[None, None, :] > right_in[:, :, None]) & (x[None, None, :] < left_in[:, :, None])
    return med & ~lung


def _depth_from(med: np.ndarray, zs: np.ndarray, sp_yx: Sequence[float], max_mm: float) -> np.ndarray:
    """(Z, Y, X) float32 in-plane distance (mm) to the nearest ``med`` pixel of the slice, exact up to ``max_mm``
    on the slices ``zs`` (a bool mask); 0 elsewhere. Farther pixels hold some value > ``max_mm`` (``inf`` outside
    the slice's ``med`` box grown by ``max_mm``: the Euclidean transform runs only on that box, which holds every
    pixel within ``max_mm`` of ``med`` and ``med`` itself, so the distances there are those of the whole slice)."""
    depth = np.zeros(med.shape, np.float32)
    todo = np.flatnonzero(zs)
    my = int(np.ceil(max_mm / float(sp_yx[0]))) + 1
    mx = int(np.ceil(max_mm / float(sp_yx[1]))) + 1

    def run(r: range) -> None:  # slices are independent: threads split them (the transform releases the GIL)
        for z in todo[r.start:r.stop]:
            m = med[z]
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            depth[z] = np.inf
            if rows.size == 0:  # no mediastinum in this slice: nothing is near it
                continue
            y0, y1 = max(int(rows[0]) - my, 0), min(int(rows[-1]) + my + 1, m.shape[0])
            x0, x1 = max(int(cols[0]) - mx, 0), min(int(cols[-1]) + mx + 1, m.shape[1])
            depth[z, y0:y1, x0:x1] = ndi.distance_transform_edt(~m[y0:y1, x0:x1], sampling=sp_yx)

    run_chunks(run, len(todo))
    return depth


def _erode_cyl(mask: np.ndarray, fp2d: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion with a cylinder: the in-plane disk ``fp2d`` must fit in every slice z-k..z+k."""
    e = map_axis(lambda m: ndi.binary_erosion(m, structure=fp2d[None]), mask) if fp2d.size > 1 else mask.copy()
    if k > 0 and e.any():
        e = map_axis(lambda a: _z_window(a, k, np.logical_and), e, axis=1)
    return e


def _z_window(a: np.ndarray, k: int, op: np.ufunc) -> np.ndarray:
    """Boolean (Z, ...) ``a`` reduced by ``op`` (logical and / or) over the slices z-k..z+k, slices beyond the ends
    counting as False: ``minimum_filter1d`` / ``maximum_filter1d`` along z with a zero border, by whole-slice
    operations instead of strided lines (several times faster)."""
    out = a.copy()
    for d in range(1, min(k, a.shape[0] - 1) + 1):
        op(out[d:], a[:-d], out=out[d:])
        op(out[:-d], a[d:], out=out[:-d])
    if op is np.logical_and:  # the window of the first and last k slices reaches beyond the ends
        out[:k] = False
        out[max(a.shape[0] - k, 0):] = False
    return out


def _dilate_cyl(mask: np.ndarray, fp2d: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation with a cylinder (in-plane disk ``fp2d``, slices z-k..z+k)."""
    d = _dilate_inplane(mask, fp2d) if fp2d.size > 1 else mask.copy()
    if k > 0 and d.any():
        d = map_axis(lambda a: _z_window(a, k, np.logical_or), d, axis=1)
    return d


def _open_cyl(mask: np.ndarray, fp2d: np.ndarray, k: int) -> np.ndarray:
    """Opening with a cylinder (in-plane disk, 2k+1 slices high), clipped to ``mask``: the union of all cylinders
    that fit inside ``mask``."""
    if not mask.any():
        return mask.copy()
    return _dilate_cyl(_erode_cyl(mask, fp2d, k), fp2d, k) & mask


def _reach(seeds: np.ndarray, mask: np.ndarray, n_xy: int, n_z: int) -> np.ndarray:
    """Voxels of ``mask`` reachable from ``seeds`` through ``mask`` in at most ``n_xy`` steps to one of the 8
    in-plane neighbours, of which at most ``n_z`` may also move by one slice (geodesic dilation, anisotropic)."""
    out = seeds & mask
    if not out.any():
        return out
    nz = min(n_z, n_xy)
    if nz > 0:
        out = ndi.binary_dilation(out, structure=_STRUCT26, iterations=nz, mask=mask)
    if n_xy > nz:
        out = ndi.binary_dilation(out, structure=_SQUARE3[None], iterations=n_xy - nz, mask=mask)
    return out


def _smooth_in_lung(h: np.ndarray, lung: np.ndarray, sigma_mm: float, sp: Sequence[float]) -> np.ndarray:
    """In-plane Gaussian smoothing normalised over lung voxels (normalised convolution); -1000 outside the lung."""
    if sigma_mm <= 0:
        return np.where(lung, h, np.float32(-1000.0)).astype(np.float32)
    sig = (0.0, sigma_mm / sp[1], sigma_mm / sp[2])
    w = lung.astype(np.float32)
    num = map_axis(lambda a: ndi.gaussian_filter(a, sig, truncate=2.5), h * w)  # sig[0] = 0: in-plane only
    den = map_axis(lambda a: ndi.gaussian_filter(a, sig, truncate=2.5), w)
    return np.divide(num, den, out=np.full_like(num, -1000.0), where=lung)


def _component_shape(labels: np.ndarray, n: int, sp: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per component 0..n: voxel count, bounding-box extent in mm (z, y, x) and principal standard deviations in mm
    (ascending). Index 0 is the background and meaningless."""
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    coords = np.unravel_index(idx, labels.shape)
    cnt = np.bincount(lab, minlength=n + 1).astype(np.float64)
    safe = np.maximum(cnt, 1.0)
    c = [coords[a].astype(np.float64) * sp[a] for a in range(3)]
    mean = [np.bincount(lab, c[a], minlength=n + 1) / safe for a in range(3)]
    cov = np.zeros((n + 1, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(lab, c[a] * c[b], minlength=n + 1) / safe - mean[a] * mean[b]
    sd = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0.0, None))
    ext = np.zeros((n + 1, 3))
    for i, sl in enumerate(ndi.find_objects(labels, max_label=n), start=1):
        if sl is not None:
            ext[i] = [(s.stop - s.start) * sp[a] for a, s in enumerate(sl)]
    return cnt, ext, sd


def _block_sum(a: np.ndarray, f: int) -> np.ndarray:
    """Sum over f×f in-plane blocks, float32 (the in-plane size must be a multiple of f). Strided adds are several
    times faster than a reshape-mean."""
    acc = np.zeros((a.shape[0], a.shape[1] // f, a.shape[2] // f), np.float32)
    for dy in range(f):
        for dx in range(f):
            acc += a[:, dy::f, dx::f]
    return acc


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
    working_pixel_mm: float = 1.5,
    core_radius_mm: float = 4.5,
    core_half_height_mm: float = 2.0,
    core_sigma_mm: float = 1.25,
    thick_radius_mm: float = 6.0,
    reach_mm: float = 4.5,
    reach_z_mm: float = 8.0,
    tube_elongation: float = 3.0,
    tube_max_sd_mm: float = 7.0,
    organ_face_fraction: float = 0.6,
    compact_hu: float = -400.0,
    compact_max_mm: float = 20.0,
    compact_elongation: float = 2.5,
    compact_min_ml: float = 0.02,
    compact_shell_hu: float = -650.0,
    hilar_depth_mm: float = 40.0,
    hilar_max_ml: float = 15.0,
    hilar_band: tuple[float, float] = (0.25, 0.75),
) -> LesionFinding:
    """Find ground-glass (1) and consolidation (2) voxels by HU thresholds inside the lung.

    Steps (on the lung's bounding box, on a working grid of about ``working_pixel_mm`` in-plane: the study is
    block-averaged over lung voxels by the integer factor ``int(working_pixel_mm / pixel + 0.1)``, 512² studies by
    2×2; the mask is brought back to the study grid at the end):

    1. **Denoise**: in-plane Gaussian (σ = ``smoothing_sigma_mm``) normalised over lung voxels, so the chest wall
       and mediastinum do not bleed into the lung rim.
    2. **Candidates**: dense = lung with HU ≥ ``ggo_range[0]``, opened per slice with a disk of
       ``vessel_radius_mm`` (drops vessels, bronchial walls, fissures). Consolidation = opened ∩
       ``consolidation_range``, opened again; GGO = opened ∩ ``ggo_range`` inside the lung eroded by
       ``pleural_margin_mm``, minus a ``halo_px`` halo (working-grid pixels) around the removed thin structures;
       GGO-range voxels touching consolidation with HU ≥ ``consolidation_edge_hu`` become consolidation. Ranges are
       half-open at the GGO/consolidation boundary: GGO is ``lo <= h < hi``, consolidation ``lo <= h <= hi``.
    3. **GGO cores**: on a smoother image (σ = ``core_sigma_mm``, so patchy ground glass counts), GGO that holds a
       cylinder: a disk of ``core_radius_mm`` in every slice over ±``core_half_height_mm`` (at least ±1 slice).
       Vessels lying in a thick slab, vessel sleeves and bronchial walls do not.
    4. **Consolidation**: 3D components (26-connected) that are **organ tissue** taken in by the lung mask (at least
       ``organ_face_fraction`` of their inferior face rests on dense tissue outside the mask, and they are not
       surrounded by aerated lung or they border pure gas) or **straight tubes** (principal standard deviations
       sd₃ ≥ ``tube_elongation``·sd₂ with sd₂ ≤ ``tube_max_sd_mm``: large vessels; not when the component encloses
       air in a slice, a bronchus inside consolidation) are dropped; so is a component whose inferior face rests on
       tissue outside the mask for ≥ 90 % of it. **Hilar** components are dropped too (bronchi and central
       vessels resting on the mediastinum): they touch the mediastinal border of the lung, lie ≥ 70 % within
       ``hilar_depth_mm`` of it, have their centroid in the central ``hilar_band`` of the lung's craniocaudal and
       anteroposterior extents and are at most ``hilar_max_ml`` (0 switches the rule off). Consolidation is kept
       within reach (``reach_mm`` in-plane,
       ``reach_z_mm`` across slices, geodesic) of a core that holds a cylinder of ``thick_radius_mm`` (enclosed air
       counted in) or of a GGO core.
    5. **GGO** is kept within the same reach of a GGO core or of kept consolidation; dense voxels in gaps of the GGO
       narrower than the vessel disk join it (vessels crossing ground glass).
    6. **Compact lesions** (nodules, small consolidations): 3D components of HU ≥ ``compact_hu`` not yet kept,
       at most ``compact_max_mm`` in every direction, not elongated (sd₃ ≤ ``compact_elongation``·sd₁), at least
       ``compact_min_ml`` (and 2 voxels), and isolated: the mean HU of their 26-neighbour shell inside the lung is at
       most ``compact_shell_hu`` and at least 80 % of the shell is lung (40 % for blobs of ``min_lesion_ml`` or more:
       small subpleural consolidation). They are kept (consolidation where HU ≥ ``consolidation_range[0]``, else
       GGO); a vessel fragment or a chest-wall rim is not isolated.
    7. **Size filter**: 3D components of GGO ∪ consolidation smaller than ``min_lesion_ml`` are dropped, except
       compact lesions.
    8. **Back to the study grid** (when the working grid is coarser): the mask is repeated f×f; along the lesion
       edge (its outer working pixel and one study pixel outside it) each study voxel is lesion if its own HU
       (binomial 3×3 in-plane smoothing) is ≥ ``ggo_range[0]``, consolidation if ≥ ``consolidation_range[0]``.

    ``halo_px`` counts working-grid pixels. Counters in ``params`` ending in ``_voxels`` before ``ggo_voxels`` are
    working-grid counts × f² (study-grid equivalents).

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
    sp0 = _check_spacing(spacing)
    g_lo, g_hi = (float(v) for v in ggo_range)
    c_lo, c_hi = (float(v) for v in consolidation_range)
    if not (g_lo < g_hi <= c_lo < c_hi):
        raise ValueError("expected ggo_range[0] < ggo_range[1] <= consolidation_range[0] < consolidation_range[1]")

    # the same rule as the lung mask's working grid: 0.75-0.79 mm pixels (FOV 384-400 mm, common) work on 2x2
    # blocks (~1.5 mm) instead of the full grid, which held 4x the voxels for the same result scale
    f = max(1, int(float(working_pixel_mm) / max(sp0[1], sp0[2]) + 0.1))
    sp = (sp0[0], sp0[1] * f, sp0[2] * f)  # working grid
    voxel_ml = float(np.prod(sp)) / 1000.0
    fp_vessel = inplane_disk(vessel_radius_mm, sp[1:])
    fp_pleura = inplane_disk(pleural_margin_mm, sp[1:])
    fp_core = inplane_disk(core_radius_mm, sp[1:])
    fp_thick = inplane_disk(thick_radius_mm, sp[1:])
    # gaps of ground glass a vessel and its halo leave (vessels crossing ground glass)
    fp_gap = inplane_disk(float(vessel_radius_mm) + max(int(halo_px), 0) * max(sp[1], sp[2]), sp[1:])
    k_core = max(1, int(round(float(core_half_height_mm) / sp[0])))
    n_xy = int(np.ceil(float(reach_mm) / min(sp[1:]) - 1e-9))
    n_z = int(np.ceil(float(reach_z_mm) / sp[0] - 1e-9))
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
        "working_pixel_mm": float(working_pixel_mm),
        "working_factor": f,
        "working_spacing_mm": [round(float(s), 4) for s in sp],
        "core_radius_mm": float(core_radius_mm),
        "core_half_height_mm": float(core_half_height_mm),
        "core_half_height_slices": k_core,
        "core_sigma_mm": float(core_sigma_mm),
        "thick_radius_mm": float(thick_radius_mm),
        "reach_mm": float(reach_mm),
        "reach_z_mm": float(reach_z_mm),
        "tube_elongation": float(tube_elongation),
        "tube_max_sd_mm": float(tube_max_sd_mm),
        "organ_face_fraction": float(organ_face_fraction),
        "compact_hu": float(compact_hu),
        "compact_max_mm": float(compact_max_mm),
        "compact_elongation": float(compact_elongation),
        "compact_min_ml": float(compact_min_ml),
        "compact_shell_hu": float(compact_shell_hu),
        "hilar_depth_mm": float(hilar_depth_mm),
        "hilar_max_ml": float(hilar_max_ml),
        "hilar_band": [float(v) for v in hilar_band],
        "connectivity": 26,
        "morphology": "2D per axial slice; cylinders (disk over several slices) for cores",
    }

    out = np.zeros(hu.shape, dtype=np.uint8)
    lung_full = lung_mask > 0
    zs = np.flatnonzero(lung_full.any(axis=(1, 2)))
    if zs.size == 0:
        params.update(note="lung mask is empty; nothing searched", lesion_components=0)
        return LesionFinding(mask=out, params=params)
    ys = np.flatnonzero(lung_full[zs[0] : zs[-1] + 1].any(axis=(0, 2)))
    xs = np.flatnonzero(lung_full[zs[0] : zs[-1] + 1].any(axis=(0, 1)))
    # crop: the lung's box, one slice more above and below (for the organ test), in-plane a multiple of f
    bz = slice(max(int(zs[0]) - 1, 0), min(int(zs[-1]) + 2, hu.shape[0]))
    by = slice(int(ys[0]), int(ys[-1]) + 1)
    bx = slice(int(xs[0]), int(xs[-1]) + 1)
    ny, nx = by.stop - by.start, bx.stop - bx.start
    ey, ex = (-ny) % f, (-nx) % f
    lung0 = np.pad(lung_full[bz, by, bx], ((0, 0), (0, ey), (0, ex)))
    # the study-grid crop stays in its integer type when it has one (half the memory of float32 on 500-slice
    # studies; block sums and the edge refinement convert exactly what they use)
    small_int = hu.dtype.kind == "i" and hu.dtype.itemsize <= 2 and f > 1
    raw0 = np.pad(hu[bz, by, bx] if small_int else hu[bz, by, bx].astype(np.float32), ((0, 0), (0, ey), (0, ex)),
                  constant_values=-1000)
    if float(raw0[lung0].min()) >= 0.0:
        raise ValueError("hu has no negative values inside the lung: this does not look like Hounsfield units")
    if f > 1:
        n_lung = _block_sum(lung0, f)
        lung_w = n_lung >= 0.5 * f * f
        raw_w = _block_sum(raw0, f) / np.float32(f * f)  # everything, for the tissue outside the lung
        # mean over the lung voxels of each block
        hl_w = _block_sum(np.where(lung0, raw0, raw0.dtype.type(0)), f)
        np.divide(hl_w, n_lung, out=hl_w, where=n_lung > 0)
        hl_w = np.where(n_lung > 0, hl_w, raw_w)
        del n_lung
    else:
        lung_w, raw_w, hl_w = lung0, raw0, raw0
    fps = (fp_vessel, fp_pleura, fp_core, fp_thick, fp_gap)
    pad_y = max(max(fp.shape[0] for fp in fps), 7) // 2 + 1
    pad_x = max(max(fp.shape[1] for fp in fps), 7) // 2 + 1
    padw = ((0, 0), (pad_y, pad_y), (pad_x, pad_x))
    lung = np.pad(lung_w, padw)
    raw = np.pad(raw_w, padw, constant_values=-1000.0)
    hl = np.pad(hl_w, padw, constant_values=-1000.0)
    del raw_w, hl_w

    # 1. denoise
    h = _smooth_in_lung(hl, lung, smoothing_sigma_mm, sp)

    # 2. candidates
    dense = lung & (h >= g_lo)
    opened = _open_inplane(dense, fp_vessel)
    cons_cand = opened & (h >= c_lo) & (h <= c_hi)
    cons = _open_inplane(cons_cand, fp_vessel)
    vessel = (dense & ~opened) | (cons_cand & ~cons) | (opened & (h > c_hi))
    if halo_px > 0 and vessel.any():
        kk = 2 * int(halo_px) + 1
        halo = map_axis(lambda a: ndi.maximum_filter(a, size=(1, kk, kk)), vessel.view(np.uint8)).view(bool)
    else:
        halo = vessel
    del cons_cand
    lung_ggo = np.zeros_like(lung)
    reg = _bbox_region(opened, (0, fp_pleura.shape[0] // 2 + 1, fp_pleura.shape[1] // 2 + 1))
    if reg is not None:
        lung_ggo[reg] = (map_axis(lambda m: ndi.binary_erosion(m, structure=fp_pleura[None]), lung[reg])
                         if fp_pleura.size > 1 else lung[reg])
    ggo = opened & (h >= g_lo) & (h < g_hi) & lung_ggo & ~halo
    n_edge = 0
    if cons.any() and ggo.any():
        reg = _bbox_region(cons, (1, 1, 1))
        near = np.zeros_like(cons)
        near[reg] = ndi.maximum_filter(cons[reg].view(np.uint8), size=3).view(bool)
        edge = near & ggo & (h >= float(consolidation_edge_hu))
        cons |= edge
        ggo &= ~edge
        n_edge = int(edge.sum())
        del near, edge

    # 3. GGO cores on a smoother image
    h2 = _smooth_in_lung(hl, lung, max(float(core_sigma_mm), float(smoothing_sigma_mm)), sp)
    ggo2 = lung_ggo & (h2 >= g_lo) & (h2 < g_hi)
    del h2
    ggo_core = _open_cyl(ggo2, fp_core, k_core) & ggo
    del ggo2

    # 4. consolidation: drop organ tissue and straight tubes, keep what is within reach of a broad core
    dropped = {"organ": 0, "tube": 0, "hilar": 0}
    rejected = np.zeros_like(cons)
    # consolidation with its enclosed air (air bronchograms): holes of the consolidation in each slice
    filled = cons.copy()
    cons_zs = np.flatnonzero(cons.any(axis=(1, 2)))

    def fill(r: range) -> None:  # fill_holes_2d: binary_fill_holes' pixels by one labelling; slices on threads
        for z in cons_zs[r.start:r.stop]:
            filled[z] = fill_holes_2d(cons[z])

    run_chunks(fill, len(cons_zs))
    if cons.any():
        labels, n = label_components(cons, 26)
        _, _, sd = _component_shape(labels, n, sp)
        # hollow: the component encloses air in some slice (a bronchus inside consolidation); vessels are solid
        # holes touch their component in-plane; they lie in the consolidation's box, so the filter runs on it
        reg = _bbox_region(cons, (0, 1, 1))
        lab_f = ndi.maximum_filter(labels[reg], size=(1, 3, 3))
        holes = filled[reg] & ~cons[reg]
        sizes = np.bincount(labels[cons], minlength=n + 1)
        hollow = np.bincount(lab_f[holes], minlength=n + 1) >= np.maximum(0.02 * sizes, 1)
        del lab_f, holes
        below_out = np.zeros_like(cons)
        below_out[:-1] = ~lung[1:] & (raw[1:] > -500.0)
        face = cons.copy()
        face[:-1] &= ~cons[1:]
        inf_out = np.bincount(labels[face & below_out], minlength=n + 1) / np.maximum(
            np.bincount(labels[face], minlength=n + 1), 1)
        del face, below_out
        reg = _bbox_region(cons, (0, 2, 2))
        lab_d = np.zeros_like(labels)
        lab_d[reg] = ndi.maximum_filter(labels[reg], size=(1, 5, 5))
        ring = (lab_d > 0) & ~cons & ~opened
        ring_n = np.maximum(np.bincount(lab_d[ring], minlength=n + 1), 1)
        aer = np.bincount(lab_d[ring & lung & (h < g_lo) & (h >= -975.0)], minlength=n + 1) / ring_n
        gas = np.bincount(lab_d[ring & lung & (h < -975.0)], minlength=n + 1) / ring_n
        del lab_d, ring
        organ = ((inf_out >= float(organ_face_fraction)) & ((aer < 0.15) | (gas >= 0.03))) | (inf_out >= 0.9)
        tube = (sd[:, 2] >= float(tube_elongation) * sd[:, 1]) & (sd[:, 1] <= float(tube_max_sd_mm)) & ~hollow
        # hilar: the main and lobar bronchi (wall and enclosed lumen) and the pulmonary arteries and veins beside
        # them enter the lung at the hilum as dense cross-sections several mm wide. They are neither thin nor a
        # straight tube (and "hollow" like a bronchus inside consolidation), so the rules above keep them, and they
        # form a compact dense blob resting on the mediastinum. A consolidation component is dropped as hilar when
        # it touches the mediastinal border of the lung (``_mediastinum``), at least 70 % of it lies within
        # ``hilar_depth_mm`` of that border, its centroid lies in the central ``hilar_band`` of both the lung's
        # craniocaudal extent (the hila span roughly the carina to the inferior pulmonary veins) and its
        # anteroposterior extent (this leaves out the paravertebral gutters, where dependent consolidation rests
        # on the spine, and the anterior junction), and it is at most ``hilar_max_ml`` (hilar structures are a few
        # mL; a lobar or perihilar consolidation is larger or reaches deeper into the lung). The depth is 40 mm
        # because the lobar bronchi and interlobar arteries run 3-4 cm out from the mediastinum (30 mm, the first
        # setting, left such a blob of a healthy phantom as consolidation; the 3 real studies' masks are the same to
        # the voxel with either). The rule uses only
        # geometry that exists on any chest CT, no airway segmentation. Ground glass next to a dropped blob is
        # then kept only by its own cores, as everywhere else.
        hilar = np.zeros(n + 1, dtype=bool)
        if float(hilar_depth_mm) > 0 and float(hilar_max_ml) > 0:
            med = _mediastinum(lung)
            zl = np.flatnonzero(lung.any(axis=(1, 2)))
            if med.any() and zl.size:
                # (only `near_med & cons` is read: slices without consolidation may hold the dilation too)
                near_med = map_axis(lambda a: ndi.maximum_filter(a, size=(1, 3, 3), mode="constant", cval=0),
                                    med.view(np.uint8)).view(bool)
                depth = _depth_from(med, cons.any(axis=(1, 2)) & med.any(axis=(1, 2)), sp[1:],
                                    float(hilar_depth_mm))
                no_med = ~med.any(axis=(1, 2))
                depth[no_med] = np.inf
                touch = np.bincount(labels[near_med & cons], minlength=n + 1) > 0
                shallow = np.bincount(labels[cons & (depth <= float(hilar_depth_mm))], minlength=n + 1)
                idx = np.flatnonzero(labels)
                zc = np.bincount(labels.ravel()[idx], idx // (labels.shape[1] * labels.shape[2]),
                                 minlength=n + 1) / np.maximum(sizes, 1)
                yl = np.flatnonzero(lung.any(axis=(0, 2)))
                yc = np.bincount(labels.ravel()[idx], (idx // labels.shape[2]) % labels.shape[1],
                                 minlength=n + 1) / np.maximum(sizes, 1)
                del idx
                frac_z = (zc - zl[0] + 0.5) / (zl[-1] - zl[0] + 1)
                frac_y = (yc - yl[0] + 0.5) / (yl[-1] - yl[0] + 1)
                lo, hi = float(hilar_band[0]), float(hilar_band[1])
                hilar = (touch & (shallow >= 0.7 * sizes) & (sizes * voxel_ml <= float(hilar_max_ml))
                         & (frac_z >= lo) & (frac_z <= hi) & (frac_y >= lo) & (frac_y <= hi))
                del near_med, depth
            del med
        hilar[0] = False
        hilar &= ~organ & ~tube
        bad = organ | tube | hilar
        bad[0] = False
        dropped = {"organ": int(organ[1:].sum()), "tube": int((tube & ~organ)[1:].sum()),
                   "hilar": int(hilar[1:].sum())}
        rejected = bad[labels]
        cons &= ~rejected
        del labels
    seeds = _open_cyl(filled & ~rejected, fp_thick, k_core) & cons
    del filled
    if ggo_core.any():
        seeds |= cons & _dilate_cyl(ggo_core, _SQUARE3, 1)
    cons = _reach(seeds, cons, n_xy, n_z)

    # 5. GGO within reach of a GGO core or of kept consolidation; vessels crossing ground glass join it
    n_ggo_before = int(ggo.sum())
    seeds = ggo_core | (ggo & _dilate_cyl(cons, _SQUARE3, 1))
    ggo = _reach(seeds, ggo, n_xy, n_z)
    del seeds, ggo_core
    n_sleeve = n_ggo_before - int(ggo.sum())
    n_fill = 0
    if ggo.any():
        fill = _close_inplane(ggo, fp_gap) & ~ggo & dense & ~cons & lung_ggo
        ggo |= fill
        n_fill = int(fill.sum())

    # 6. compact lesions: nodules and small consolidations
    compact = np.zeros_like(cons)
    n_compact = 0
    cand = lung & (hl >= float(compact_hu)) & ~ggo & ~cons & ~rejected
    if cand.any():
        labels, n = label_components(cand, 26)
        cnt, ext, sd = _component_shape(labels, n, sp)
        ok = (ext.max(axis=1) <= float(compact_max_mm)) & (cnt * voxel_ml >= float(compact_min_ml))
        ok &= cnt >= 2  # a single voxel is noise
        ok &= sd[:, 2] <= float(compact_elongation) * np.maximum(sd[:, 0], 0.5 * min(sp))
        ok[0] = False
        if ok.any():
            # isolated: the 26-neighbour shell is aerated lung on average and does not touch the lung's edge (a
            # nodule sits in aerated lung; a fragment of a vessel or of the chest wall does not)
            labels = np.where(ok[labels], labels, 0)
            reg = _bbox_region(labels > 0, (1, 1, 1))
            lab_d = np.zeros_like(labels)
            lab_d[reg] = ndi.maximum_filter(labels[reg], size=3)
            shell = (lab_d > 0) & (labels == 0)
            n_sh = np.maximum(np.bincount(lab_d[shell], minlength=n + 1), 1)
            shell &= lung
            n_in = np.bincount(lab_d[shell], minlength=n + 1)
            shell_hu = np.bincount(lab_d[shell], hl[shell], minlength=n + 1) / np.maximum(n_in, 1)
            ok &= shell_hu <= float(compact_shell_hu)
            # against the pleura (a small subpleural consolidation) it must be larger
            ok &= (n_in >= 0.8 * n_sh) | ((n_in >= 0.4 * n_sh) & (cnt * voxel_ml >= float(min_lesion_ml)))
            del lab_d, shell
        n_compact = int(ok[1:].sum())
        compact = ok[labels]
        solid = compact & (hl >= c_lo)
        cons |= solid
        ggo |= compact & ~solid
        del labels, solid

    # 7. size filter (26-connectivity) on GGO ∪ consolidation; compact lesions are exempt
    labels, n = label_components(ggo | cons, 26)
    n_kept = 0
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes * voxel_ml >= float(min_lesion_ml)
        keep |= np.bincount(labels[compact], minlength=n + 1) > 0
        keep[0] = False
        n_kept = int(keep[1:].sum())
        kept = keep[labels]
        ggo &= kept
        cons &= kept
    crop = np.zeros(lung.shape, dtype=np.uint8)
    crop[ggo] = LESION_GGO
    crop[cons] = LESION_CONSOLIDATION
    crop = crop[:, pad_y : crop.shape[1] - pad_y, pad_x : crop.shape[2] - pad_x]
    if f > 1 and crop.any():
        # back to the study grid. Along the lesion edge the study-grid voxel decides by its own density (binomial
        # 3×3 in-plane smoothing): the outer working pixel of the lesion is kept where dense, and one study-grid
        # pixel outside it is added where dense, so edges are not blocky
        inner = ndi.binary_erosion(crop > 0, structure=_SQUARE3[None], border_value=0)
        up = lambda a: np.repeat(np.repeat(a, f, axis=1), f, axis=2)[:, :ny, :nx]  # noqa: E731
        edge = up((crop > 0) & ~inner)
        crop = up(crop)
        reg = _bbox_region(crop > 0, (0, 2, 2))  # the refinement only runs on the lesions' box
        sub = crop[reg]
        lab_d = ndi.maximum_filter(sub, size=(1, 3, 3))
        edge = edge[reg] | ((lab_d > 0) & (sub == 0))
        raw_reg = raw0[:, :ny, :nx][reg]  # a view
        binomial = np.array([0.25, 0.5, 0.25], np.float32)

        def refine(zs: range) -> None:  # slice by slice (in-plane smoothing): small buffers, several threads
            for z in zs:
                e = edge[z]
                if not e.any():
                    continue
                hz = raw_reg[z].astype(np.float32)
                for ax in (0, 1):
                    hz = ndi.correlate1d(hz, binomial, axis=ax, mode="nearest")
                sz = np.where(e, np.where(hz >= g_lo, np.maximum(sub[z], lab_d[z]), 0), sub[z]).astype(np.uint8)
                sel = e & (sz > 0)
                sz[sel] = np.where(hz[sel] >= c_lo, LESION_CONSOLIDATION, LESION_GGO)
                sub[z] = sz

        run_chunks(refine, sub.shape[0])
        crop[reg] = sub
        del inner, edge, lab_d, sub
    elif f > 1:
        crop = np.zeros((crop.shape[0], ny, nx), np.uint8)
    else:
        crop = crop[:, :ny, :nx]
    crop[~lung_full[bz, by, bx]] = 0  # never outside the study's lung mask
    out[bz, by, bx] = crop
    n_ggo_vox, n_cons_vox = (int(np.count_nonzero(crop == v)) for v in (LESION_GGO, LESION_CONSOLIDATION))

    params.update(
        thin_structure_voxels=int(vessel.sum()) * f * f,
        consolidation_edge_voxels_relabelled=n_edge * f * f,
        thin_ggo_voxels_dropped=n_sleeve * f * f,
        ggo_gap_voxels_filled=n_fill * f * f,
        consolidation_components_dropped=dropped,
        compact_components=n_compact,
        lesion_components=n_kept,
        lesion_components_dropped_small=int(n - n_kept),
        ggo_voxels=n_ggo_vox,  # counted on the lung's box: `out` is 0 outside it
        consolidation_voxels=n_cons_vox,
    )
    return LesionFinding(mask=out, probability_map=None, method=METHOD, params=params)
