"""Lung coverage: does the scan hold the whole lung, or a slab of it (issue 11, "partial lung coverage")?

A full chest CT starts above the lung apices and ends below the lung bases, so the lung mask tapers to small
cross-sections (or to nothing) before the first and the last slice. A slab of a few centimetres, or a study that
stops above the bases, ends with the lung still at a large cross-section. The rule, per end of the scan:

* for each lung (right, left) found in the mask, the **end fraction** is its area in the end slice (the most
  superior, slice 0, or the most inferior, the last) over its own largest per-slice area;
* that lung is cut at that end when its end fraction is at least :data:`END_FRACTION` (10 %);
* the **study** is cut at that end when every lung found is cut there. Both apices and both bases lie within a few
  centimetres of each other, so a scan that stops above them cuts both lungs; one lung alone reaching the end is
  far more often the lung mask taking gas under the left diaphragm (stomach, colon) for lung than a real cut.

Measured (lung mask of :func:`pneumoct.preprocess.lung_mask.segment_lungs`): the three real full studies
(covid-ct-md P001, cap001, normal001) and full synthetic phantoms have a study end fraction of 0 at both ends (the
largest one-lung value is 0.22: the left mask of cap001 runs 56 mm below the right base, at a plateau area, into
what is likely bowel gas); slabs cut from the real studies score 0.13-0.45 at a top cut 40 mm below the apex and
0.6-1.0 at both ends of a middle slab of 10-30 slices. A cut only 12-18 mm above the base (the lowest, thin
crescents of the costophrenic recesses) scores 0.03-0.08 and is not flagged: the rule sees the lung bases'
taper, not a few missing millimetres (see README, "Partial lung coverage").
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pneumoct.types import LUNG_LEFT, LUNG_RIGHT

__all__ = ["END_FRACTION", "lung_coverage", "coverage_warning", "mark_partial", "WITHHELD_REASON"]

#: a lung is cut at an end of the scan when its area in the end slice is at least this share of its largest
#: cross-section (chosen between 0 for full studies and >= 0.13 for real slabs; module docstring)
END_FRACTION = 0.10
WITHHELD_REASON = "lung not fully scanned: grade not given for unseen lung"
_SIDES = (("right", LUNG_RIGHT), ("left", LUNG_LEFT))


def _r(x: float, nd: int) -> float:
    return float(round(float(x), nd))


def _side(area: np.ndarray, dz: float, end_fraction: float) -> dict[str, Any] | None:
    """One lung's coverage from its per-slice area (None when the lung is absent)."""
    peak = float(area.max())
    if peak <= 0:
        return None
    zs = np.flatnonzero(area > 0)
    top, bottom = float(area[0]) / peak, float(area[-1]) / peak
    return {
        "lung_extent_mm": _r((zs[-1] - zs[0] + 1) * dz, 1),
        "superior_end_fraction": _r(top, 3),
        "inferior_end_fraction": _r(bottom, 3),
        "cut_superior": bool(top >= end_fraction),
        "cut_inferior": bool(bottom >= end_fraction),
    }


def lung_coverage(lung_labels: np.ndarray, spacing: Sequence[float], *,
                  end_fraction: float = END_FRACTION) -> dict[str, Any]:
    """The ``coverage`` block of ``result.json`` from the lung labels (1 right, 2 left; canonical, slice 0
    superior) and the (z, y, x) spacing in mm. A boolean mask counts as one lung ("right")."""
    lab = np.asarray(lung_labels)
    if lab.ndim != 3:
        raise ValueError(f"lung labels must be 3D (Z, Y, X), got shape {lab.shape}")
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    dz = float(spacing[0])
    flat = lab.reshape(lab.shape[0], -1)
    sides = {name: _side(np.count_nonzero(flat == value, axis=1), dz, end_fraction) for name, value in _SIDES}
    found = [s for s in sides.values() if s is not None]
    any_lung = np.flatnonzero((flat > 0).any(axis=1))
    cut_sup = bool(found) and all(s["cut_superior"] for s in found)
    cut_inf = bool(found) and all(s["cut_inferior"] for s in found)
    return {
        "complete": not (cut_sup or cut_inf),
        "cut_superior": cut_sup,
        "cut_inferior": cut_inf,
        "scan_extent_mm": _r(lab.shape[0] * dz, 1),
        "lung_extent_mm": _r((any_lung[-1] - any_lung[0] + 1) * dz, 1) if any_lung.size else 0.0,
        "sides": sides,
        "end_fraction_threshold": end_fraction,
        "rule": "an end of the scan cuts the lung when every lung found holds at least "
                f"{100 * end_fraction:g}% of its largest cross-section in the end slice",
    }


def _cut_text(cov: dict[str, Any]) -> str:
    ends = [w for w, cut in (("top (apices)", cov["cut_superior"]), ("bottom (bases)", cov["cut_inferior"])) if cut]
    return " and ".join(ends)


def coverage_warning(cov: dict[str, Any]) -> dict[str, str] | None:
    """The ``partial_coverage`` input warning (one line), or None for a complete study."""
    if cov["complete"]:
        return None
    return {"code": "partial_coverage",
            "message": f"partial lung coverage: the scan covers {cov['scan_extent_mm']:g} mm, lung seen over "
                       f"{cov['lung_extent_mm']:g} mm, cut at the {_cut_text(cov)}; volumes and percentages are of "
                       "the scanned lung only and no CT grade is given"}


def mark_partial(q: dict[str, Any], cov: dict[str, Any]) -> dict[str, Any]:
    """Mark a :func:`~pneumoct.quantify.quantify` result of a partly scanned lung (in place; returned).

    Volumes and percentages stay (they are true of the scanned lung) but are marked ``partial``; the MosMed grade
    and the zone-score total are withheld (None, with ``withheld_reason``): both are defined on the whole lung.
    Zones are thirds of each lung's seen extent, so a cut lung's zones are not its real thirds: their scores are
    withheld too; a lung that is itself fully inside the scan keeps its zone scores."""
    if cov["complete"]:
        return q
    note = (f"lung not fully scanned (cut at the {_cut_text(cov)}; scan {cov['scan_extent_mm']:g} mm): volumes and "
            "percentages are of the scanned lung only")
    q["partial"] = True
    q["partial_note"] = note
    q["partial_measurements"] = ["lung_volume_ml", "lesion_volume_ml", "lesion_volume_in_lung_ml",
                                 "lesion_volume_ratio", "percent_lung_involved", "severity.percent_lung_involved",
                                 "zones_not_lobes"]
    for key in ("lung_volume_ml", "lesion_volume_in_lung_ml"):
        if isinstance(q.get(key), dict):
            q[key]["partial"] = True
    cut_sides = {name for name, s in (cov.get("sides") or {}).items()
                 if s is None or s["cut_superior"] or s["cut_inferior"]}
    sev = q["severity"]
    for name, zone in (q.get("zones_not_lobes") or {}).items():
        zone["partial"] = True
        if name.split("_")[0] in cut_sides:
            zone["ctss"] = None
            sev["ctss_per_zone"][name] = None
    sev.update({"partial": True, "mosmed_level": None, "mosmed_grade": None, "mosmed_description": None,
                "ctss_zones_total": None, "withheld_reason": WITHHELD_REASON})
    q.setdefault("notes", []).append(note + "; " + WITHHELD_REASON)
    return q
