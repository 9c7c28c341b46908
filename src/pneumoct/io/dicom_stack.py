"""DICOM reader, stage 4: checks on the stack of slices of the chosen series — slice positions along the normal,
duplicated positions (identical pixels → drop; different pixels → keep the acquisition with the most slices if a
header field tells them apart, else refuse), gaps, spacing regularity, gantry tilt and oblique slices.
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


def _spacing_checks(
    frames: Sequence[_Frame], proj: np.ndarray, normal: np.ndarray, meta: dict[str, Any]
) -> tuple[float, list[InputWarning], dict[str, Any]]:
    """Median spacing along the normal, and warnings for gaps, uneven spacing, gantry tilt, oblique slices."""
    warnings: list[InputWarning] = []
    details: dict[str, Any] = {}
    diffs = np.diff(proj)
    if diffs.size == 0:
        thick = _float(meta.get("slice_thickness_mm"), 1.0) or 1.0
        return float(thick), warnings, details
    median = float(np.median(diffs))
    gap_mask = diffs > GAP_FACTOR * median
    if np.any(gap_mask):
        gaps = []
        total = 0
        for i in np.flatnonzero(gap_mask):
            n_missing = max(1, int(round(diffs[i] / median)) - 1)
            total += n_missing
            z0, z1 = float(frames[i].ipp[2]), float(frames[i + 1].ipp[2])  # type: ignore[index]
            upper, lower = max(z0, z1), min(z0, z1)
            step = (upper - lower) / (n_missing + 1)
            gaps.append(
                {
                    "upper_z_mm": round(upper, 3),
                    "lower_z_mm": round(lower, 3),
                    "n_missing": n_missing,
                    "missing_z_mm": [round(upper - (j + 1) * step, 3) for j in range(n_missing)],
                }
            )
        gaps.sort(key=lambda g: -g["upper_z_mm"])  # superior first, as the canonical slices run
        details["missing_slice_gaps"] = gaps
        where = "; ".join(
            f"between z={g['upper_z_mm']:.1f} and z={g['lower_z_mm']:.1f} mm ({g['n_missing']} missing, near "
            f"z={_fmt_z(g['missing_z_mm'], 4)})"
            for g in gaps[:5]
        )
        more = f"; and {len(gaps) - 5} more gap(s)" if len(gaps) > 5 else ""
        warnings.append(
            InputWarning(
                "missing_slices",
                f"about {total} slice(s) missing in {len(gaps)} gap(s) larger than {GAP_FACTOR}x the median "
                f"spacing {median:.2f} mm: {where}{more}; not interpolated",
            )
        )
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
    tag = _float(meta.get("gantry_detector_tilt_deg"), 0.0) or 0.0
    disp = frames[-1].ipp - frames[0].ipp  # type: ignore[operator]
    geom = 0.0
    if float(np.linalg.norm(disp)) > 0:
        cosang = abs(float(np.dot(disp, normal))) / float(np.linalg.norm(disp))
        geom = float(np.degrees(np.arccos(min(1.0, cosang))))
    oblique = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if abs(tag) > 0.01 or geom > TILT_MIN_DEG:
        angle = tag if abs(tag) > 0.01 else geom
        how = "GantryDetectorTilt tag" if abs(tag) > 0.01 else "slice positions not along the slice normal"
        details["gantry_tilt_deg"] = round(float(angle), 2)
        warnings.append(
            InputWarning(
                "gantry_tilt",
                f"gantry tilt of {angle:.1f} degrees ({how}); slices kept as acquired (not resampled), "
                "the geometry treats them as an orthogonal stack",
            )
        )
    elif oblique > OBLIQUE_MIN_DEG:
        details["oblique_deg"] = round(oblique, 2)
        warnings.append(
            InputWarning("oblique_slices", f"slices are oblique, {oblique:.1f} degrees from true axial")
        )
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
