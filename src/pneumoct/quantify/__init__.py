"""Lesion quantification and the threshold lesion baseline.

* :func:`find_lesions_threshold` — HU-threshold ground-glass / consolidation finder with vessel and airway-wall
  suppression (``method = "threshold-baseline"``), returning a :class:`LesionFinding`.
* :func:`quantify` — volumes, lesion volume ratio, count, per-lesion size/position/side/HU, peripheral lesion ratio
  (DeepSC-COVID Eq. (1)), spread of lesion centres, bilateral involvement, zone involvement (thirds of each lung's
  craniocaudal extent, not lobes), MosMedData CT-0…CT-4 grade and a zone-based CT severity score. "Lesion" is
  in-lung lesion in components of at least ``DEFAULT_MIN_LESION_ML``; below the study noise floor
  (``NOISE_FLOOR_ML`` / ``NOISE_FLOOR_PERCENT``) the grade is CT-0 with CTSS 0, and a zone scores only above the zone
  floor (``ZONE_FLOOR_ML`` / ``ZONE_FLOOR_PERCENT``). The floors are this project's choice.
* :func:`lung_coverage` — is the whole lung in the scan (``pneumoct.quantify.coverage``)? When it is not, ``quantify``
  marks its measures partial and withholds the whole-lung grades.

Definitions and conventions: ``docs/quantification.md``.
"""
from pneumoct.quantify.coverage import lung_coverage
from pneumoct.quantify.measures import (
    DEFAULT_MIN_LESION_ML,
    MOSMED_GRADES,
    NOISE_FLOOR_ML,
    NOISE_FLOOR_PERCENT,
    ZONE_FLOOR_ML,
    ZONE_FLOOR_PERCENT,
    ZONE_NAMES,
    ctss_band,
    label_lesions,
    lesion_probability_from_area,
    mosmed_grade,
    per_slice_lesion_area_mm2,
    peripheral_band_slice,
    quantify,
    zone_slices,
)
from pneumoct.quantify.threshold_baseline import METHOD as THRESHOLD_METHOD
from pneumoct.quantify.threshold_baseline import LesionFinding, find_lesions_threshold, inplane_disk

__all__ = [
    "LesionFinding",
    "find_lesions_threshold",
    "inplane_disk",
    "THRESHOLD_METHOD",
    "quantify",
    "lung_coverage",
    "label_lesions",
    "per_slice_lesion_area_mm2",
    "lesion_probability_from_area",
    "mosmed_grade",
    "ctss_band",
    "zone_slices",
    "peripheral_band_slice",
    "ZONE_NAMES",
    "MOSMED_GRADES",
    "DEFAULT_MIN_LESION_ML",
    "NOISE_FLOOR_ML",
    "NOISE_FLOOR_PERCENT",
    "ZONE_FLOOR_ML",
    "ZONE_FLOOR_PERCENT",
]
