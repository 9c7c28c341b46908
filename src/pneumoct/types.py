"""Typed records that flow between pipeline stages.

Canonical orientation (every ``StudyVolume.hu`` and every mask derived from it):

* array axes ``(z, y, x)`` = ``(slice, row, column)``;
* slice index 0 is the most **superior** slice, indices run superior → inferior;
* row 0 is **anterior**, rows run anterior → posterior;
* column 0 is the patient's **right**, columns run toward the patient's left, so the patient's left is on the
  image right, as radiologists view axial CT.

Patient coordinates are DICOM LPS (x → patient left, y → posterior, z → superior), in millimetres.
``direction`` holds, as columns, the LPS unit vectors of the array's (x, y, z) = (column, row, slice) axes; for a
plain axial series in canonical orientation it is ``diag(1, 1, -1)``. ``origin`` is the LPS position of voxel
``[0, 0, 0]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Lung mask labels (3D lung masks, ground truth and predictions alike).
LUNG_BACKGROUND, LUNG_RIGHT, LUNG_LEFT = 0, 1, 2
#: Lesion mask labels (multi-class lesion masks).
LESION_BACKGROUND, LESION_GGO, LESION_CONSOLIDATION = 0, 1, 2
#: Patient-level class names, in model output order.
CLASS_NAMES = ("healthy", "covid19", "other_viral", "cap")


@dataclass
class SliceInfo:
    """Identity of one canonical slice, so any per-slice result traces back to a source image.

    ``position_mm`` is the slice's patient z coordinate (LPS, as DICOM ImagePositionPatient[2] gives it).
    ``sop_instance_uid`` and ``frame_number`` (1-based, multi-frame DICOM only) are set for DICOM input.
    ``source`` is the file name (not the path) the slice came from, when there was one per slice.
    ``interpolated`` is True only on a slice the reader inserted to fill a gap of missing slices (linear
    interpolation between its two real neighbours; it has no source image). It stays None on real slices so
    their ``to_dict()`` (and result.json) is unchanged.
    """

    index: int
    position_mm: float
    sop_instance_uid: str | None = None
    frame_number: int | None = None
    source: str | None = None
    interpolated: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def interpolated_slices(study: "StudyVolume") -> np.ndarray:
    """Boolean per z index: True where the slice was inserted by the reader (no source image behind it)."""
    return np.array([bool(s.interpolated) for s in study.slices], dtype=bool)


@dataclass
class InputWarning:
    """A problem found in the input that was handled (the study was still read)."""

    code: str  # machine-readable, e.g. "uneven_spacing"
    message: str  # one human-readable line, no patient identifiers

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class StudyVolume:
    """A CT study in canonical orientation.

    hu: (Z, Y, X) int16 Hounsfield units, canonical orientation (see module docstring).
    spacing: (z, y, x) voxel spacing in mm (z = distance between slice centres along the slice normal).
    origin: LPS position (mm) of voxel [0, 0, 0].
    direction: 3×3, columns are the LPS directions of the x (column), y (row), z (slice) array axes.
    slices: one ``SliceInfo`` per z index, same order as ``hu``.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    slices: list[SliceInfo]
    source_format: str  # "dicom", "dicom-multiframe", "nifti", "nrrd", "mha", "image2d"
    warnings: list[InputWarning] = field(default_factory=list)
    #: Non-identifying metadata kept for the report (study/series UIDs, modality, manufacturer, kernel...).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: True for 2D images without Hounsfield units (PNG/JPG): values are 0–255 grey levels, not HU.
    is_2d_image: bool = False

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"StudyVolume.hu must be 3D (Z, Y, X), got shape {self.hu.shape}")
        if len(self.slices) != self.hu.shape[0]:
            raise ValueError("StudyVolume.slices must have one entry per z index")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(InputWarning(code, message))

    def geometry_dict(self) -> dict[str, Any]:
        return {
            "shape_zyx": list(self.shape),
            "spacing_mm_zyx": [round(float(s), 4) for s in self.spacing],
            "origin_lps_mm": [round(float(o), 3) for o in self.origin],
            "direction": [[round(float(v), 5) for v in row] for row in np.asarray(self.direction)],
            "orientation": "axial; slices superior->inferior; rows anterior->posterior; "
            "columns patient right->left (patient left on image right)",
        }
