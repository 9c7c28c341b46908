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
  y toward the back, x toward the patient's left), not patient (LPS) coordinates;
* **one definition of "lesion" everywhere**: lesion-mask voxels *inside the lung mask*, grouped into 3D components,
  keeping components of at least ``min_lesion_ml``. Volumes, LVR, percent involved, zones, severity, count, list,
  spread, PLR, CT values and class fractions all use that set; the whole mask is reported apart
  (``lesion_volume_raw_ml``, ``lesion_volume_excluded_ml``);
* **floors** (our own choice, not from the cited papers; see ``docs/quantification.md``): the size floor
  ``min_lesion_ml`` (0.2 mL), the study noise floor (in-lung lesion < 1 mL or < 0.1 % of the lung -> CT-0, CTSS 0)
  and the zone floor (a zone scores 0 below 0.1 mL or 0.1 % of its lung).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from pneumoct.parallel import run_chunks
from pneumoct.preprocess.components import label as label_components
from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT

__all__ = [
    "quantify",
    "DEFAULT_MIN_LESION_ML",
    "NOISE_FLOOR_ML",
    "NOISE_FLOOR_PERCENT",
    "ZONE_FLOOR_ML",
    "ZONE_FLOOR_PERCENT",
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

# ------------------------------------------------------------------------------------------------ floors
# These are our own choices (no paper defines them); the reasons are in docs/quantification.md, "Floors".
#: Size floor: a 3D component of in-lung lesion smaller than this is not a lesion (not counted, not listed, not in
#: any volume, involvement or severity). 0.2 mL is a sphere of ~7 mm diameter; smaller foci are at the scale of
#: vessel cross-sections and partial-volume specks (solid nodules < 6 mm, ~0.1 mL, need no follow-up by the
#: Fleischner 2017 guideline), and they are what segmenters produce as false-positive specks.
DEFAULT_MIN_LESION_ML = 0.2
#: Study noise floor: when the in-lung lesion volume (after the size floor) is below NOISE_FLOOR_ML *or* below
#: NOISE_FLOOR_PERCENT of the lung volume, the study is graded CT-0 with CTSS 0 (``severity.below_noise_floor``).
#: 0.1 % of a 4-6 L lung is 4-6 mL (an ~2 cm focus), far below the resolution of a visual extent estimate
#: (MosMedData steps of 25 %, CTSS's lowest band < 5 % of a lobe); the shipped segmenter finds 1.6 mL (0.045 %) of
#: "lesion" in the real normal study (covid-ct-md normal001), so the floor leaves a ~2x margin. Lesions under the
#: floor are still counted and listed; only the grade treats them as noise.
NOISE_FLOOR_ML = 1.0
NOISE_FLOOR_PERCENT = 0.1
#: Zone floor: a zone scores a CTSS band only when its lesion is at least ZONE_FLOOR_ML *and* at least
#: ZONE_FLOOR_PERCENT of the zone's lung (a lesion's sliver crossing into the next third does not score there).
ZONE_FLOOR_ML = 0.1
ZONE_FLOOR_PERCENT = 0.1


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
    lesion_mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    min_lesion_ml: float = 0.0,
    lung_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Label lesions as :func:`quantify` counts them: 3D components, 26-connectivity, ids by decreasing volume.

    Returns ``(labels int32 (Z, Y, X), n)``. With ``lung_mask`` the lesion mask is first restricted to the lung
    (label > 0), as :func:`quantify` does; components below ``min_lesion_ml`` (needs ``spacing``) get 0. With
    ``spacing``, ``lung_mask`` and ``min_lesion_ml=DEFAULT_MIN_LESION_ML`` (quantify's defaults), id k here is
    ``lesions[k-1]`` in :func:`quantify`'s output (when no more than ``max_lesions_listed`` lesions). The defaults
    here (no lung, no size floor) label every component of the whole mask.
    """
    les = np.asarray(lesion_mask) > 0
    if lung_mask is not None:
        lung = np.asarray(lung_mask)
        if lung.shape != les.shape:
            raise ValueError(f"lung_mask must have the lesion mask's shape {les.shape}, got {lung.shape}")
        les = les & (lung > 0)
    labels, n = label_components(les, 26)
    if n == 0:
        return labels.astype(np.int32, copy=False), 0
    sizes = np.bincount(labels[les], minlength=n + 1)
    order = _lesion_order(sizes, n)
    keep = np.ones(n + 1, dtype=bool)
    if min_lesion_ml > 0:
        if spacing is None:
            raise ValueError("min_lesion_ml needs spacing")
        keep = sizes * (float(np.prod(_check_spacing(spacing))) / 1000.0) >= min_lesion_ml * (1 - 1e-9)
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
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML,
    noise_floor_ml: float = NOISE_FLOOR_ML,
    noise_floor_percent: float = NOISE_FLOOR_PERCENT,
    zone_floor_ml: float = ZONE_FLOOR_ML,
    zone_floor_percent: float = ZONE_FLOOR_PERCENT,
    bilateral_min_ml: float = 0.1,
    lesion_bilateral_fraction: float = 0.2,
    max_lesions_listed: int = 200,
    coverage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantify lesions inside the lungs. Returns a JSON-serialisable dict (see ``docs/quantification.md``).

    "Lesion" means, for every measure: lesion-mask voxels inside the lung mask, in 3D components (26-connectivity)
    of at least ``min_lesion_ml``. The whole mask's volume, what lies outside the lung and what the size floor
    removed are reported apart (``lesion_volume_raw_ml``, ``lesion_volume_excluded_ml``,
    ``lesion_components_below_min``).

    Args:
        lesion_mask: (Z, Y, X) lesion labels: 1 GGO, 2 consolidation, other > 0 unspecified lesion; bool = lesion
            of unknown type.
        lung_mask: (Z, Y, X) lung labels: 1 right, 2 left (0 background).
        spacing: (z, y, x) voxel spacing, mm.
        hu: optional (Z, Y, X) Hounsfield units, for the CT-value measures.
        peripheral_thickness_mm: σ of DeepSC-COVID Eq. (1), the in-plane erosion radius in mm.
        min_lesion_ml: size floor; in-lung components smaller than this are not lesions (0 = every component).
        noise_floor_ml, noise_floor_percent: study noise floor; when the in-lung lesion volume is below
            ``noise_floor_ml`` or below ``noise_floor_percent`` % of the lung, severity is CT-0 with CTSS 0,
            ``bilateral_involvement`` is False and ``severity.below_noise_floor`` is True (0 and 0 = no floor).
        zone_floor_ml, zone_floor_percent: a zone scores a CTSS band only when its lesion is at least
            ``zone_floor_ml`` and at least ``zone_floor_percent`` % of the zone's lung.
        bilateral_min_ml: lesion volume needed inside *each* lung for ``bilateral_involvement``.
        lesion_bilateral_fraction: a single lesion is "bilateral" when each lung holds at least this fraction of
            its voxels, otherwise it takes the side holding the majority.
        max_lesions_listed: the per-lesion list keeps the largest this many (the count is not truncated).
        coverage: :func:`pneumoct.quantify.coverage.lung_coverage` of the lung mask; when the lung is not
            fully scanned the measures are marked ``partial`` and the MosMed grade and zone-score total are None
            (:func:`~pneumoct.quantify.coverage.mark_partial`). None: the lung is taken as complete.

    Raises:
        ValueError: the lung mask is empty, shapes differ, labels, spacing or floors are invalid.
    """
    lesion_mask = np.asarray(lesion_mask)
    lung_mask = np.asarray(lung_mask)
    hu = None if hu is None else np.asarray(hu)
    _validate(lesion_mask, lung_mask, hu)
    sp = _check_spacing(spacing)
    sigma = float(peripheral_thickness_mm)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError("peripheral_thickness_mm must be a non-negative number")
    floors = {
        "min_lesion_ml": min_lesion_ml,
        "noise_floor_ml": noise_floor_ml,
        "noise_floor_percent": noise_floor_percent,
        "zone_floor_ml": zone_floor_ml,
        "zone_floor_percent": zone_floor_percent,
    }
    for name, v in floors.items():
        try:
            ok = math.isfinite(float(v)) and float(v) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        floors[name] = float(v)
    min_lesion_ml, noise_floor_ml, noise_floor_percent, zone_floor_ml, zone_floor_percent = floors.values()
    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    typed = lesion_mask.dtype != bool
    notes: list[str] = []

    lung_full = lung_mask > 0
    box = _bbox_of(lung_full)
    if box is None:
        raise ValueError(
            "lung mask is empty: no lung voxels (labels 1 = right, 2 = left), so lesion volume ratio, involvement "
            "and severity are undefined; check the lung segmentation"
        )
    n_raw = int(np.count_nonzero(lesion_mask))  # the whole mask, in the lung or not
    del lung_full
    # every measured lesion voxel lies in the lung, so the lung's bounding box holds them all
    off = np.array([s.start for s in box], dtype=np.float64)
    lm = lung_mask[box]
    lz = lesion_mask[box]
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

    # ---- lesion = in-lung lesion voxels in components of at least min_lesion_ml (3D, 26-connectivity)
    les_in = (lz > 0) & lung
    labels, n_components = label_components(les_in, 26)
    # from here on only the lesion voxels (a few % of the box) are touched, never the whole box again
    flat_in = np.flatnonzero(les_in)  # C order: sorted by z, then y, then x
    del les_in
    n_raw_in_lung = int(flat_in.size)
    lab_in = labels.ravel()[flat_in]
    comp_sizes = np.bincount(lab_in, minlength=n_components + 1)
    comp_sizes[0] = 0
    keep = comp_sizes > 0
    if min_lesion_ml > 0:
        keep &= comp_sizes * voxel_ml >= min_lesion_ml * (1 - 1e-9)  # a volume exactly at a floor reaches it
    keep[0] = False
    n_counted = int(np.count_nonzero(keep))
    n_below_min = int(n_components - n_counted)
    kept_vox = keep[lab_in]
    n_below_min_vox = n_raw_in_lung - int(np.count_nonzero(kept_vox))
    n_outside_vox = n_raw - n_raw_in_lung
    if n_outside_vox:
        notes.append(
            f"{100 * n_outside_vox / n_raw:.1f}% of the lesion mask ({n_outside_vox * voxel_ml:.3f} mL) lies outside "
            "the lung mask: it is not measured (only lesion_volume_raw_ml and lesion_volume_excluded_ml include it)"
        )

    # ---- lesion voxels (coordinates in the crop, C order: sorted by z)
    idx = np.unravel_index(flat_in[kept_vox], lm.shape)  # = np.nonzero(kept voxels), in the same order
    n_les = int(idx[0].size)
    lung_val = lm[idx]
    in_right = lung_val == LUNG_RIGHT
    in_left = lung_val == LUNG_LEFT
    n_les_right, n_les_left = int(in_right.sum()), int(in_left.sum())
    cls = lz[idx] if typed else None
    n_ggo = int(np.count_nonzero(cls == LESION_GGO)) if typed else None
    n_cons = int(np.count_nonzero(cls == LESION_CONSOLIDATION)) if typed else None

    # ---- study noise floor (our choice, see NOISE_FLOOR_*): below it the lung is graded CT-0, CTSS 0
    pct_lung = 100.0 * n_les / n_lung
    les_ml = n_les * voxel_ml
    below_floor = bool(les_ml < noise_floor_ml * (1 - 1e-9) or pct_lung < noise_floor_percent * (1 - 1e-9))
    floor_text = f"< {noise_floor_ml:g} mL or < {noise_floor_percent:g}% of the lung"
    floor_note = None
    if below_floor and n_les:
        floor_note = (
            f"in-lung lesion {les_ml:.3f} mL ({pct_lung:.4f}% of the lung) is below the noise floor ({floor_text}): "
            "graded CT-0 with CTSS 0; the lesions are still counted and listed"
        )
        notes.append(floor_note)

    # ---- zones (thirds of each lung's craniocaudal extent; not lobes)
    Zc = lm.shape[0]
    zone_of_z = np.full((3, Zc), -1, dtype=np.int64)  # [lung label, z] -> zone index 0..5 (row 0 unused)
    zone_ranges: dict[str, tuple[int, int] | None] = {}
    right_per_z = np.count_nonzero(right, axis=(1, 2))
    left_per_z = np.count_nonzero(left, axis=(1, 2))
    for lab_id, per_z, base, side in ((LUNG_RIGHT, right_per_z, 0, "right"), (LUNG_LEFT, left_per_z, 3, "left")):
        thirds = zone_slices(per_z > 0)
        for t, name in enumerate(("upper", "middle", "lower")):
            zname = f"{side}_{name}"
            if thirds is None:
                zone_ranges[zname] = None
                continue
            a, b = thirds[t]
            zone_of_z[lab_id, a:b] = base + t
            zone_ranges[zname] = (a, b)
    zone_lung = np.zeros(6, dtype=np.int64)
    for lab_id, per_z in ((LUNG_RIGHT, right_per_z), (LUNG_LEFT, left_per_z)):
        zi = zone_of_z[lab_id]
        ok = zi >= 0
        np.add.at(zone_lung, zi[ok], per_z[ok])
    vox_zone = np.full(n_les, -1, dtype=np.int64)
    vox_zone[in_right] = zone_of_z[LUNG_RIGHT, idx[0][in_right]]
    vox_zone[in_left] = zone_of_z[LUNG_LEFT, idx[0][in_left]]
    zone_les = np.bincount(vox_zone[vox_zone >= 0], minlength=6)

    zone_pct = [100.0 * zone_les[k] / zone_lung[k] if zone_lung[k] else None for k in range(6)]
    zone_below = [
        not (zone_les[k] > 0 and zone_les[k] * voxel_ml >= zone_floor_ml * (1 - 1e-9)
             and (zone_pct[k] or 0.0) >= zone_floor_percent * (1 - 1e-9))
        for k in range(6)
    ]
    bands = [0 if (below_floor or zone_below[k]) else ctss_band(zone_pct[k]) for k in range(6)]
    zone_fallback = None
    if not below_floor and n_les and not any(bands):
        # involvement above the study floor spread thinly over zones, none of them above the zone floor: the most
        # involved zone scores 1, so a study graded CT-1 or above never has CTSS 0
        k = int(np.argmax([p or 0.0 for p in zone_pct]))
        bands[k] = 1
        zone_fallback = ZONE_NAMES[k]
        notes.append(f"no zone reaches the zone floor; the most involved zone ({zone_fallback}) scores 1")
    zones: dict[str, Any] = {}
    ctss_per_zone: dict[str, int] = {}
    for k, name in enumerate(ZONE_NAMES):
        rng = zone_ranges[name]
        zones[name] = {
            "slices": None if rng is None else [int(rng[0] + off[0]), int(rng[1] + off[0])],
            "lung_ml": _r(zone_lung[k] * voxel_ml, 3),
            "lesion_ml": _r(zone_les[k] * voxel_ml, 3),
            "percent_involved": _r(zone_pct[k], 3),
            "below_zone_floor": bool(zone_below[k]),
            "ctss": bands[k],
        }
        ctss_per_zone[name] = bands[k]

    # ---- peripheral band, DeepSC-COVID Eq. (1), per slice, only where there is lesion
    periph = np.zeros(n_les, dtype=bool)
    if n_les and sigma > 0:
        my = int(math.ceil(sigma / sp[1])) + 1
        mx = int(math.ceil(sigma / sp[2])) + 1
        Y, X = lm.shape[1:]
        zs_les, starts = np.unique(idx[0], return_index=True)
        ends = np.append(starts[1:], n_les)

        def band_slices(r: range) -> None:  # slices are independent, each writes its own lesion pixels: threads
            for z, a, b in zip(zs_les[r.start:r.stop], starts[r.start:r.stop], ends[r.start:r.stop]):
                yv, xv = idx[1][a:b], idx[2][a:b]
                y0, y1 = max(int(yv.min()) - my, 0), min(int(yv.max()) + my + 1, Y)
                x0, x1 = max(int(xv.min()) - mx, 0), min(int(xv.max()) + mx + 1, X)
                win = lung[z, y0:y1, x0:x1]
                # the window reaches σ beyond the lesion pixels, so any non-lung pixel within σ of them is inside
                # it; padding marks the crop border (= outside the lung's box, non-lung) where the window touches it
                pads = ((1 if y0 == 0 else 0, 1 if y1 == Y else 0), (1 if x0 == 0 else 0, 1 if x1 == X else 0))
                wp = np.pad(win, pads)
                if wp.all():
                    continue
                edt = ndi.distance_transform_edt(wp, sampling=(sp[1], sp[2]))
                band = wp & (edt <= sigma + 1e-6)
                periph[a:b] = band[yv - y0 + pads[0][0], xv - x0 + pads[1][0]]

        run_chunks(band_slices, len(zs_les))
    n_periph = int(periph.sum())
    plr = n_periph / n_les if n_les else None

    hu_vals = hu[box][idx].astype(np.float64) if (hu is not None and n_les) else None

    # ---- lesions: the kept components, ids by decreasing volume
    lesions: list[dict[str, Any]] = []
    spread = None
    if n_les:
        lab = lab_in[kept_vox]
        objs = ndi.find_objects(labels)
        del labels
        nc1 = n_components + 1
        cnt = lambda w: np.bincount(lab, weights=w, minlength=nc1)  # noqa: E731
        sizes = np.bincount(lab, minlength=nc1)
        n_r, n_l = cnt(in_right), cnt(in_left)
        ggo_c = cnt(cls == LESION_GGO) if typed else None
        cons_c = cnt(cls == LESION_CONSOLIDATION) if typed else None
        per_c = cnt(periph)
        cz, cy, cx = (cnt(i.astype(np.float64)) / np.maximum(sizes, 1) for i in idx)
        hu_sum = cnt(hu_vals) if hu_vals is not None else None
        okz = vox_zone >= 0
        zl = np.bincount(lab[okz] * 6 + vox_zone[okz], minlength=nc1 * 6).reshape(-1, 6)

        counted = [int(c) for c in _lesion_order(sizes, n_components) if keep[c]]
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
            if min(n_r[c], n_l[c]) / v >= lesion_bilateral_fraction:
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

    # MosMedData grade (Morozov et al., 2020) from the one involvement number, 0 below the noise floor
    grade = 0 if below_floor else mosmed_grade(pct_lung)
    ctss_total = int(sum(ctss_per_zone.values()))
    les_r_ml, les_l_ml = n_les_right * voxel_ml, n_les_left * voxel_ml
    lvr = n_les / n_lung

    out = {
        "spacing_mm_zyx": [_r(s, 4) for s in sp],
        "voxel_volume_ml": _r(voxel_ml, 9),
        "lung_volume_ml": {
            "total": _r(n_lung * voxel_ml, 3),
            "right": _r(n_right * voxel_ml, 3),
            "left": _r(n_left * voxel_ml, 3),
        },
        "lesion_volume_ml": _r(les_ml, 3),
        "lesion_volume_in_lung_ml": {
            "total": _r(les_ml, 3),
            "right": _r(les_r_ml, 3),
            "left": _r(les_l_ml, 3),
        },
        "lesion_volume_raw_ml": _r(n_raw * voxel_ml, 3),
        "lesion_volume_excluded_ml": {
            "outside_lung": _r(n_outside_vox * voxel_ml, 3),
            "below_min_lesion": _r(n_below_min_vox * voxel_ml, 3),
        },
        "lesion_volume_ratio": _r(lvr, 6),
        "percent_lung_involved": _r(100.0 * lvr, 3),
        "lesion_fraction_in_lung": _r(n_raw_in_lung / n_raw, 4) if n_raw else None,
        "lesion_count": n_counted,
        "lesion_components_below_min": n_below_min,
        "min_lesion_ml": _r(min_lesion_ml, 4),
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
            not below_floor
            and n_les_right > 0
            and n_les_left > 0
            and les_r_ml >= bilateral_min_ml
            and les_l_ml >= bilateral_min_ml
        ),
        "bilateral_min_ml": _r(bilateral_min_ml, 4),
        "zones_not_lobes": zones,
        "severity": {
            "percent_lung_involved": _r(100.0 * lvr, 3),
            "mosmed_level": grade,
            "mosmed_grade": MOSMED_GRADES[grade][0],
            "mosmed_description": MOSMED_GRADES[grade][1],
            "ctss_zones_total": ctss_total,
            "ctss_zones_max": 30,
            "ctss_per_zone": ctss_per_zone,
            "ctss_note": "per zone (thirds of each lung's craniocaudal extent), 6 zones, 0-30; "
            "the published CTSS is per lobe, 5 lobes, 0-25",
            "below_noise_floor": below_floor,
            "min_lesion_ml": _r(min_lesion_ml, 4),
            "noise_floor_ml": _r(noise_floor_ml, 4),
            "noise_floor_percent": _r(noise_floor_percent, 4),
            "zone_floor_ml": _r(zone_floor_ml, 4),
            "zone_floor_percent": _r(zone_floor_percent, 4),
            "zone_floor_fallback": zone_fallback,
            "floor_note": floor_note
            or (
                f"lesions < {min_lesion_ml:g} mL are not counted; CT-0 and CTSS 0 when the lesion is {floor_text}; "
                f"a zone scores only from {zone_floor_ml:g} mL and {zone_floor_percent:g}% of its lung "
                "(floors chosen by this project, not from the cited papers)"
            ),
        },
        "lesions": lesions,
        "lesions_truncated": bool(n_counted > max_lesions_listed),
        "notes": notes,
        "references": {
            "lesion_count_lvr_bbox_ct_values_spread_plr": "DeepSC-COVID, Sec. III-B, Findings 1-4; PLR Eq. (1)",
            "mosmed_grade": "Morozov et al., MosMedData, arXiv:2005.06465 (2020)",
            "ctss": "Pan et al., Radiology 2020;295(3):715-721 (0-5 per lobe); applied per zone here",
            "floors": "min_lesion_ml, noise and zone floors: this project's choice (docs/quantification.md)",
        },
    }
    if coverage is not None:  # a partly scanned lung: measures marked partial, whole-lung grades withheld
        from pneumoct.quantify.coverage import mark_partial

        mark_partial(out, coverage)
    return out
