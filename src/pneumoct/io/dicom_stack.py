"""DICOM reader, stage 4: checks on the stack of slices of the chosen series — slice positions along the normal,
duplicated positions (identical pixels → drop; different pixels → keep the acquisition with the most slices if a
header field tells them apart, else refuse), gaps, spacing regularity, gantry tilt and oblique slices.

Small gaps (at most MAX_GAP_MISSING_SLICES slices and MAX_GAP_MISSING_MM per gap, at most MAX_MISSING_FRACTION of
the series) and gantry tilt up to MAX_TILT_DEG are announced here and resampled by :mod:`.dicom_resample`; larger
ones are refused (``large_gap`` / ``large_tilt``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning
from .dicom_scan import _SPLIT_KEYS, _float, _Frame

#: Positions closer than this (mm, along the slice normal) are the same slice position.
POSITION_TOLERANCE_MM = 0.01
#: A gap larger than this many median spacings means slices are missing.
GAP_FACTOR = 1.5
#: Spacing is uneven when the regular (non-gap) spacings spread by more than max(0.05 mm, 5 % of the median).
UNEVEN_ABS_MM, UNEVEN_REL = 0.05, 0.05
#: Gantry tilt / oblique thresholds (degrees).
TILT_MIN_DEG, OBLIQUE_MIN_DEG = 0.5, 1.0
#: Gaps are filled by linear interpolation only while they are short. Between two real slices further apart
#: than about 1 cm, structures of the size that matters here (small ground-glass foci, nodules, the lung base)
#: can start and end unseen, and an interpolated stretch would be a guess, not a measurement; on thin-slice studies
#: the slice count binds first (5 x 1 mm is already a run of 5 slices that are all made up).
MAX_GAP_MISSING_SLICES = 4
MAX_GAP_MISSING_MM = 10.0
#: ... and only while they stay a small part of the series: with at most 10 % of the slices interpolated, volumes
#: rest on at least 90 % measured slices, so even a crude fill moves lung volume by a few percent at most.
MAX_MISSING_FRACTION = 0.10
#: Slices sheared by more than this (degrees) are refused rather than resampled. Clinical CT gantries tilt by up
#: to about 30 degrees; a larger apparent shear more likely means broken positions than a tilt, and the in-plane
#: shift (slice count x spacing x tan(tilt)) would push much of the field of view out of the image.
MAX_TILT_DEG = 30.0
#: HU written where an in-plane shift uncovers pixels with no image data: air (the usual CT padding value).
TILT_FILL_HU = -1024


# ---------------------------------------------------------------------------------------------------------------
# 4. stack checks
# ---------------------------------------------------------------------------------------------------------------


def _position_groups(frames: Sequence[_Frame], normal: np.ndarray) -> tuple[list[_Frame], np.ndarray, list[list[int]]]:
    """Sort frames along the normal; return (sorted frames, projections, groups of indices at one position)."""
    proj = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    order = np.argsort(proj, kind="stable")
    frames_sorted = [frames[i] for i in order]
    proj = proj[order]
    groups: list[list[int]] = []
    for i, p in enumerate(proj):
        if groups and p - proj[groups[-1][0]] < POSITION_TOLERANCE_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    return frames_sorted, proj, groups


def _fmt_z(values: Sequence[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:.1f}" for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _gap_plan(proj: np.ndarray, median: float) -> list[tuple[int, int]]:
    """Gaps in the sorted positions ``proj``: (index of the slice before the gap, number of slices missing)."""
    diffs = np.diff(proj)
    return [
        (int(i), max(1, int(round(diffs[i] / median)) - 1)) for i in np.flatnonzero(diffs > GAP_FACTOR * median)
    ]


def _gap_refusal(gaps: list[dict[str, Any]], n_real: int) -> PneumoctInputError | None:
    """The refusal for gaps too large to interpolate, or None (see MAX_GAP_* / MAX_MISSING_FRACTION)."""
    worst = max(gaps, key=lambda g: g["missing_mm"])
    if worst["n_missing"] > MAX_GAP_MISSING_SLICES or worst["missing_mm"] > MAX_GAP_MISSING_MM + 1e-6:
        return PneumoctInputError(
            "large_gap",
            f"{worst['n_missing']} consecutive slice(s) ({worst['missing_mm']:.1f} mm) missing between "
            f"z={worst['upper_z_mm']:.1f} and z={worst['lower_z_mm']:.1f} mm: too large to interpolate (limit "
            f"{MAX_GAP_MISSING_SLICES} slices and {MAX_GAP_MISSING_MM:.0f} mm per gap); export the complete series",
        )
    total = sum(g["n_missing"] for g in gaps)
    if total > MAX_MISSING_FRACTION * (n_real + total):
        return PneumoctInputError(
            "large_gap",
            f"{total} of {n_real + total} slice positions missing in {len(gaps)} gap(s): more than "
            f"{MAX_MISSING_FRACTION:.0%} of the series would be interpolated; export the complete series",
        )
    return None


def _gap_details(frames: Sequence[_Frame], proj: np.ndarray, median: float) -> list[dict[str, Any]]:
    """One record per gap (LPS z of the real slices around it and of the slice positions inserted there)."""
    gaps = []
    for i, n_missing in _gap_plan(proj, median):
        z0, z1 = float(frames[i].ipp[2]), float(frames[i + 1].ipp[2])  # type: ignore[index]
        upper, lower = max(z0, z1), min(z0, z1)
        step = (upper - lower) / (n_missing + 1)
        gaps.append(
            {
                "upper_z_mm": round(upper, 3),
                "lower_z_mm": round(lower, 3),
                "n_missing": n_missing,
                "missing_z_mm": [round(upper - (j + 1) * step, 3) for j in range(n_missing)],
                # extent of anatomy not imaged, along the slice normal: the gap less one regular spacing
                "missing_mm": round(float(proj[i + 1] - proj[i]) / (n_missing + 1) * n_missing, 3),
            }
        )
    gaps.sort(key=lambda g: -g["upper_z_mm"])  # superior first, as the canonical slices run
    return gaps


def _gap_warning(gaps: list[dict[str, Any]], median: float) -> InputWarning:
    def missing_range(g: dict[str, Any]) -> str:
        zs = g["missing_z_mm"]
        return f"z={zs[0]:.1f}" if len(zs) == 1 else f"z={zs[0]:.1f} to {zs[-1]:.1f}"

    where = "; ".join(
        f"{missing_range(g)} mm ({g['n_missing']} missing between z={g['upper_z_mm']:.1f} and "
        f"z={g['lower_z_mm']:.1f} mm)"
        for g in gaps[:5]
    )
    more = f"; and {len(gaps) - 5} more gap(s)" if len(gaps) > 5 else ""
    total = sum(g["n_missing"] for g in gaps)
    return InputWarning(
        "missing_slices",
        f"{total} slice(s) missing in {len(gaps)} gap(s) larger than {GAP_FACTOR}x the median spacing "
        f"{median:.2f} mm: {where}{more}; interpolated linearly from the neighbouring slices, no lesion is "
        "measured on them",
    )


def _in_plane_offsets(frames: Sequence[_Frame], normal: np.ndarray, ref: int = 0) -> np.ndarray:
    """(n, 3): each slice's ImagePositionPatient minus that of slice ``ref``, less its component along the normal —
    the in-plane displacement a gantry tilt puts between the slices (zero for an orthogonal stack)."""
    d = np.array([f.ipp - frames[ref].ipp for f in frames], dtype=float)  # type: ignore[operator]
    return d - np.outer(d @ normal, normal)


def _tilt_checks(
    frames: Sequence[_Frame], proj: np.ndarray, normal: np.ndarray, meta: dict[str, Any]
) -> tuple[list[InputWarning], dict[str, Any]]:
    """Gantry tilt (from sheared positions, or the tag alone) or oblique slices; refuses a tilt above MAX_TILT_DEG."""
    tag = _float(meta.get("gantry_detector_tilt_deg"), 0.0) or 0.0
    offsets = _in_plane_offsets(frames, normal)
    along = float(proj[-1] - proj[0])
    shear = float(np.linalg.norm(offsets[-1]))  # first to last slice
    geom = float(np.degrees(np.arctan2(shear, abs(along)))) if along or shear else 0.0
    if geom > TILT_MIN_DEG:
        if geom > MAX_TILT_DEG:
            raise PneumoctInputError(
                "large_tilt",
                f"slice positions sheared by {geom:.1f} degrees (gantry tilt): above the {MAX_TILT_DEG:.0f} degree "
                "limit pneumoct resamples; export a reconstruction corrected for gantry tilt",
            )
        also = f"; GantryDetectorTilt tag {tag:.1f}" if abs(tag) > 0.01 else ""
        return [
            InputWarning(
                "gantry_tilt",
                f"gantry tilt of {geom:.1f} degrees (slice positions sheared in the slice plane{also}); resampled "
                f"onto an orthogonal grid: each slice shifted in-plane (linear interpolation, {TILT_FILL_HU} HU "
                "where no image data), slice spacing measured along the slice normal",
            )
        ], {"gantry_tilt_deg": round(geom, 2), "gantry_tilt_resampled": True}
    if abs(tag) > 0.01:
        return [
            InputWarning(
                "gantry_tilt",
                f"GantryDetectorTilt tag says {tag:.1f} degrees but the slice positions already lie along the "
                "slice normal (geometry corrected by the scanner): not resampled",
            )
        ], {"gantry_tilt_deg": round(float(tag), 2), "gantry_tilt_resampled": False}
    oblique = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if oblique > OBLIQUE_MIN_DEG:
        return [InputWarning("oblique_slices", f"slices are oblique, {oblique:.1f} degrees from true axial")], {
            "oblique_deg": round(oblique, 2)
        }
    return [], {}


def _spacing_checks(
    frames: Sequence[_Frame], proj: np.ndarray, normal: np.ndarray, meta: dict[str, Any]
) -> tuple[float, list[InputWarning], dict[str, Any]]:
    """Median spacing along the normal, and warnings for gaps, uneven spacing, gantry tilt, oblique slices.

    Raises :class:`PneumoctInputError` ``large_gap`` / ``large_tilt`` for a stack too incomplete or too tilted to
    resample (:mod:`.dicom_resample` does the resampling these checks announce)."""
    warnings: list[InputWarning] = []
    details: dict[str, Any] = {}
    diffs = np.diff(proj)
    if diffs.size == 0:
        thick = _float(meta.get("slice_thickness_mm"), 1.0) or 1.0
        return float(thick), warnings, details
    median = float(np.median(diffs))
    gap_mask = diffs > GAP_FACTOR * median
    if np.any(gap_mask):
        gaps = _gap_details(frames, proj, median)
        refusal = _gap_refusal(gaps, len(frames))
        if refusal is not None:
            raise refusal
        details["missing_slice_gaps"] = gaps
        warnings.append(_gap_warning(gaps, median))
    regular = diffs[~gap_mask]
    if regular.size and float(regular.max() - regular.min()) > max(UNEVEN_ABS_MM, UNEVEN_REL * median):
        details["spacing_min_max_mm"] = [round(float(regular.min()), 4), round(float(regular.max()), 4)]
        warnings.append(
            InputWarning(
                "uneven_spacing",
                f"uneven slice spacing: {regular.min():.3f} to {regular.max():.3f} mm; using the median "
                f"{median:.3f} mm",
            )
        )
    tilt_warnings, tilt_details = _tilt_checks(frames, proj, normal, meta)
    warnings.extend(tilt_warnings)
    details.update(tilt_details)
    return median, warnings, details


def _resolve_duplicates(
    frames: list[_Frame], groups: list[list[int]], pixels: np.ndarray | None
) -> tuple[list[int], list[InputWarning]]:
    """Indices to keep so that each position holds one image. ``pixels`` None → header-only (inspect)."""
    dup_groups = [g for g in groups if len(g) > 1]
    if not dup_groups:
        return [g[0] for g in groups], []
    n_extra = sum(len(g) - 1 for g in dup_groups)
    if pixels is None:
        return [g[0] for g in groups], [
            InputWarning(
                "duplicate_positions",
                f"{len(dup_groups)} slice position(s) hold more than one image ({n_extra} extra); resolved when "
                "the pixels are read (identical → dropped, different acquisitions → the largest is kept)",
            )
        ]
    identical = all(np.array_equal(pixels[g[0]], pixels[j]) for g in dup_groups for j in g[1:])
    if identical:
        return [g[0] for g in groups], [
            InputWarning(
                "duplicate_slices_dropped",
                f"dropped {n_extra} duplicate image(s) with identical pixel data at {len(dup_groups)} position(s)",
            )
        ]
    # different images at one position: two acquisitions/reconstructions mixed in one series?
    position_of = {i: gi for gi, g in enumerate(groups) for i in g}
    for key, keyword in _SPLIT_KEYS:
        values = [str(f.split_values.get(key)) for f in frames]
        if len(set(values)) < 2:
            continue
        subsets: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            subsets.setdefault(v, []).append(i)
        if any(len({position_of[i] for i in idx}) != len(idx) for idx in subsets.values()):
            continue  # this field does not separate the duplicates
        best_value, best = max(subsets.items(), key=lambda kv: (len(kv[1]), -min(kv[1])))
        dropped = len(frames) - len(best)
        return best, [
            InputWarning(
                "mixed_acquisitions",
                f"the series mixes {len(subsets)} acquisitions at the same positions (different {keyword}); kept "
                f"{keyword} {best_value} with {len(best)} slices, dropped {dropped} image(s)",
            )
        ]
    raise PneumoctInputError(
        "conflicting_slices",
        f"{len(dup_groups)} slice position(s) hold different images and no header field tells the acquisitions "
        "apart: export each acquisition as its own series",
    )
