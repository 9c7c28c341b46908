"""Reading chest CT studies into a canonical :class:`~pneumoct.types.StudyVolume`.

Public API::

    read_study(path, *, allow_2d=False, min_slices=10) -> StudyVolume
    inspect_input(path, *, min_slices=10) -> dict

Accepted inputs: a folder of DICOM files (searched recursively, any file names, several series allowed), a ``.zip``
of such a folder, a single multi-frame DICOM file (Enhanced CT or legacy multi-frame), NIfTI (``.nii``,
``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and, only with ``allow_2d=True``, 2D
images (PNG/JPEG/BMP/TIFF) or a folder of them. Everything that is refused raises
:class:`~pneumoct.errors.PneumoctInputError` with a machine code and one line; everything that is handled but
worth knowing is an :class:`~pneumoct.types.InputWarning` in ``study.warnings``. See ``docs/bad_inputs.md``.

No patient identifiers (name, ID, birth date, dates, accession number...) ever go into ``metadata``, warnings,
error messages or logs. File names are kept only in ``SliceInfo.source`` (as the shared types ask); messages
never contain paths.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import PneumoctInputError
from ..types import StudyVolume

logger = logging.getLogger("pneumoct.io")

# ITK/GDCM print their own unattributed messages to stderr; our warnings and errors say what matters, once
import SimpleITK as _sitk  # noqa: E402

_sitk.ProcessObject_SetGlobalWarningDisplay(False)

#: Fewest axial slices a study must have (``read_study(min_slices=...)`` changes it per call).
DEFAULT_MIN_SLICES = 10

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ZIP_SUFFIXES = (".zip",)

# the helpers the format modules share live in values.py (so that they never import this package module)
from .values import check_hounsfield, suffix_of, to_int16  # noqa: E402,F401 - part of this package's API


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _refuse_missing(path: Path) -> None:
    if not path.exists():
        raise PneumoctInputError("not_found", "input path does not exist")


def _kind_of(path: Path) -> str:
    """'folder', 'zip', 'volume', 'image2d' or 'dicom' (refuses unknown files)."""
    _refuse_missing(path)
    if path.is_dir():
        return "folder"
    suffix = suffix_of(path)
    if suffix in ZIP_SUFFIXES:
        return "zip"
    if suffix in VOLUME_SUFFIXES:
        return "volume"
    if suffix in IMAGE2D_SUFFIXES:
        return "image2d"
    if _is_dicom_file(path):
        return "dicom"
    from .dicom import looks_like_raw_dicom

    if looks_like_raw_dicom(path):
        return "dicom"
    if suffix in (".dcm", ".dicom", ".ima"):
        raise PneumoctInputError("not_dicom", "the file has a DICOM extension but is not a readable DICOM file")
    shown = suffix if suffix and len(suffix) <= 12 else "(none)"
    raise PneumoctInputError(
        "unknown_format",
        f"unknown input type (extension {shown}): give a DICOM folder or file, a .zip, NIfTI, NRRD, MHA/MHD "
        "or a 2D image",
    )


# -- public API ----------------------------------------------------------------------------------------------------


def read_study(
    path: str | os.PathLike[str],
    *,
    allow_2d: bool = False,
    min_slices: int = DEFAULT_MIN_SLICES,
) -> StudyVolume:
    """Read a CT study (DICOM folder/file, zip, NIfTI, NRRD, MHA/MHD) into canonical orientation.

    ``allow_2d=True`` also accepts 2D images (PNG/JPEG/...; values 0–255, not HU, ``is_2d_image=True``).
    Raises :class:`PneumoctInputError` for every refused input.
    """
    path = Path(path)
    kind = _kind_of(path)
    if kind == "zip":
        from .archive import extracted_zip

        with extracted_zip(path) as folder:
            study = _read_folder(folder, allow_2d=allow_2d, min_slices=min_slices)
        study.metadata["container"] = "zip"
        return study
    if kind == "folder":
        return _read_folder(path, allow_2d=allow_2d, min_slices=min_slices)
    if kind == "volume":
        from .volume_files import read_volume_file

        return read_volume_file(path, min_slices=min_slices)
    if kind == "image2d":
        from .images2d import read_image2d

        return read_image2d(path, allow_2d=allow_2d)
    from .dicom import read_dicom_files

    return read_dicom_files([path], min_slices=min_slices, single_file=True)


def inspect_input(path: str | os.PathLike[str], *, min_slices: int = DEFAULT_MIN_SLICES) -> dict[str, Any]:
    """Describe what :func:`read_study` would read, without decoding pixels where avoidable.

    Returns a JSON-serialisable dict: ``format``, ``input_kind``, ``chosen_series`` (DICOM), ``other_series``
    (each with ``reason`` why it was not chosen), ``warnings`` (those visible from headers), ``refusal``
    (``{"code", "message"}`` if read_study would refuse because of the content, else ``None``) and, for volume
    files and 2D images, ``geometry``. Inputs that cannot be opened at all (missing path, unknown type, unsafe
    zip) raise :class:`PneumoctInputError` as read_study does.
    """
    path = Path(path)
    kind = _kind_of(path)
    if kind == "zip":
        from .archive import extracted_zip

        with extracted_zip(path) as folder:
            info = _inspect_folder(folder, min_slices=min_slices)
        info["input_kind"] = "zip"
        return info
    if kind == "folder":
        return _inspect_folder(path, min_slices=min_slices)
    if kind == "volume":
        from .volume_files import inspect_volume_file

        return inspect_volume_file(path, min_slices=min_slices)
    if kind == "image2d":
        from .images2d import inspect_image2d

        return inspect_image2d([path])
    from .dicom import inspect_dicom_files

    return inspect_dicom_files([path], min_slices=min_slices, input_kind="file")


# -- folders: DICOM first, then 2D images, then a lone volume file --------------------------------------------------


def _list_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            if p.is_file():
                files.append(p)
    return files


def _split_folder(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(candidate DICOM files, 2D image files, volume files) in a folder tree."""
    dicom_like, images, volumes = [], [], []
    for p in _list_files(folder):
        suffix = suffix_of(p)
        if suffix in IMAGE2D_SUFFIXES:
            images.append(p)
        elif suffix in VOLUME_SUFFIXES:
            volumes.append(p)
        else:
            dicom_like.append(p)
    return dicom_like, images, volumes


def _read_folder(folder: Path, *, allow_2d: bool, min_slices: int) -> StudyVolume:
    from .dicom import read_dicom_files, scan_dicom_files

    dicom_like, images, volumes = _split_folder(folder)
    if not dicom_like and not images and not volumes:
        raise PneumoctInputError("no_dicom", "the folder is empty: no DICOM files found")
    scan = scan_dicom_files(dicom_like, extra_skipped=len(images) + len(volumes))
    if scan.n_images > 0:
        return read_dicom_files(dicom_like, min_slices=min_slices, scan=scan)
    if images:
        from .images2d import read_image2d_folder

        return read_image2d_folder(images, allow_2d=allow_2d)
    if len(volumes) == 1:
        from .volume_files import read_volume_file

        return read_volume_file(volumes[0], min_slices=min_slices)
    if len(volumes) > 1:
        raise PneumoctInputError(
            "ambiguous_input", f"the folder holds {len(volumes)} volume files and no DICOM: give one file"
        )
    raise PneumoctInputError("corrupt_files" if scan.n_unreadable else "no_dicom", scan.no_image_message())


def _inspect_folder(folder: Path, *, min_slices: int) -> dict[str, Any]:
    from .dicom import inspect_dicom_files, scan_dicom_files

    dicom_like, images, volumes = _split_folder(folder)
    if not dicom_like and not images and not volumes:
        return _refusal_info("folder", "no_dicom", "the folder is empty: no DICOM files found")
    scan = scan_dicom_files(dicom_like, extra_skipped=len(images) + len(volumes))
    if scan.n_images > 0:
        return inspect_dicom_files(dicom_like, min_slices=min_slices, scan=scan, input_kind="folder")
    if images:
        from .images2d import inspect_image2d

        return inspect_image2d(images)
    if len(volumes) == 1:
        from .volume_files import inspect_volume_file

        return inspect_volume_file(volumes[0], min_slices=min_slices)
    if len(volumes) > 1:
        return _refusal_info(
            "folder", "ambiguous_input", f"the folder holds {len(volumes)} volume files and no DICOM: give one file"
        )
    return _refusal_info(
        "folder", "corrupt_files" if scan.n_unreadable else "no_dicom", scan.no_image_message()
    )


def _refusal_info(input_kind: str, code: str, message: str) -> dict[str, Any]:
    return {
        "input_kind": input_kind,
        "format": None,
        "chosen_series": None,
        "other_series": [],
        "warnings": [],
        "refusal": {"code": code, "message": message},
    }


__all__ = ["read_study", "inspect_input", "DEFAULT_MIN_SLICES", "check_hounsfield"]
