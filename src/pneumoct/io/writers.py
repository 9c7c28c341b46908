"""Writing outputs safely: atomic files and masks in a study's geometry."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from ..types import StudyVolume


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    A crash half-way never leaves a partial file that looks complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix(es) so writers that dispatch on the extension (SimpleITK) still work
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def array_to_image(array: np.ndarray, study: StudyVolume) -> sitk.Image:
    """Wrap a canonical (Z, Y, X) array as a SimpleITK image carrying the study's geometry."""
    if tuple(array.shape) != study.shape:
        raise ValueError(f"array shape {array.shape} does not match study shape {study.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    sz, sy, sx = study.spacing
    image.SetSpacing((float(sx), float(sy), float(sz)))
    image.SetOrigin(tuple(float(o) for o in study.origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(study.direction, dtype=float).ravel()))
    return image


def write_volume(path: str | os.PathLike[str], array: np.ndarray, study: StudyVolume) -> None:
    """Write ``array`` (canonical, same shape as the study) as NIfTI/NRRD/MHA with the study's geometry."""
    image = array_to_image(array, study)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def unique_safe_name(stem: str, used: set[str], default: str) -> str:
    """A file or folder name from ``stem`` with only ``A-Za-z0-9._-`` (``default`` if nothing is left), made unique
    among ``used`` by ``_2``, ``_3`` ... suffixes; the name is added to ``used``."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or default
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name

