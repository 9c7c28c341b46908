"""Lesion quantification: volumes, counts, sizes, CT values, spatial distribution, severity grades.

Every measure is defined in ``docs/quantification.md``. The lesion measures follow DeepSC-COVID
(``shared/seeds/deepsc-covid.txt``, Sec. III-B): lesion count (Finding 1), lesion volume ratio and 3D bounding-box
size (Finding 2), CT values (Finding 3), spread of lesion centres and the peripheral lesion ratio, Eq. (1)
(Finding 4). Severity: the MosMedData CT-0…CT-4 grades (Morozov et al., 2020, arXiv:2005.06465) and a zone-based
variant of the 0–5 per-lobe CT severity score (Pan et al., Radiology 2020;295:715–721).

Conventions (see :mod:`pneumoct.types`):

* arrays are (z, y, x), canonical orientation: slice 0 superior, row 0 anterior, column 0 patient right;
* lung labels ``LUNG_RIGHT`` = 1, ``LUNG_LEFT`` = 2; lesion labels ``LESION_GGO`` = 1,
  ``LESION_CONSOLIDATION`` = 2 (any other positive value is lesion of unspecified type; a boolean lesion mask
  means "lesion, type unknown");
* lesions are 3D connected components with **26-connectivity** (face, edge and corner neighbours);
* zones are thirds of each lung's craniocaudal extent — **not lobes**;
* positions in mm are canonical offsets ``index × spacing`` from the centre of voxel [0, 0, 0] (z toward the feet,
  y toward the back, x toward the patient's left), not patient (LPS) coordinates.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT

__all__ = [
    "quantify",
    "label_lesions",
    "per_slice_lesion_area_mm2",
    "lesion_probability_from_area",
    "mosmed_grade",
    "ctss_band",
    "zone_slices",
    "peripheral_band_slice",
    "ZONE_NAMES",
    "MOSMED_GRADES",
]

#: Zone names, in output order (thirds of each lung's craniocaudal extent; *not* lobes).
ZONE_NAMES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower")
#: MosMedData grades by level, with the share of lung involved that defines them.
MOSMED_GRADES = {
    0: ("CT-0", "no lesion in the lung (0%)"),
    1: ("CT-1", "mild: < 25% of the lung involved"),
    2: ("CT-2", "moderate: 25-50% of the lung involved"),
    3: ("CT-3", "severe: 50-75% of the lung involved"),
    4: ("CT-4", "critical: >= 75% of the lung involved"),
}
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


# ----------------------------------------------------------------------------------------------- small helpers
def _r(x: float | None, nd: int) -> float | None:
    """Round to ``nd`` decimals as a plain float (None stays None; -0.0 becomes 0.0)."""
    if x is None:
        return None
    v = round(float(x), nd)
    return 0.0 if v == 0 else v


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite numbers (z, y, x) in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def mosmed_grade(percent_involved: float) -> int:
    """MosMedData severity level 0…4 from the percent of the lung involved.

    CT-0: 0%; CT-1: (0, 25); CT-2: [25, 50); CT-3: [50, 75); CT-4: >= 75 (Morozov et al., 2020).
    """
    p = float(percent_involved)
    if not p > 0:
        return 0
    if p < 25:
        return 1
    if p < 50:
        return 2
    if p < 75:
        return 3
    return 4


def ctss_band(percent_involved: float | None) -> int:
    """CT severity score band 0…5 for one region from its percent involved (Pan et al., 2020, per lobe).

    0: none; 1: < 5%; 2: 5–25%; 3: 26–49%; 4: 50–75%; 5: > 75%. The published bands leave gaps between
    integers; here they are closed as 2: [5, 25], 3: (25, 50), 4: [50, 75], 5: > 75.
    """
    if percent_involved is None:
        return 0
    p = float(percent_involved)
    if not p > 0:
        return 0
    if p < 5:
        return 1
    if p <= 25:
        return 2
    if p < 50:
        return 3
    if p <= 75:
        return 4
    return 5


def zone_slices(lung_present_per_slice: np.ndarray) -> list[tuple[int, int]] | None:
    """Split one lung's craniocaudal extent into thirds: ``[(start, stop)]`` × 3 (upper, middle, lower), in slices.

    The extent runs from the first to the last slice containing that lung (n slices); slice k belongs to third
    ``floor(3 · (k − first + 0.5) / n)``, i.e. by where its centre falls. Returns None when the lung is absent.
    """
    zs = np.flatnonzero(np.asarray(lung_present_per_slice))
    if zs.size == 0:
        return None
    z0, n = int(zs[0]), int(zs[-1] - zs[0] + 1)
    third = np.minimum((3 * (np.arange(n) + 0.5) / n).astype(int), 2)
    out = []
    for t in range(3):
        ks = np.flatnonzero(third == t)
        out.append((z0 + int(ks[0]), z0 + int(ks[-1]) + 1) if ks.size else (z0, z0))
    return out


def peripheral_band_slice(lung_slice: np.ndarray, thickness_mm: float, spacing_yx: Sequence[float]) -> np.ndarray:
    """DeepSC-COVID Eq. (1) peripheral lung for one slice: ``U_s − E(U_s, σ)``.

    ``E`` is a binary erosion with a disk of radius σ = ``thickness_mm`` (in mm, converted to pixels through the
    in-plane spacing, so anisotropic pixels give an elliptical kernel in pixels). A lung pixel is eroded away when a
    non-lung pixel centre lies within σ of its centre; everything outside the array counts as non-lung. Computed
    with a 2D Euclidean distance transform, which is exact for a disk kernel.
    """
    u = np.asarray(lung_slice) > 0
    if thickness_mm <= 0 or not u.any():
        return np.zeros_like(u)
    padded = np.pad(u, 1)  # outside the field of view is not lung
    edt = ndi.distance_transform_edt(padded, sampling=(float(spacing_yx[0]), float(spacing_yx[1])))[1:-1, 1:-1]
    return u & (edt <= thickness_mm + 1e-6)


def _bbox_of(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    sub = mask[zs[0] : zs[-1] + 1]
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub.any(axis=(0, 1)))
    return (slice(int(zs[0]), int(zs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))


def _validate(lesion_mask: np.ndarray, lung_mask: np.ndarray, hu: np.ndarray | None) -> None:
    if lesion_mask.ndim != 3 or lesion_mask.shape != lung_mask.shape:
        raise ValueError(
            f"lesion_mask and lung_mask must be 3D arrays of the same shape, got {lesion_mask.shape} and {lung_mask.shape}"
        )
    if hu is not None and hu.shape != lung_mask.shape:
        raise ValueError(f"hu must have the masks' shape {lung_mask.shape}, got {hu.shape}")
    if lung_mask.dtype != bool:
        lo, hi = int(lung_mask.min()), int(lung_mask.max())
        if lo < 0 or hi > max(LUNG_RIGHT, LUNG_LEFT):
            raise ValueError(
                f"lung_mask labels must be 0 (background), {LUNG_RIGHT} (right lung), {LUNG_LEFT} (left lung); "
                f"found values in [{lo}, {hi}]"
            )
    if lesion_mask.dtype != bool and int(lesion_mask.min()) < 0:
        raise ValueError("lesion_mask must not contain negative labels")


def label_lesions(
    lesion_mask: np.ndarray, spacing: Sequence[float] | None = None, *, min_lesion_ml: float = 0.0
) -> tuple[np.ndarray, int]:
    """Label lesions as :func:`quantify` counts them: 3D components, 26-connectivity, ids by decreasing volume.

    Returns ``(labels int32 (Z, Y, X), n)``; id k here is ``lesions[k-1]`` in :func:`quantify`'s output (when
    no more than ``max_lesions_listed`` lesions). Components below ``min_lesion_ml`` (needs ``spacing``) get 0.
    """
    les = np.asarray(lesion_mask) > 0
    labels, n = ndi.label(les, structure=_CONNECTIVITY_26)
    if n == 0:
        return labels.astype(np.int32, copy=False), 0
    sizes = np.bincount(labels[les], minlength=n + 1)
    order = _lesion_order(sizes, n)
    keep = np.ones(n + 1, dtype=bool)
    if min_lesion_ml > 0:
        if spacing is None:
            raise ValueError("min_lesion_ml needs spacing")
        keep = sizes * (float(np.prod(_check_spacing(spacing))) / 1000.0) >= min_lesion_ml
    lut = np.zeros(n + 1, dtype=np.int32)
    new_id = 0
    for old in order:
        if keep[old]:
            new_id += 1
            lut[old] = new_id
    return lut[labels], new_id


def _lesion_order(sizes: np.ndarray, n: int) -> np.ndarray:
    """Component labels 1..n sorted by decreasing size, ties by raster order of their first voxel (label id)."""
    labs = np.arange(1, n + 1)
    return labs[np.lexsort((labs, -sizes[1:]))]


# --------------------------------------------------------------------------------------------- per-slice measures
def per_slice_lesion_area_mm2(lesion_mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Lesion area per axial slice in mm² (any value > 0 counts), shape (Z,).

    Works for any mask: ``per_slice_lesion_area_mm2(lung_mask, spacing)`` gives the lung area per slice.
    """
    m = np.asarray(lesion_mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3D (Z, Y, X), got shape {m.shape}")
    sp = _check_spacing(spacing)
    counts = np.count_nonzero(m.reshape(m.shape[0], -1), axis=1)
    return counts.astype(np.float64) * (sp[1] * sp[2])


def lesion_probability_from_area(
    area_mm2: np.ndarray,
    lung_area_mm2: np.ndarray,
    *,
    a0_mm2: float = 100.0,
    a0_min_mm2: float = 25.0,
    relative_scale: float = 0.02,
) -> np.ndarray:
    """Per-slice lesion probability for the threshold baseline from lesion area: ``p = 1 − exp(−area / a)``.

    The scale ``a = clip(relative_scale × lung_area, a0_min_mm2, a0_mm2)``: on full-size slices
    (lung area ≥ 5000 mm² with the defaults) a = 100 mm², so a lesion of ~1 cm² gives p ≈ 0.63 and 3 cm² gives
    p ≈ 0.95; on slices with little lung (apex, base) the scale shrinks toward 25 mm², so a lesion that is large
    *relative to the lung in that slice* still scores. p is 0 where the area is 0, increases monotonically with the
    area, and lies in [0, 1). This is a heuristic score, not a calibrated probability.
    """
    area = np.asarray(area_mm2, dtype=np.float64)
    lung = np.broadcast_to(np.asarray(lung_area_mm2, dtype=np.float64), area.shape)
    if not (np.all(np.isfinite(area)) and np.all(np.isfinite(lung))):
        raise ValueError("areas must be finite")
    if np.any(area < 0) or np.any(lung < 0):
        raise ValueError("areas must be non-negative")
    if not 0 < a0_min_mm2 <= a0_mm2:
        raise ValueError("need 0 < a0_min_mm2 <= a0_mm2")
    scale = np.clip(relative_scale * lung, a0_min_mm2, a0_mm2)
    return 1.0 - np.exp(-area / scale)


# ------------------------------------------------------------------------------------------------------ quantify
def quantify(
    lesion_mask: np.ndarray,
    lung_mask: np.ndarray,
    spacing: Sequence[float],
    hu: np.ndarray | None = None,
    *,
    peripheral_thickness_mm: float = 10.0,
    min_lesion_ml: float = 0.0,
    bilateral_min_ml: float = 0.1,
    lesion_bilateral_fraction: float = 0.2,
    max_lesions_listed: int = 200,
) -> dict[str, Any]:
    """Quantify lesions inside the lungs. Returns a JSON-serialisable dict (see ``docs/quantification.md``).

    Args:
        lesion_mask: (Z, Y, X) lesion labels: 1 GGO, 2 consolidation, other > 0 unspecified lesion; bool = lesion
            of unknown type.
        lung_mask: (Z, Y, X) lung labels: 1 right, 2 left (0 background).
        spacing: (z, y, x) voxel spacing, mm.
        hu: optional (Z, Y, X) Hounsfield units, for the CT-value measures.
        peripheral_thickness_mm: σ of DeepSC-COVID Eq. (1), the in-plane erosion radius in mm.
        min_lesion_ml: components smaller than this are left out of the lesion count, the lesion list and the
            spread of centres (all volumes still include them). 0 = count every component.
        bilateral_min_ml: lesion volume needed inside *each* lung for ``bilateral_involvement``.
        lesion_bilateral_fraction: a single lesion is "bilateral" when each lung holds at least this fraction of
            its in-lung voxels, otherwise it takes the side holding the majority.
        max_lesions_listed: the per-lesion list keeps the largest this many (the count is not truncated).

    Raises:
        ValueError: the lung mask is empty, shapes differ, labels or spacing are invalid.
    """
    lesion_mask = np.asarray(lesion_mask)
    lung_mask = np.asarray(lung_mask)
    hu = None if hu is None else np.asarray(hu)
    _validate(lesion_mask, lung_mask, hu)
    sp = _check_spacing(spacing)
    sigma = float(peripheral_thickness_mm)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError("peripheral_thickness_mm must be a non-negative number")
    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    typed = lesion_mask.dtype != bool
    notes: list[str] = []

    lung_full = lung_mask > 0
    les_full = lesion_mask > 0
    box = _bbox_of(lung_full)
    if box is None:
        raise ValueError(
            "lung mask is empty: no lung voxels (labels 1 = right, 2 = left), so lesion volume ratio, involvement "
            "and severity are undefined; check the lung segmentation"
        )
    les_box = _bbox_of(les_full)
    if les_box is not None:  # crop to the union of lung and lesion boxes
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, les_box))  # type: ignore
    off = np.array([s.start for s in box], dtype=np.float64)
    lm = lung_mask[box]
    lz = lesion_mask[box]
    les = les_full[box]
    del lung_full, les_full
    if lm.dtype == bool:
        lm = lm.astype(np.uint8)  # a boolean lung mask is all "right"

    right = lm == LUNG_RIGHT
    left = lm == LUNG_LEFT
    lung = right | left
    n_right, n_left = int(np.count_nonzero(right)), int(np.count_nonzero(left))
    n_lung = n_right + n_left
    if n_left == 0 or n_right == 0:
        missing = "left (label 2)" if n_left == 0 else "right (label 1)"
        notes.append(f"lung mask has no {missing} lung: side, bilateral and zone measures cover one lung only")

    # ---- lesion voxels (coordinates in the crop, C order: sorted by z)
    idx = np.nonzero(les)
    n_les = int(idx[0].size)
    lung_val = lm[idx]
    in_right = lung_val == LUNG_RIGHT
    in_left = lung_val == LUNG_LEFT
    in_lung = in_right | in_left
    n_les_right, n_les_left = int(in_right.sum()), int(in_left.sum())
    n_les_in_lung = n_les_right + n_les_left
    cls = lz[idx] if typed else None
    n_ggo = int(np.count_nonzero(cls == LESION_GGO)) if typed else None
    n_cons = int(np.count_nonzero(cls == LESION_CONSOLIDATION)) if typed else None
    if n_les and n_les_in_lung < n_les:
        frac_out = 1 - n_les_in_lung / n_les
        notes.append(
            f"{100 * frac_out:.1f}% of the lesion volume lies outside the lung mask; it counts in the lesion volume, "
            "lesion volume ratio and PLR denominator, not in involvement, zones or severity"
        )

    # ---- zones (thirds of each lung's craniocaudal extent; not lobes)
    Zc = lm.shape[0]
    zone_of_z = np.full((3, Zc), -1, dtype=np.int64)  # [lung label, z] -> zone index 0..5 (row 0 unused)
    zone_ranges: dict[str, tuple[int, int] | None] = {}
    right_per_z = right.sum(axis=(1, 2))
    left_per_z = left.sum(axis=(1, 2))
    for lab, per_z, base, side in ((LUNG_RIGHT, right_per_z, 0, "right"), (LUNG_LEFT, left_per_z, 3, "left")):
        thirds = zone_slices(per_z > 0)
        for t, name in enumerate(("upper", "middle", "lower")):
            zname = f"{side}_{name}"
            if thirds is None:
                zone_ranges[zname] = None
                continue
            a, b = thirds[t]
            zone_of_z[lab, a:b] = base + t
            zone_ranges[zname] = (a, b)
    zone_lung = np.zeros(6, dtype=np.int64)
    for lab, per_z in ((LUNG_RIGHT, right_per_z), (LUNG_LEFT, left_per_z)):
        zi = zone_of_z[lab]
        ok = zi >= 0
        np.add.at(zone_lung, zi[ok], per_z[ok])
    vox_zone = np.full(n_les, -1, dtype=np.int64)
    vox_zone[in_right] = zone_of_z[LUNG_RIGHT, idx[0][in_right]]
    vox_zone[in_left] = zone_of_z[LUNG_LEFT, idx[0][in_left]]
    zone_les = np.bincount(vox_zone[vox_zone >= 0], minlength=6)

    zones: dict[str, Any] = {}
    ctss_per_zone: dict[str, int] = {}
    for k, name in enumerate(ZONE_NAMES):
        pct = 100.0 * zone_les[k] / zone_lung[k] if zone_lung[k] else None
        band = ctss_band(pct)
        rng = zone_ranges[name]
        zones[name] = {
            "slices": None if rng is None else [int(rng[0] + off[0]), int(rng[1] + off[0])],
            "lung_ml": _r(zone_lung[k] * voxel_ml, 3),
            "lesion_ml": _r(zone_les[k] * voxel_ml, 3),
            "percent_involved": _r(pct, 3),
            "ctss": band,
        }
        ctss_per_zone[name] = band

    # ---- peripheral band, DeepSC-COVID Eq. (1), per slice, only where there is lesion
    periph = np.zeros(n_les, dtype=bool)
    if n_les and sigma > 0:
        my = int(math.ceil(sigma / sp[1])) + 1
        mx = int(math.ceil(sigma / sp[2])) + 1
        Y, X = lm.shape[1:]
        zs_les, starts = np.unique(idx[0], return_index=True)
        ends = np.append(starts[1:], n_les)
        for z, a, b in zip(zs_les, starts, ends):
            yv, xv = idx[1][a:b], idx[2][a:b]
            y0, y1 = max(int(yv.min()) - my, 0), min(int(yv.max()) + my + 1, Y)
            x0, x1 = max(int(xv.min()) - mx, 0), min(int(xv.max()) + mx + 1, X)
            win = lung[z, y0:y1, x0:x1]
            if not win.any():
                continue
            # the window reaches σ beyond the lesion pixels, so any non-lung pixel within σ of them is inside it;
            # padding marks the crop border (= outside the lung's box, non-lung) where the window touches it.
            pads = ((1 if y0 == 0 else 0, 1 if y1 == Y else 0), (1 if x0 == 0 else 0, 1 if x1 == X else 0))
            wp = np.pad(win, pads)
            if wp.all():
                continue
            edt = ndi.distance_transform_edt(wp, sampling=(sp[1], sp[2]))
            band = wp & (edt <= sigma + 1e-6)
            periph[a:b] = band[yv - y0 + pads[0][0], xv - x0 + pads[1][0]]
    n_periph = int(periph.sum())
    plr = n_periph / n_les if n_les else None

    hu_vals = hu[box][idx].astype(np.float64) if (hu is not None and n_les) else None

    # ---- lesions: 3D components, 26-connectivity
    lesions: list[dict[str, Any]] = []
    spread = None
    n_components = n_counted = 0
    if n_les:
        labels, n_components = ndi.label(les, structure=_CONNECTIVITY_26)
        lab = labels[idx]
        sizes = np.bincount(lab, minlength=n_components + 1)
        objs = ndi.find_objects(labels)
        del labels
        cnt = lambda w: np.bincount(lab, weights=w, minlength=n_components + 1)  # noqa: E731
        n_r, n_l = cnt(in_right), cnt(in_left)
        ggo_c = cnt(cls == LESION_GGO) if typed else None
        cons_c = cnt(cls == LESION_CONSOLIDATION) if typed else None
        per_c = cnt(periph)
        cz, cy, cx = (cnt(i.astype(np.float64)) / np.maximum(sizes, 1) for i in idx)
        hu_sum = cnt(hu_vals) if hu_vals is not None else None
        okz = vox_zone >= 0
        zl = np.bincount(lab[okz] * 6 + vox_zone[okz], minlength=(n_components + 1) * 6).reshape(-1, 6)

        order = _lesion_order(sizes, n_components)
        counted = [c for c in order if sizes[c] * voxel_ml >= min_lesion_ml] if min_lesion_ml > 0 else list(order)
        n_counted = len(counted)
        centres = []
        for new_id, c in enumerate(counted, start=1):
            s = objs[c - 1]
            start = np.array([sl.start for sl in s], dtype=np.float64) + off
            stop = np.array([sl.stop for sl in s], dtype=np.float64) + off
            centre_mm = (start + stop - 1) / 2 * np.array(sp)
            centres.append(centre_mm)
            if new_id > max_lesions_listed:
                continue
            v = int(sizes[c])
            inl = n_r[c] + n_l[c]
            if inl == 0:
                side = None
            elif min(n_r[c], n_l[c]) / inl >= lesion_bilateral_fraction:
                side = "bilateral"
            else:
                side = "right" if n_r[c] > n_l[c] else "left"
            centroid = np.array([cz[c], cy[c], cx[c]]) + off
            lesions.append(
                {
                    "id": new_id,
                    "voxels": v,
                    "volume_ml": _r(v * voxel_ml, 3),
                    "bbox_start_zyx": [int(a) for a in start],
                    "bbox_stop_zyx": [int(a) for a in stop],
                    "bbox_size_mm": {
                        "height_z": _r((stop[0] - start[0]) * sp[0], 2),
                        "length_y": _r((stop[1] - start[1]) * sp[1], 2),
                        "width_x": _r((stop[2] - start[2]) * sp[2], 2),
                    },
                    "bbox_centre_mm_zyx": [_r(a, 2) for a in centre_mm],
                    "centroid_voxel_zyx": [_r(a, 3) for a in centroid],
                    "centroid_mm_zyx": [_r(a * s_, 2) for a, s_ in zip(centroid, sp)],
                    "side": side,
                    "right_fraction": _r(n_r[c] / v, 4),
                    "left_fraction": _r(n_l[c] / v, 4),
                    "zone": ZONE_NAMES[int(np.argmax(zl[c]))] if zl[c].any() else None,
                    "mean_hu": _r(hu_sum[c] / v, 1) if hu_sum is not None else None,
                    "ggo_fraction": _r(ggo_c[c] / v, 4) if typed else None,
                    "consolidation_fraction": _r(cons_c[c] / v, 4) if typed else None,
                    "peripheral_fraction": _r(per_c[c] / v, 4) if sigma > 0 else 0.0,
                }
            )
        if centres:
            cen = np.array(centres)
            var = cen.var(axis=0)  # population variance (ddof = 0)
            spread = {
                "z": _r(math.sqrt(var[0]), 2),
                "y": _r(math.sqrt(var[1]), 2),
                "x": _r(math.sqrt(var[2]), 2),
                "overall": _r(math.sqrt(float(var.sum())), 2),
                "n_lesions": len(centres),
            }
        if n_counted > max_lesions_listed:
            notes.append(f"lesion list truncated to the {max_lesions_listed} largest of {n_counted} lesions")

    # ---- CT values
    lesion_hu = None
    if hu_vals is not None:
        hv = hu_vals
        q = np.percentile(hv, [5, 25, 50, 75, 95])
        lesion_hu = {
            "mean": _r(hv.mean(), 1),
            "std": _r(hv.std(), 1),
            "p05": _r(q[0], 1),
            "p25": _r(q[1], 1),
            "median": _r(q[2], 1),
            "p75": _r(q[3], 1),
            "p95": _r(q[4], 1),
            "ggo_mean": _r(hv[cls == LESION_GGO].mean(), 1) if typed and n_ggo else None,
            "consolidation_mean": _r(hv[cls == LESION_CONSOLIDATION].mean(), 1) if typed and n_cons else None,
        }

    pct_lung = 100.0 * n_les_in_lung / n_lung
    grade = mosmed_grade(pct_lung)
    ctss_total = int(sum(ctss_per_zone.values()))
    les_r_ml, les_l_ml = n_les_right * voxel_ml, n_les_left * voxel_ml

    return {
        "spacing_mm_zyx": [_r(s, 4) for s in sp],
        "voxel_volume_ml": _r(voxel_ml, 9),
        "lung_volume_ml": {
            "total": _r(n_lung * voxel_ml, 3),
            "right": _r(n_right * voxel_ml, 3),
            "left": _r(n_left * voxel_ml, 3),
        },
        "lesion_volume_ml": _r(n_les * voxel_ml, 3),
        "lesion_volume_in_lung_ml": {
            "total": _r(n_les_in_lung * voxel_ml, 3),
            "right": _r(les_r_ml, 3),
            "left": _r(les_l_ml, 3),
        },
        "lesion_volume_ratio": _r(n_les / n_lung, 6),
        "percent_lung_involved": _r(pct_lung, 3),
        "lesion_fraction_in_lung": _r(n_les_in_lung / n_les, 4) if n_les else None,
        "lesion_count": n_counted,
        "lesion_components_below_min": int(n_components - n_counted),
        "connectivity": "3D, 26-connectivity (face, edge and corner neighbours)",
        "ggo_volume_ml": _r(n_ggo * voxel_ml, 3) if typed else None,
        "consolidation_volume_ml": _r(n_cons * voxel_ml, 3) if typed else None,
        "ggo_fraction": _r(n_ggo / n_les, 4) if typed and n_les else None,
        "consolidation_fraction": _r(n_cons / n_les, 4) if typed and n_les else None,
        "lesion_hu": lesion_hu,
        "peripheral_lesion_ratio": _r(plr, 4),
        "peripheral_thickness_mm": _r(sigma, 3),
        "peripheral_thickness_px_yx": [_r(sigma / sp[1], 3), _r(sigma / sp[2], 3)],
        "lesion_centre_spread_mm": spread,
        "bilateral_involvement": bool(
            n_les_right > 0 and n_les_left > 0 and les_r_ml >= bilateral_min_ml and les_l_ml >= bilateral_min_ml
        ),
        "bilateral_min_ml": _r(bilateral_min_ml, 4),
        "zones_not_lobes": zones,
        "severity": {
            "percent_lung_involved": _r(pct_lung, 3),
            "mosmed_level": grade,
            "mosmed_grade": MOSMED_GRADES[grade][0],
            "mosmed_description": MOSMED_GRADES[grade][1],
            "ctss_zones_total": ctss_total,
            "ctss_zones_max": 30,
            "ctss_per_zone": ctss_per_zone,
            "ctss_note": "per zone (thirds of each lung's craniocaudal extent), 6 zones, 0-30; "
            "the published CTSS is per lobe, 5 lobes, 0-25",
        },
        "lesions": lesions,
        "lesions_truncated": bool(n_counted > max_lesions_listed),
        "notes": notes,
        "references": {
            "lesion_count_lvr_bbox_ct_values_spread_plr": "DeepSC-COVID, Sec. III-B, Findings 1-4; PLR Eq. (1)",
            "mosmed_grade": "Morozov et al., MosMedData, arXiv:2005.06465 (2020)",
            "ctss": "Pan et al., Radiology 2020;295(3):715-721 (0-5 per lobe); applied per zone here",
        },
    }
