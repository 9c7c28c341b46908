"""NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) volumes, read with SimpleITK.

A volume file is a full 3D grid with its own geometry, so any orientation (RAS NIfTI, coronal stacks...) is
reoriented to the canonical one with ``sitk.DICOMOrient(image, "LPI")`` (columns → patient left, rows →
posterior, slices → inferior), which gives the direction ``diag(1, 1, -1)`` for an axis-aligned volume.
No header text (NIfTI ``descrip``, NRRD comments) is copied: it may hold patient identifiers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import PneumoctInputError
from ..types import InputWarning, SliceInfo, StudyVolume
from .values import check_hounsfield, suffix_of, to_int16

logger = logging.getLogger("pneumoct.io")

_FORMATS = {
    ".nii": ("nifti", "nifti"),
    ".nii.gz": ("nifti", "nifti"),
    ".nrrd": ("nrrd", "nrrd"),
    ".nhdr": ("nrrd", "nrrd (detached header)"),
    ".mha": ("mha", "mha"),
    ".mhd": ("mha", "mhd"),
}
_AXIS_NAMES = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}


def _format_of(path: Path) -> tuple[str, str]:
    try:
        return _FORMATS[suffix_of(path)]
    except KeyError:
        raise PneumoctInputError("unknown_format", f"not a volume file extension ({suffix_of(path)})") from None


def _orientation_code(direction: tuple[float, ...]) -> str:
    try:
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)
    except Exception:  # pragma: no cover - degenerate direction
        return "???"


def _read_information(path: Path, label: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        # SimpleITK's message holds the full path: do not forward it
        raise PneumoctInputError(
            "unreadable_file", f"could not read the {label} file (damaged, truncated, or its data file is missing)"
        ) from None
    return reader


def _check_layout(size: tuple[int, ...], components: int, label: str, min_slices: int) -> None:
    if components != 1:
        raise PneumoctInputError(
            "unsupported_image", f"the {label} file has {components} values per voxel (colour/vector), not CT"
        )
    if len(size) == 4 and size[3] > 1:
        raise PneumoctInputError(
            "unsupported_image", f"4D {label} volume with {size[3]} time points/volumes: give one 3D volume"
        )
    if len(size) < 3 or len(size) > 4:
        raise PneumoctInputError(
            "too_few_slices", f"the {label} file is {len(size)}D, not a 3D volume (minimum {min_slices} slices)"
        )


def _canonical_shape(size_xyz: tuple[int, ...], direction: tuple[float, ...]) -> tuple[list[int], str, str]:
    """(canonical (z, y, x) shape, original orientation code, original slice-axis name) from header only."""
    from .dicom import canonical_transform

    d = np.asarray(direction, dtype=float).reshape(3, 3)
    vectors = [d[:, 2], d[:, 1], d[:, 0]]  # array axes (z, y, x)
    perm, _ = canonical_transform(vectors)
    shape_zyx = [int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0])]
    code = _orientation_code(tuple(float(v) for v in direction))
    return [shape_zyx[p] for p in perm], code, _AXIS_NAMES.get(code[2:3], "oblique")


def read_volume_file(path: Path, *, min_slices: int = 10) -> StudyVolume:
    """Read a NIfTI/NRRD/MHA/MHD CT volume into canonical orientation (int16 HU)."""
    path = Path(path)
    fmt, label = _format_of(path)
    reader = _read_information(path, label)
    size = tuple(int(s) for s in reader.GetSize())
    _check_layout(size, reader.GetNumberOfComponents(), label, min_slices)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise PneumoctInputError(
            "unreadable_file", f"could not read the {label} voxel data (damaged, truncated, or data file missing)"
        ) from None
    if image.GetDimension() == 4:
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
    study = study_from_image(image, label=label, fmt=fmt, source_name=path.name, min_slices=min_slices)
    return study


def study_from_image(image: sitk.Image, *, label: str = "image", fmt: str = "image", source_name: str = "",
                     min_slices: int = 10) -> StudyVolume:
    """A 3D SimpleITK image in HU (any orientation) -> a canonical :class:`StudyVolume` (int16), with the same checks
    and warnings as a file. ``pneumoct.diagnose`` / ``pneumoct.lung_mask`` take images through this."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PneumoctInputError("bad_image", f"expected a 3D single-channel CT image, got a {image.GetDimension()}D "
                                 f"image with {image.GetNumberOfComponentsPerPixel()} component(s)")
    size = tuple(int(v) for v in image.GetSize())
    warnings: list[InputWarning] = []
    original_code = _orientation_code(image.GetDirection())
    original_axis = _AXIS_NAMES.get(original_code[2:3], "oblique")
    try:
        oriented = sitk.DICOMOrient(image, "LPI")
    except RuntimeError:
        raise PneumoctInputError("unreadable_file", f"the {label} file has an unusable (degenerate) geometry") from None
    values = sitk.GetArrayFromImage(oriented)  # (z, y, x)
    if values.shape[0] < min_slices:
        raise PneumoctInputError(
            "too_few_slices", f"only {values.shape[0]} axial slice(s) after reorientation (minimum {min_slices})"
        )
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            n_bad = int(np.count_nonzero(bad))
            values = np.where(bad, -1024.0, values)
            warnings.append(
                InputWarning("non_finite_values", f"{n_bad} NaN/infinite voxel value(s) replaced by -1024 HU")
            )
    check_hounsfield(values, what=f"the {label} volume")
    hu = np.ascontiguousarray(to_int16(values, warnings))

    if original_axis != "axial":
        warnings.append(
            InputWarning(
                "reoriented_to_axial",
                f"the volume is stored as {original_axis} slices (orientation {original_code}); it was reoriented "
                "to axial slices",
            )
        )
    direction = np.asarray(oriented.GetDirection(), dtype=float).reshape(3, 3)
    oblique = float(np.degrees(np.arccos(min(1.0, abs(float(direction[2, 2]))))))
    if oblique > 1.0:
        warnings.append(
            InputWarning("oblique_slices", f"slices are oblique, {oblique:.1f} degrees from true axial")
        )
    sx, sy, sz = (float(v) for v in oriented.GetSpacing())
    origin = np.asarray(oriented.GetOrigin(), dtype=float)
    slices = [
        SliceInfo(index=k, position_mm=float((origin + k * sz * direction[:, 2])[2]), source=source_name)
        for k in range(hu.shape[0])
    ]
    metadata: dict[str, Any] = {
        "file_format": label,
        "original_orientation": original_code,
        "original_slice_axis": original_axis,
        "original_size_xyz": list(size[:3]),
        "original_pixel_type": image.GetPixelIDTypeAsString(),
        "reoriented": original_code != "LPI",
    }
    study = StudyVolume(
        hu=hu,
        spacing=(sz, sy, sx),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=direction,
        slices=slices,
        source_format=fmt,
        warnings=warnings,
        metadata=metadata,
    )
    for w in warnings:
        logger.info("input warning [%s] %s", w.code, w.message)
    return study


def inspect_volume_file(path: Path, *, min_slices: int = 10) -> dict[str, Any]:
    """Header-only description of a volume file (no voxel data read)."""
    path = Path(path)
    fmt, label = _format_of(path)
    info: dict[str, Any] = {
        "input_kind": "file",
        "format": fmt,
        "file_format": label,
        "chosen_series": None,
        "other_series": [],
        "warnings": [],
        "refusal": None,
    }
    try:
        reader = _read_information(path, label)
        size = tuple(int(s) for s in reader.GetSize())
        _check_layout(size, reader.GetNumberOfComponents(), label, min_slices)
    except PneumoctInputError as exc:
        info["refusal"] = {"code": exc.code, "message": str(exc)}
        return info
    direction = tuple(float(v) for v in reader.GetDirection())
    if len(direction) == 16:  # 4D with one volume: keep the spatial 3x3 block
        d4 = np.asarray(direction).reshape(4, 4)
        direction = tuple(float(v) for v in d4[:3, :3].ravel())
    shape, code, axis = _canonical_shape(size, direction)
    spacing = [float(v) for v in reader.GetSpacing()][:3]
    info["geometry"] = {
        "original_size_xyz": list(size[:3]),
        "original_spacing_xyz_mm": [round(v, 4) for v in spacing],
        "original_orientation": code,
        "canonical_shape_zyx": shape,
        "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    }
    if axis != "axial":
        info["warnings"].append(
            {
                "code": "reoriented_to_axial",
                "message": f"the volume is stored as {axis} slices (orientation {code}); it will be reoriented "
                "to axial slices",
            }
        )
    if shape[0] < min_slices:
        info["refusal"] = {
            "code": "too_few_slices",
            "message": f"only {shape[0]} axial slice(s) after reorientation (minimum {min_slices})",
        }
    return info
