"""A checkable suggestion of the RSNA expert-consensus CT category from measured features.

Simpson S, Kay FU, Abbara S, et al. Radiological Society of North America Expert Consensus Statement on Reporting
Chest CT Findings Related to COVID-19. Radiology: Cardiothoracic Imaging 2020;2(2):e200152. Four categories,
assigned in this order, the first that applies wins: **typical**, **indeterminate**, **atypical** appearance, and
**negative for pneumonia** (summary in ``shared/reference/chest-ct-reporting-categories.md``). The broad CO-RADS
correspondence (Prokop M, et al. Radiology 2020;296(2):E97-E104) is given as an approximation only.

This is **not a classifier**. It reads the :func:`pneumoct.quantify.quantify` dict (and, when given, the lesion
mask and the HU volume, on the lesions' bounding boxes only), shows every feature with its measured value and the
rule that used it, and names the rule that fired, so that a radiologist can check, and disagree with, each step.
Every threshold below was **set by hand** (ours unless a comment names a source); none was fitted on data.

Pattern lesions: the pattern (distribution, GGO share, dominant lesion) is read from the *counted* lesions, those
of at least :data:`LESION_FLOOR_ML`; smaller compact components are counted apart as small solid nodules or small
GGO foci, the rest ignored, so specks do not make a study bilateral or multifocal. Zones are thirds of each lung's
craniocaudal extent, **not lobes** (``docs/quantification.md``). Full description: ``docs/differential.md``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..preprocess.components import label as label_components

__all__ = [
    "rsna_category",
    "CATEGORIES",
    "LABELS",
    "CO_RADS_EQUIVALENT",
    "SUGGESTED_CLASS",
    "THRESHOLDS",
    "NAME",
]

NAME = "rsna-category-suggestion-v1"

CATEGORIES = ("typical", "indeterminate", "atypical", "negative")
#: RSNA consensus wording of each category (Simpson et al. 2020).
LABELS = {
    "typical": "Typical appearance",
    "indeterminate": "Indeterminate appearance",
    "atypical": "Atypical appearance",
    "negative": "Negative for pneumonia",
}
#: Broad correspondence given in the reference summary: CO-RADS 1 ~ negative, 2 ~ atypical, 3 ~ indeterminate,
#: 4-5 ~ typical. Approximate: CO-RADS is a level of suspicion with its own criteria (Prokop et al. 2020).
CO_RADS_EQUIVALENT = {"negative": "1", "atypical": "2", "indeterminate": "3", "typical": "4-5"}
#: pneumoct headline class suggested by each category (``pneumoct.types.CLASS_NAMES``); None = pattern not specific.
SUGGESTED_CLASS = {"typical": "covid19", "atypical": "cap", "indeterminate": None, "negative": "healthy"}

REFERENCE = {
    "rsna": "Simpson S, Kay FU, Abbara S, et al. Radiological Society of North America Expert Consensus Statement "
    "on Reporting Chest CT Findings Related to COVID-19. Radiology: Cardiothoracic Imaging 2020;2(2):e200152",
    "co_rads": "Prokop M, van Everdingen W, van Rees Vellinga T, et al. CO-RADS: a categorical CT assessment scheme "
    "for patients suspected of having COVID-19 - definition and evaluation. Radiology 2020;296(2):E97-E104",
    "plr": "DeepSC-COVID, Sec. III-B, Finding 4 and Eq. (1) (peripheral lesion ratio)",
    "summary": "shared/reference/chest-ct-reporting-categories.md; docs/differential.md",
}
NOTE = (
    "Suggestion for a radiologist to check, not a classifier and not a diagnosis: each feature is shown with its "
    "measured value and the rule that used it. The thresholds were set by hand (not fitted on data) and the rules "
    "have not been validated on patients. Zones are thirds of each lung's height, not lobes. Research use only."
)

# ------------------------------------------------------------------------------------------------ thresholds
# All hand-set (ours) unless the comment names a source. Changing one changes NAME's behaviour: record it in
# docs/differential.md.

#: Counted ("pattern") lesions are 3D components of at least this volume. Same floor as rules.py (most of the
#: threshold baseline's false positives are smaller, docs/diagnosis_rule.md); 1 mL ~ a 12 mm sphere.
LESION_FLOOR_ML = 1.0
#: Bilateral: the less involved lung holds at least this much counted-lesion volume. Same 1 mL as the pipeline's
#: ``bilateral_min_ml`` (a lung does not count as involved because of a few voxels).
BILATERAL_MIN_ML = 1.0
#: Peripheral: peripheral lesion ratio (DeepSC-COVID Eq. (1), sigma = the quantification's, 10 mm in the pipeline)
#: of the counted lesions at least this. Same cut as rules.py (DeepSC-COVID Finding 4: COVID-19 peripheral, CAP
#: central); the cut itself is ours.
PERIPHERAL_PLR_MIN = 0.40
#: Ground glass present ("GGO, with or without consolidation"): GGO share of the counted lesion volume at least
#: this. Below it the study reads as "consolidation without GGO": the partial-volume rim of a consolidation comes out
#: as GGO (docs/quantification.md) and is allowed up to a quarter of the volume.
GGO_PRESENT_MIN = 0.25
#: Ground glass dominant: GGO share at least half (study level: supporting only; per lesion: rounded GGO).
GGO_DOMINANT_MIN = 0.50
#: Multifocal: at least this many counted lesions ("more than one focus").
MULTIFOCAL_MIN_LESIONS = 2
#: Lower-zone predominance (CO-RADS 5 description; supporting only, no rule uses it): the lower zones hold more
#: than this share of the in-lung lesion volume (even involvement gives ~0.35-0.45: lower thirds hold more lung).
LOWER_ZONE_SHARE_MIN = 0.50
#: Rounded lesion (3D, needs the lesion mask): minor/major principal axis ratio (square root of the eigenvalue
#: ratio of the voxel-coordinate covariance, in mm) at least this, i.e. the short axis at least half the long one ...
ROUNDED_AXIS_RATIO_MIN = 0.50
#: ... and ellipsoid fill (volume / volume of the moment-equivalent ellipsoid, semi-axes sqrt(5 * eigenvalue)) at
#: least this: ~1.0 for spheres and ellipsoids (0.85-0.95 at 5 mm slices), 0.89 for a cube, 0.5-0.6 for lobulated
#: or branching shapes, < 0.3 for a crescent (measured on synthetic shapes, see docs/differential.md).
ROUNDED_FILL_MIN = 0.80
#: Larger lesions are confluent opacity, not "rounded" foci (100 mL ~ a 5.8 cm sphere); not assessed.
ROUNDED_MAX_ML = 100.0
#: A lesion on fewer slices than this has no measurable 3D shape; not assessed.
ROUNDED_MIN_SLICES = 3
#: Typical rule T2 (multifocal rounded GGO): at least this many rounded, GGO-dominant counted lesions.
ROUNDED_MIN_LESIONS = 2
#: Dominant lesion: the largest counted lesion holds at least this share of the counted volume (same as rules.py).
DOMINANT_SHARE_MIN = 0.60
#: Lobar/segmental consolidation proxy: the dominant lesion's consolidation fraction at least this (= 1 - the GGO
#: allowed for a partial-volume rim, GGO_PRESENT_MIN).
LOBAR_CONSOLIDATION_MIN = 0.75
#: ... and at least this share of its slice extent inside its own zone (zones are not lobes: a quarter may cross).
ZONE_CONFINED_MIN = 0.75
#: Small nodule: a component under LESION_FLOOR_ML whose bounding box is at most this in-plane (and at most
#: max(this, 2 slice spacings) in z). Ours; centrilobular and tree-in-bud nodules are a few millimetres (Fleischner
#: Society glossary, Hansell DM et al., Radiology 2008;246(3):697-722).
NODULE_MAX_MM = 10.0
#: ... and at least this volume (0.01 mL ~ a 2.7 mm sphere; smaller is a few voxels, noise rather than a nodule).
NODULE_MIN_ML = 0.01
#: Discrete small nodules (atypical rule A2): at least this many small *solid* compact components (GGO share below
#: GGO_DOMINANT_MIN); the same count as rules.py's "small nodular lesions". Compact small components that are
#: mostly GGO are "very small GGO" (indeterminate rule I2) instead. With abnormal=None, fewer than this many small
#: compact components of either kind and no counted lesion is "negative" (the burden floor).
NODULES_MIN_COUNT = 5
#: Cavity proxy (needs the lesion mask and HU): voxels at most this HU (gas; aerated lung is ~ -850) ...
CAVITY_AIR_HU = -900.0
#: ... forming a 6-connected cluster of at least this volume (0.05 mL ~ a 4.6 mm sphere) ...
CAVITY_MIN_ML = 0.05
#: ... not tubular (principal SD ratio major/middle below this: a tube is an air bronchogram, not a cavity) ...
CAVITY_TUBE_RATIO = 3.0
#: ... enclosed (3D) by, or inside, a counted lesion whose consolidation fraction is at least this.
CAVITY_LESION_MIN_CONSOLIDATION = 0.50
#: Array features are measured on at most this many counted lesions (the largest) to bound the run time.
MAX_ARRAY_LESIONS = 30

THRESHOLDS = {
    "lesion_floor_ml": LESION_FLOOR_ML,
    "bilateral_min_ml": BILATERAL_MIN_ML,
    "peripheral_plr_min": PERIPHERAL_PLR_MIN,
    "ggo_present_min": GGO_PRESENT_MIN,
    "ggo_dominant_min": GGO_DOMINANT_MIN,
    "multifocal_min_lesions": MULTIFOCAL_MIN_LESIONS,
    "lower_zone_share_min": LOWER_ZONE_SHARE_MIN,
    "rounded_axis_ratio_min": ROUNDED_AXIS_RATIO_MIN,
    "rounded_fill_min": ROUNDED_FILL_MIN,
    "rounded_max_ml": ROUNDED_MAX_ML,
    "rounded_min_slices": ROUNDED_MIN_SLICES,
    "rounded_min_lesions": ROUNDED_MIN_LESIONS,
    "dominant_share_min": DOMINANT_SHARE_MIN,
    "lobar_consolidation_min": LOBAR_CONSOLIDATION_MIN,
    "zone_confined_min": ZONE_CONFINED_MIN,
    "nodule_max_mm": NODULE_MAX_MM,
    "nodule_min_ml": NODULE_MIN_ML,
    "nodules_min_count": NODULES_MIN_COUNT,
    "cavity_air_hu": CAVITY_AIR_HU,
    "cavity_min_ml": CAVITY_MIN_ML,
    "cavity_tube_ratio": CAVITY_TUBE_RATIO,
    "cavity_lesion_min_consolidation": CAVITY_LESION_MIN_CONSOLIDATION,
    "max_array_lesions": MAX_ARRAY_LESIONS,
}

_NOT_MEASURED_ALWAYS = {
    "crazy_paving": (
        "typical",
        "T1",
        "texture inside GGO (intralobular lines) is not measured; 'with or without crazy paving' does not change T1",
    ),
    "reverse_halo_organising_pneumonia": (
        "typical",
        "T3",
        "reverse halo / organising-pneumonia signs are not measured, so rule T3 cannot fire",
    ),
    "septal_thickening": (
        "atypical",
        "A4",
        "smooth interlobular septal thickening is not measured, so rule A4 (with pleural effusion) cannot fire",
    ),
    "pleural_fluid": (
        "atypical",
        "A4",
        "not measured: an HU 0-30 layer outside the lung overlaps chest-wall muscle with scanner noise and was not "
        "robust; alone it is not an RSNA criterion (A4 needs septal thickening too)",
    ),
}


# ---------------------------------------------------------------------------------------------- small helpers
def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None:
        return None
    v = round(float(x), nd)
    return 0.0 if v == 0 else v


def _f(x: Any) -> float | None:
    """float, or None for None/NaN."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _feature(
    name: str,
    value: Any,
    rule: str,
    met: bool | None,
    used_for: list[str],
    rules: list[str],
    unit: str | None = None,
    detail: Any = None,
) -> dict[str, Any]:
    out = {"name": name, "value": value, "unit": unit, "rule": rule, "met": met, "used_for": used_for, "rules": rules}
    if detail is not None:
        out["detail"] = detail
    return out


def _yes(met: bool | None) -> str:
    return "not measured" if met is None else ("yes" if met else "no")


# ------------------------------------------------------------------------------------------- features from q
def _pattern_features(q: dict[str, Any]) -> dict[str, Any]:
    """Everything that needs only the quantify() dict."""
    lesions = [les for les in (q.get("lesions") or []) if _f(les.get("volume_ml")) is not None]
    sp = q.get("spacing_mm_zyx") or [None, None, None]
    sz = _f(sp[0]) if len(sp) == 3 else None
    counted = [les for les in lesions if float(les["volume_ml"]) >= LESION_FLOOR_ML]
    counted.sort(key=lambda les: -float(les["volume_ml"]))
    small = [les for les in lesions if float(les["volume_ml"]) < LESION_FLOOR_ML]
    z_max = max(NODULE_MAX_MM, 2 * sz) if sz else NODULE_MAX_MM

    def is_nodule(les: dict[str, Any]) -> bool:
        if float(les["volume_ml"]) < NODULE_MIN_ML:
            return False
        size = les.get("bbox_size_mm") or {}
        h, ly, wx = _f(size.get("height_z")), _f(size.get("length_y")), _f(size.get("width_x"))
        if h is None or ly is None or wx is None:
            return False
        return ly <= NODULE_MAX_MM and wx <= NODULE_MAX_MM and h <= z_max

    compact = [les for les in small if is_nodule(les)]
    # solid nodule: GGO share below half; untyped (ggo None) components are counted as nodules of unknown type
    ggo_foci = [les for les in compact if (_f(les.get("ggo_fraction")) or 0.0) >= GGO_DOMINANT_MIN]
    nodules = [les for les in compact if (_f(les.get("ggo_fraction")) or 0.0) < GGO_DOMINANT_MIN]
    vol = [float(les["volume_ml"]) for les in counted]
    total = sum(vol)

    def weighted(key: str) -> float | None:
        if not counted or total <= 0:
            return None
        vals = [_f(les.get(key)) for les in counted]
        if any(v is None for v in vals):
            return None
        return sum(v * w for v, w in zip(vals, vol)) / total  # type: ignore[operator]

    right = sum(float(les.get("right_fraction") or 0.0) * v for les, v in zip(counted, vol))
    left = sum(float(les.get("left_fraction") or 0.0) * v for les, v in zip(counted, vol))
    zones = q.get("zones_not_lobes") or {}
    zl = {k: _f((zones.get(k) or {}).get("lesion_ml")) or 0.0 for k in zones}
    zone_total = sum(zl.values())
    lower = zl.get("right_lower", 0.0) + zl.get("left_lower", 0.0)
    return {
        "all_lesions": lesions,
        "counted": counted,
        "small": small,
        "nodules": nodules,
        "ggo_foci": ggo_foci,
        "compact": compact,
        "nodule_z_max_mm": z_max,
        "total_ml": total,
        "right_ml": right,
        "left_ml": left,
        "plr": weighted("peripheral_fraction"),
        "ggo": weighted("ggo_fraction"),
        "cons": weighted("consolidation_fraction"),
        "lower_share": (lower / zone_total) if zone_total > 0 else None,
        "zones": zones,
        "truncated": bool(q.get("lesions_truncated")),
    }


def _zone_overlap(les: dict[str, Any], zones: dict[str, Any]) -> float | None:
    """Share of a lesion's slice extent inside the slices of its own zone (bounding box, full-volume indices)."""
    zone = les.get("zone")
    rng = (zones.get(zone) or {}).get("slices") if zone else None
    start, stop = les.get("bbox_start_zyx"), les.get("bbox_stop_zyx")
    if not rng or not start or not stop or stop[0] <= start[0]:
        return None
    inter = min(int(stop[0]), int(rng[1])) - max(int(start[0]), int(rng[0]))
    return max(inter, 0) / (int(stop[0]) - int(start[0]))


# ----------------------------------------------------------------------------------------- features from arrays
def _component_in_box(
    mask: np.ndarray, les: dict[str, Any], lung: np.ndarray | None
) -> tuple[np.ndarray, tuple[slice, ...]] | None:
    """The lesion's own voxels inside its bounding box (other lesions may reach into the box), or None.

    With the lung labels the mask is first restricted to the lung, as quantify() measures lesions.
    """
    start, stop = les.get("bbox_start_zyx"), les.get("bbox_stop_zyx")
    voxels = les.get("voxels")
    if not start or not stop or voxels is None:
        return None
    if any(int(a) < 0 or int(b) > n or int(b) <= int(a) for a, b, n in zip(start, stop, mask.shape)):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    crop = mask[box] > 0
    if lung is not None:
        crop &= lung[box] > 0
    labels, n = label_components(crop, 26)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    objs = ndi.find_objects(labels)
    for c in np.flatnonzero(sizes == int(voxels)):
        if c == 0:
            continue
        sl = objs[c - 1]
        if all(s.start == 0 and s.stop == d for s, d in zip(sl, crop.shape)):  # spans its whole box: it is the lesion
            return labels == c, box
    return None


def _shape(comp: np.ndarray, sp: tuple[float, float, float]) -> dict[str, float]:
    """Axis ratio and ellipsoid fill from the second moments of the voxel centres (mm), voxel extent included."""
    coords = np.array(np.nonzero(comp), dtype=np.float64) * np.array(sp)[:, None]
    cov = np.cov(coords, bias=True) + np.diag(np.array(sp) ** 2 / 12.0)
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-12, None)  # ascending
    vol = coords.shape[1] * sp[0] * sp[1] * sp[2]
    ell = 4.0 / 3.0 * math.pi * math.sqrt(125.0 * float(np.prod(ev)))
    return {"axis_ratio": math.sqrt(ev[0] / ev[2]), "ellipsoid_fill": vol / ell}


def _cavity(comp: np.ndarray, hu_crop: np.ndarray, sp: tuple[float, float, float]) -> float:
    """Largest non-tubular gas cluster (mL) inside the lesion or enclosed by it in 3D; 0 when none."""
    padded = np.pad(comp, 1)
    bg, _ = label_components(~padded, 6)  # 6-connected background
    outside = bg[0, 0, 0]
    filled = (padded | ((bg > 0) & (bg != outside)))[1:-1, 1:-1, 1:-1]
    air = filled & (hu_crop <= CAVITY_AIR_HU)
    if not air.any():
        return 0.0
    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    labels, n = label_components(air, 6)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    best = 0.0
    for c in np.flatnonzero(sizes * voxel_ml >= CAVITY_MIN_ML):
        if c == 0:
            continue
        coords = np.array(np.nonzero(labels == c), dtype=np.float64) * np.array(sp)[:, None]
        ev = np.clip(np.linalg.eigvalsh(np.cov(coords, bias=True) + np.diag(np.array(sp) ** 2 / 12.0)), 1e-12, None)
        if math.sqrt(ev[2] / ev[1]) >= CAVITY_TUBE_RATIO:
            continue  # a tube: air bronchogram
        best = max(best, float(sizes[c] * voxel_ml))
    return best


def _array_features(
    pf: dict[str, Any],
    lesion_mask: np.ndarray,
    sp: tuple[float, float, float],
    hu: np.ndarray | None,
    lung: np.ndarray | None,
) -> dict[str, Any]:
    typed = pf["ggo"] is not None or not pf["counted"]
    shapes: list[dict[str, Any]] = []
    cavities: list[dict[str, Any]] = []
    skipped: list[str] = []
    for les in pf["counted"][:MAX_ARRAY_LESIONS]:
        vol = float(les["volume_ml"])
        ggo = _f(les.get("ggo_fraction"))
        cons = _f(les.get("consolidation_fraction"))
        want_shape = vol <= ROUNDED_MAX_ML and (ggo is None or ggo >= GGO_DOMINANT_MIN)
        want_cavity = hu is not None and (cons is None or cons >= CAVITY_LESION_MIN_CONSOLIDATION)
        if not (want_shape or want_cavity):
            continue
        found = _component_in_box(lesion_mask, les, lung)
        if found is None:
            skipped.append(f"lesion {les.get('id')}: not found in the lesion mask at its bounding box")
            continue
        comp, box = found
        if want_shape:
            n_slices = comp.shape[0]
            if n_slices < ROUNDED_MIN_SLICES:
                shapes.append({"id": les.get("id"), "volume_ml": _r(vol, 3), "ggo_fraction": ggo,
                               "axis_ratio": None, "ellipsoid_fill": None, "rounded": None,
                               "why": f"on {n_slices} slice(s) < {ROUNDED_MIN_SLICES}: no 3D shape"})
            else:
                s = _shape(comp, sp)
                rounded = s["axis_ratio"] >= ROUNDED_AXIS_RATIO_MIN and s["ellipsoid_fill"] >= ROUNDED_FILL_MIN
                shapes.append({"id": les.get("id"), "volume_ml": _r(vol, 3), "ggo_fraction": ggo,
                               "axis_ratio": _r(s["axis_ratio"], 3), "ellipsoid_fill": _r(s["ellipsoid_fill"], 3),
                               "rounded": bool(rounded)})
        if want_cavity:
            air_ml = _cavity(comp, np.asarray(hu[box], dtype=np.float32), sp)  # type: ignore[index]
            if air_ml > 0:
                cavities.append({"id": les.get("id"), "air_ml": _r(air_ml, 3), "consolidation_fraction": cons})
    n_rounded = sum(1 for s in shapes if s["rounded"] and (s["ggo_fraction"] or 0.0) >= GGO_DOMINANT_MIN)
    return {
        "typed": typed,
        "shapes": shapes,
        "n_rounded_ggo": n_rounded,
        "n_rounded_any": sum(1 for s in shapes if s["rounded"]),
        "cavities": cavities,
        "cavity_measured": hu is not None,
        "skipped": skipped,
        "limited": len(pf["counted"]) > MAX_ARRAY_LESIONS,
    }


# ----------------------------------------------------------------------------------------------------- main
def rsna_category(
    q: dict[str, Any],
    lesion_mask: np.ndarray | None = None,
    lung_labels: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    hu: np.ndarray | None = None,
    *,
    abnormal: bool | None = None,
) -> dict[str, Any]:
    """Suggest the RSNA consensus category (typical / indeterminate / atypical / negative) from measured features.

    Args:
        q: the :func:`pneumoct.quantify.quantify` dict (enough on its own).
        lesion_mask: optional (Z, Y, X) lesion mask that ``q`` was measured on: enables per-lesion 3D roundness
            (rule T2) and, with ``hu``, the cavity proxy (rule A3). Only the counted lesions' bounding boxes are read.
        lung_labels: optional lung labels (1 right, 2 left): the lesion mask is restricted to the lung before a
            lesion is looked up in its box, as quantify() does (the pleural-fluid proxy is not measured).
        spacing: (z, y, x) mm; default ``q["spacing_mm_zyx"]``.
        hu: optional (Z, Y, X) Hounsfield units (cavity proxy).
        abnormal: the study-level decision of the validated headline model. False -> "negative"; True -> a pattern
            category; None -> decided from the lesion burden (no lesion >= LESION_FLOOR_ML and fewer than
            NODULES_MIN_COUNT small compact components -> "negative").

    Returns:
        JSON-ready dict: ``category``, ``label``, ``co_rads_equivalent``, ``suggested_class``, ``rule``,
        ``features``, ``decision_path``, ``not_measured``, ``thresholds``, ``inputs``, ``caveats``, ``name``,
        ``reference``, ``note`` (see docs/differential.md).

    Raises:
        ValueError: arrays of the wrong dimension or of different shapes, or no spacing for the lesion mask.
    """
    if not isinstance(q, dict):
        raise ValueError("q must be the dict returned by pneumoct.quantify.quantify()")
    if abnormal is not None:
        abnormal = bool(abnormal)
    caveats: list[str] = []
    pf = _pattern_features(q)
    counted, nodules, ggo_foci = pf["counted"], pf["nodules"], pf["ggo_foci"]
    n_counted, n_nodules, n_foci = len(counted), len(nodules), len(ggo_foci)
    n_compact = n_nodules + n_foci

    # ---- arrays (optional)
    arr: dict[str, Any] | None = None
    if lesion_mask is not None:
        lm = np.asarray(lesion_mask)
        if lm.ndim != 3:
            raise ValueError(f"lesion_mask must be 3D (Z, Y, X), got shape {lm.shape}")
        for nm, a in (("hu", hu), ("lung_labels", lung_labels)):
            if a is not None and np.shape(a) != lm.shape:
                raise ValueError(f"{nm} must have the lesion mask's shape {lm.shape}, got {np.shape(a)}")
        sp_in = spacing if spacing is not None else q.get("spacing_mm_zyx")
        if sp_in is None or len(sp_in) != 3 or not all(_f(s) and float(s) > 0 for s in sp_in):
            raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {sp_in!r}")
        sp = (float(sp_in[0]), float(sp_in[1]), float(sp_in[2]))
        arr = _array_features(pf, lm, sp, None if hu is None else np.asarray(hu),
                              None if lung_labels is None else np.asarray(lung_labels))
        caveats.extend(arr["skipped"])
        if arr["limited"]:
            caveats.append(f"array features measured on the {MAX_ARRAY_LESIONS} largest counted lesions only")
    elif hu is not None or lung_labels is not None:
        caveats.append("hu / lung_labels given without lesion_mask: the array features need the lesion mask")
    if pf["truncated"]:
        caveats.append("quantify() truncated its lesion list: the lesion and nodule counts cover the listed lesions")

    typed = pf["ggo"] is not None or not counted  # no counted lesion: type does not matter
    if counted and pf["ggo"] is None:
        caveats.append("lesion type (GGO vs consolidation) not measured (untyped lesion mask): GGO rules undecided")

    # ---- features
    F: dict[str, dict[str, Any]] = {}
    ordered: list[str] = []

    def add(feat: dict[str, Any]) -> None:
        F[feat["name"]] = feat
        ordered.append(feat["name"])

    burden_met = n_counted >= 1 or n_compact >= NODULES_MIN_COUNT
    add(_feature(
        "lesion_burden", n_counted,
        f"counted lesions (>= {LESION_FLOOR_ML} mL); with abnormal=None the study is negative when there is none "
        f"and fewer than {NODULES_MIN_COUNT} small compact components (solid nodules + GGO foci)",
        burden_met, ["negative"], ["N"], "lesions",
        {"counted_volume_ml": _r(pf["total_ml"], 3), "small_components": len(pf["small"]),
         "small_nodules": n_nodules, "small_ggo_foci": n_foci, "lesion_count_quantify": q.get("lesion_count"),
         "lesion_volume_in_lung_ml": (q.get("lesion_volume_in_lung_ml") or {}).get("total")},
    ))
    min_side = min(pf["right_ml"], pf["left_ml"]) if counted else None
    bilateral = None if min_side is None else min_side >= BILATERAL_MIN_ML
    add(_feature(
        "bilateral", _r(min_side, 3),
        f"less involved lung holds >= {BILATERAL_MIN_ML} mL of counted-lesion volume",
        bool(bilateral) if bilateral is not None else False, ["typical"], ["T1"], "mL",
        {"right_ml": _r(pf["right_ml"], 3), "left_ml": _r(pf["left_ml"], 3),
         "bilateral_involvement_quantify": q.get("bilateral_involvement")},
    ))
    both = pf["right_ml"] + pf["left_ml"]
    major_share = max(pf["right_ml"], pf["left_ml"]) / both if both > 0 else None
    add(_feature(
        "unilateral", _r(major_share, 4),
        f"value: share of the counted in-lung volume in the more involved lung; met when not bilateral "
        f"(other lung < {BILATERAL_MIN_ML} mL)",
        (not bilateral) if bilateral is not None else None, ["indeterminate", "atypical"], ["I1", "A1"], "fraction",
    ))
    plr = pf["plr"]
    add(_feature(
        "peripheral", _r(plr, 4),
        f"peripheral lesion ratio of the counted lesions (DeepSC-COVID Eq. (1), sigma "
        f"{q.get('peripheral_thickness_mm')} mm) >= {PERIPHERAL_PLR_MIN}",
        None if plr is None else plr >= PERIPHERAL_PLR_MIN, ["typical"], ["T1"], "fraction",
        {"peripheral_lesion_ratio_all_lesions": q.get("peripheral_lesion_ratio")},
    ))
    ggo = pf["ggo"]
    add(_feature(
        "ground_glass", _r(ggo, 4),
        f"GGO share of the counted lesion volume >= {GGO_PRESENT_MIN} (GGO present; below it: consolidation "
        "without GGO)",
        None if ggo is None else ggo >= GGO_PRESENT_MIN, ["typical", "indeterminate", "atypical"],
        ["T1", "I1", "A1"], "fraction",
        {"ggo_fraction_all_lesions": q.get("ggo_fraction"),
         "consolidation_fraction_counted": _r(pf["cons"], 4)},
    ))
    add(_feature(
        "ground_glass_dominant", _r(ggo, 4), f"GGO share of the counted lesion volume >= {GGO_DOMINANT_MIN} "
        "(supporting; no rule uses it)",
        None if ggo is None else ggo >= GGO_DOMINANT_MIN, ["supporting"], [], "fraction",
    ))
    add(_feature(
        "multifocal", n_counted, f"counted lesions (>= {LESION_FLOOR_ML} mL) >= {MULTIFOCAL_MIN_LESIONS}",
        n_counted >= MULTIFOCAL_MIN_LESIONS, ["typical", "indeterminate"], ["T2", "I1"], "lesions",
    ))
    ls = pf["lower_share"]
    add(_feature(
        "lower_zone_predominance", _r(ls, 4),
        f"lower zones (lower third of each lung, not lobes) hold > {LOWER_ZONE_SHARE_MIN} of the in-lung lesion "
        "volume (supporting, CO-RADS 5 description; no rule uses it)",
        None if ls is None else ls > LOWER_ZONE_SHARE_MIN, ["supporting"], [], "fraction",
    ))
    # rounded GGO (arrays)
    if arr is None:
        add(_feature("rounded_ground_glass", None,
                     "not measured: needs the lesion mask (per-lesion 3D axis ratio and ellipsoid fill)",
                     None, ["typical"], ["T2"], "lesions"))
    else:
        r_rule = (f"GGO-dominant (>= {GGO_DOMINANT_MIN}) counted lesions <= {ROUNDED_MAX_ML} mL with axis ratio >= "
                  f"{ROUNDED_AXIS_RATIO_MIN} and ellipsoid fill >= {ROUNDED_FILL_MIN}; met when >= "
                  f"{ROUNDED_MIN_LESIONS}")
        if arr["typed"]:
            add(_feature("rounded_ground_glass", arr["n_rounded_ggo"], r_rule,
                         arr["n_rounded_ggo"] >= ROUNDED_MIN_LESIONS, ["typical"], ["T2"], "lesions",
                         {"lesions": arr["shapes"]}))
        else:
            add(_feature("rounded_ground_glass", arr["n_rounded_any"],
                         r_rule + " (lesion type not measured: value counts rounded lesions of any type)",
                         None, ["typical"], ["T2"], "lesions", {"lesions": arr["shapes"]}))
    # dominant lesion and the lobar/segmental consolidation proxy
    dom = counted[0] if counted else None
    dom_share = float(dom["volume_ml"]) / pf["total_ml"] if dom is not None and pf["total_ml"] > 0 else None
    add(_feature(
        "dominant_lesion", _r(dom_share, 4),
        f"largest counted lesion's share of the counted volume >= {DOMINANT_SHARE_MIN}",
        None if dom_share is None else dom_share >= DOMINANT_SHARE_MIN, ["atypical"], ["A1"], "fraction",
        None if dom is None else {"id": dom.get("id"), "volume_ml": dom.get("volume_ml")},
    ))
    dom_cons = _f(dom.get("consolidation_fraction")) if dom is not None else None
    add(_feature(
        "dominant_lesion_consolidation", _r(dom_cons, 4),
        f"dominant lesion's consolidation fraction >= {LOBAR_CONSOLIDATION_MIN}",
        None if dom_cons is None else dom_cons >= LOBAR_CONSOLIDATION_MIN, ["atypical"], ["A1"], "fraction",
    ))
    overlap = _zone_overlap(dom, pf["zones"]) if dom is not None else None
    dom_side = dom.get("side") if dom is not None else None
    confined = None if overlap is None else (overlap >= ZONE_CONFINED_MIN and dom_side in ("right", "left"))
    add(_feature(
        "dominant_lesion_in_one_zone", _r(overlap, 4),
        f"share of the dominant lesion's slice extent inside its zone >= {ZONE_CONFINED_MIN}, and the lesion in one "
        "lung (zones are thirds of the lung height, not lobes)",
        confined, ["atypical"], ["A1"], "fraction",
        None if dom is None else {"zone": dom.get("zone"), "side": dom_side,
                                  "bbox_z": [(dom.get("bbox_start_zyx") or [None])[0],
                                             (dom.get("bbox_stop_zyx") or [None])[0]]},
    ))
    parts = [F["dominant_lesion"]["met"], F["dominant_lesion_consolidation"]["met"],
             F["dominant_lesion_in_one_zone"]["met"], F["unilateral"]["met"],
             None if F["ground_glass"]["met"] is None else not F["ground_glass"]["met"]]
    lobar = False if any(p is False for p in parts) else (None if any(p is None for p in parts) else True)
    add(_feature(
        "lobar_consolidation", lobar,
        "proxy for isolated lobar/segmental consolidation without GGO: dominant_lesion and "
        "dominant_lesion_consolidation and dominant_lesion_in_one_zone and unilateral and not ground_glass",
        lobar, ["atypical"], ["A1"], None,
    ))
    small_rule = (f"listed lesions >= {NODULE_MIN_ML} mL and < {LESION_FLOOR_ML} mL with bounding box <= "
                  f"{NODULE_MAX_MM} mm in-plane and <= {_r(pf['nodule_z_max_mm'], 2)} mm in z")
    small_seen = (f"Only lesions quantify() lists are seen: none below its min_lesion_ml "
                  f"({q.get('min_lesion_ml', 'n/a')} mL)")
    small_typed = all(_f(les.get("ggo_fraction")) is not None for les in pf["compact"])
    add(_feature(
        "small_nodules", n_nodules,
        f"{small_rule}, GGO share < {GGO_DOMINANT_MIN} (solid); met (discrete small nodules) when >= "
        f"{NODULES_MIN_COUNT}. {small_seen}" + ("" if small_typed else "; lesion type not measured: undecided"),
        (n_nodules >= NODULES_MIN_COUNT) if small_typed else None, ["atypical"], ["A2"], "nodules",
        {"ids": [les.get("id") for les in nodules[:50]], "min_lesion_ml_quantify": q.get("min_lesion_ml"),
         "components_below_min_quantify": q.get("lesion_components_below_min")},
    ))
    add(_feature(
        "small_ggo_foci", n_foci,
        f"{small_rule}, GGO share >= {GGO_DOMINANT_MIN}; with no counted lesion, met (very small GGO) when >= 1. "
        + small_seen,
        (not counted and n_foci >= 1), ["indeterminate"], ["I2"], "foci",
        {"ids": [les.get("id") for les in ggo_foci[:50]]},
    ))
    if arr is None or not arr["cavity_measured"]:
        add(_feature("cavity", None, "not measured: needs the lesion mask and the HU volume", None,
                     ["atypical"], ["A3"], "lesions"))
    else:
        n_cav = len(arr["cavities"])
        add(_feature(
            "cavity", n_cav,
            f"counted lesions with consolidation fraction >= {CAVITY_LESION_MIN_CONSOLIDATION} holding (or enclosing "
            f"in 3D) a non-tubular cluster of HU <= {CAVITY_AIR_HU} of >= {CAVITY_MIN_ML} mL; met when >= 1",
            n_cav >= 1, ["atypical"], ["A3"], "lesions", {"lesions": arr["cavities"]},
        ))
    for nm, (cat, rid, why) in _NOT_MEASURED_ALWAYS.items():
        add(_feature(nm, None, why, None, [cat], [rid]))

    # ---- decision
    path: list[str] = []
    category: str | None = None
    rule: str | None = None

    def fire(cat: str, rid: str, text: str) -> None:
        nonlocal category, rule
        category, rule = cat, rid
        path.append(f"{rid} {cat}: {text} -> FIRED")

    def miss(rid: str, cat: str, text: str) -> None:
        path.append(f"{rid} {cat}: {text} -> not met")

    arrays_txt = "lesion mask" + (" + HU" if hu is not None else "") if arr is not None else "q only"
    path.append(f"inputs: abnormal={abnormal!r}; features from {arrays_txt}; "
                f"{n_counted} counted lesion(s) >= {LESION_FLOOR_ML} mL ({pf['total_ml']:.2f} mL), "
                f"{len(pf['small'])} smaller component(s): {n_nodules} small solid nodule(s), {n_foci} small GGO "
                f"focus/foci")
    if abnormal is False:
        fire("negative", "N", "the headline model says not abnormal (abnormal=False); features are listed for reading "
             "but no pattern rule is applied")
    elif abnormal is None and not burden_met:
        fire("negative", "N", f"abnormal=None and lesion burden below the floor: no lesion >= {LESION_FLOOR_ML} mL and "
             f"{n_compact} < {NODULES_MIN_COUNT} small compact components")
    else:
        why = "abnormal=True from the headline model" if abnormal else "abnormal=None, lesion burden above the floor"
        path.append(f"N negative: not applied ({why})")
        # T1 peripheral bilateral GGO
        t1 = [F["bilateral"]["met"], F["peripheral"]["met"], F["ground_glass"]["met"]]
        t1_txt = (f"bilateral {_yes(t1[0])} (less involved lung {_fmt(min_side)} mL vs >= {BILATERAL_MIN_ML}), "
                  f"peripheral {_yes(t1[1])} (PLR {_fmt(plr)} vs >= {PERIPHERAL_PLR_MIN}), "
                  f"ground glass {_yes(t1[2])} (GGO {_fmt(ggo)} vs >= {GGO_PRESENT_MIN})")
        if all(t1):
            fire("typical", "T1", "peripheral, bilateral GGO: " + t1_txt)
        else:
            miss("T1", "typical", "peripheral, bilateral GGO: " + t1_txt)
            rg = F["rounded_ground_glass"]
            t2_txt = (f"multifocal rounded GGO: {rg['value'] if rg['value'] is not None else 'not measured'} rounded "
                      f"GGO-dominant lesion(s) vs >= {ROUNDED_MIN_LESIONS}")
            if rg["met"]:
                fire("typical", "T2", t2_txt)
            else:
                miss("T2", "typical", t2_txt + ("" if rg["met"] is False else " (cannot fire)"))
                miss("T3", "typical", "reverse halo / organising pneumonia: not measured (cannot fire)")
        if category is None:
            # indeterminate
            if counted and F["ground_glass"]["met"]:
                fails = [t for t, ok in ((f"unilateral (share {_fmt(major_share)} in one lung)", t1[0]),
                                         (f"not peripheral (PLR {_fmt(plr)} < {PERIPHERAL_PLR_MIN})", t1[1]))
                         if ok is False]
                desc = "multifocal" if n_counted >= MULTIFOCAL_MIN_LESIONS else "single"
                fire("indeterminate", "I1", f"GGO (share {_fmt(ggo)} >= {GGO_PRESENT_MIN}) without the typical "
                     f"distribution or rounded shape: {desc}, " + (", ".join(fails) or "not rounded"))
            else:
                miss("I1", "indeterminate", "GGO without typical features: " + (
                    "no counted lesion" if not counted else
                    f"ground glass {_yes(F['ground_glass']['met'])} (GGO {_fmt(ggo)} vs >= {GGO_PRESENT_MIN})"))
                i2_txt = (f"very small GGO only: {n_counted} counted lesion(s) (needs 0), {n_foci} small GGO "
                          f"focus/foci (needs >= 1)")
                if F["small_ggo_foci"]["met"]:
                    fire("indeterminate", "I2", i2_txt)
                else:
                    miss("I2", "indeterminate", i2_txt)
        if category is None:
            # atypical
            a1_txt = (f"isolated lobar/segmental consolidation proxy: dominant lesion {_yes(parts[0])} "
                      f"(share {_fmt(dom_share)} vs >= {DOMINANT_SHARE_MIN}), consolidation {_yes(parts[1])} "
                      f"({_fmt(dom_cons)} vs >= {LOBAR_CONSOLIDATION_MIN}), in one zone {_yes(parts[2])} "
                      f"({_fmt(overlap)} of its slices in {dom.get('zone') if dom else None} vs >= "
                      f"{ZONE_CONFINED_MIN}), unilateral {_yes(parts[3])}, no GGO {_yes(parts[4])}")
            if lobar:
                fire("atypical", "A1", a1_txt)
            else:
                miss("A1", "atypical", a1_txt)
                a2_txt = f"discrete small (solid) nodules: {n_nodules} vs >= {NODULES_MIN_COUNT}"
                if F["small_nodules"]["met"]:
                    fire("atypical", "A2", a2_txt)
                else:
                    miss("A2", "atypical", a2_txt + ("" if small_typed else " (lesion type not measured)"))
                    cav = F["cavity"]
                    a3_txt = f"cavitation: {cav['value'] if cav['value'] is not None else 'not measured'}"
                    if cav["met"]:
                        fire("atypical", "A3", a3_txt + " lesion(s) with an air cluster")
                    else:
                        miss("A3", "atypical", a3_txt + ("" if cav["met"] is False else " (cannot fire)"))
                        miss("A4", "atypical", "septal thickening with pleural effusion: not measured (cannot fire)")
        if category is None:
            fire("indeterminate", "I0", "abnormal, but no rule matched the measured pattern (pattern not specific"
                 + ("; lesion type not measured" if not typed else "")
                 + ("; no lesion in the mask" if not pf["all_lesions"] else "") + ")")
    assert category is not None and rule is not None
    path.append(f"=> {LABELS[category]} (rule {rule}); first applicable rule wins, order T1 T2 T3 I1 I2 A1 A2 A3 A4")
    if rule == "I0" and not pf["all_lesions"]:
        caveats.append("the headline model says abnormal but the lesion mask holds no lesion: pattern not described")

    not_measured = [{"name": n, "why": F[n]["rule"]} for n in ("rounded_ground_glass", "cavity")
                    if F[n]["rule"].startswith("not measured")]
    not_measured += [{"name": n, "why": why} for n, (_, _, why) in _NOT_MEASURED_ALWAYS.items()]
    return {
        "name": NAME,
        "category": category,
        "label": LABELS[category],
        "rule": rule,
        "co_rads_equivalent": {
            "co_rads": CO_RADS_EQUIVALENT[category],
            "approximate": True,
            "note": "broad correspondence only (CO-RADS 1 ~ negative, 2 ~ atypical, 3 ~ indeterminate, 4-5 ~ "
            "typical); CO-RADS is a separate scheme with its own criteria and is not computed here",
        },
        "suggested_class": SUGGESTED_CLASS[category],
        "features": [F[n] for n in ordered],
        "decision_path": path,
        "not_measured": not_measured,
        "thresholds": dict(THRESHOLDS),
        "inputs": {"abnormal": abnormal, "lesion_mask": arr is not None, "hu": hu is not None and arr is not None,
                   "lung_labels": lung_labels is not None},
        "caveats": caveats,
        "reference": dict(REFERENCE),
        "note": NOTE,
    }
