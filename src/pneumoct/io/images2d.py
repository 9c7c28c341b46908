"""2D images (PNG/JPEG/BMP/TIFF): no Hounsfield units, no spacing — only with ``allow_2d=True``.

The result is a ``StudyVolume`` with ``is_2d_image=True``, grey values 0–255 (int16 array), spacing (1, 1, 1),
identity-like geometry, and the warning ``2d_image_no_hu``. A folder of 2D images becomes a stack in natural
file-name order (there is no geometry to sort by), only if all images have the same size.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning, SliceInfo, StudyVolume

logger = logging.getLogger("pneumoct.io")

REFUSAL_MESSAGE = "2D image without Hounsfield units: use a command that works on slices"


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _load_grey(path: Path) -> tuple[np.ndarray, dict[str, Any], list[InputWarning]]:
    from PIL import Image, UnidentifiedImageError

    warnings: list[InputWarning] = []
    try:
        with Image.open(path) as im:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            im.seek(0)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                hi = float(arr.max()) if arr.size else 0.0
                if hi > 255:
                    arr = arr * (255.0 / hi)
                    warnings.append(
                        InputWarning("2d_image_rescaled", f"{mode} image scaled to 0-255 grey levels (max {hi:g})")
                    )
                grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            else:
                if mode in ("P", "PA", "LA", "RGBA"):
                    im = im.convert("RGB") if mode != "LA" else im
                grey = np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise PneumoctInputError("unreadable_file", "could not read the 2D image (damaged or not an image)") from None
    if n_frames > 1:
        warnings.append(
            InputWarning("multipage_image_first_frame", f"the image has {n_frames} pages; only the first is used")
        )
    return grey, {"image_mode": mode, "n_pages": n_frames}, warnings


def _study(arrays: list[np.ndarray], paths: Sequence[Path], extra: list[InputWarning], meta: dict) -> StudyVolume:
    hu = np.ascontiguousarray(np.stack(arrays).astype(np.int16))
    warnings = [
        InputWarning(
            "2d_image_no_hu",
            "2D image without Hounsfield units: values are 0-255 grey levels and the pixel spacing is unknown "
            "(1 mm assumed)",
        )
    ] + extra
    slices = [SliceInfo(index=k, position_mm=-float(k), source=p.name) for k, p in enumerate(paths)]
    fmt = sorted({p.suffix.lower().lstrip(".") for p in paths})
    metadata = {"file_format": ",".join(fmt), "n_images": len(paths), **meta}
    return StudyVolume(
        hu=hu,
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=np.diag([1.0, 1.0, -1.0]),
        slices=slices,
        source_format="image2d",
        warnings=warnings,
        metadata=metadata,
        is_2d_image=True,
    )


def read_image2d(path: Path, *, allow_2d: bool = False) -> StudyVolume:
    if not allow_2d:
        raise PneumoctInputError("2d_image", REFUSAL_MESSAGE)
    grey, meta, warnings = _load_grey(Path(path))
    return _study([grey], [Path(path)], warnings, meta)


def _check_folder(paths: Sequence[Path]) -> list[Path]:
    folders = {p.parent for p in paths}
    if len(folders) > 1:
        raise PneumoctInputError(
            "ambiguous_input", f"2D images in {len(folders)} different sub-folders: point at one folder of slices"
        )
    return sorted(paths, key=_natural_key)


def read_image2d_folder(paths: Sequence[Path], *, allow_2d: bool = False) -> StudyVolume:
    if not allow_2d:
        raise PneumoctInputError("2d_image", "a folder of 2D images: " + REFUSAL_MESSAGE)
    ordered = _check_folder(paths)
    arrays, warnings, modes = [], [], set()
    for p in ordered:
        grey, meta, w = _load_grey(p)
        arrays.append(grey)
        warnings.extend(w)
        modes.add(meta["image_mode"])
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise PneumoctInputError(
            "2d_size_mismatch", f"the 2D images have different sizes ({shown}): read them one at a time"
        )
    if len(ordered) > 1:
        warnings.append(
            InputWarning(
                "2d_stack_order_by_name",
                f"{len(ordered)} 2D images stacked in file-name order (2D images carry no slice position)",
            )
        )
    # collapse repeated per-image warnings to one each
    seen: dict[str, InputWarning] = {}
    for w in warnings:
        seen.setdefault(w.code, w)
    return _study(arrays, ordered, list(seen.values()), {"image_mode": ",".join(sorted(modes))})


def inspect_image2d(paths: Sequence[Path]) -> dict[str, Any]:
    """Header-level description of 2D image input (sizes from the file headers)."""
    from PIL import Image

    info: dict[str, Any] = {
        "input_kind": "file" if len(paths) == 1 else "folder",
        "format": "image2d",
        "n_images": len(paths),
        "chosen_series": None,
        "other_series": [],
        "requires_allow_2d": True,
        "warnings": [
            {"code": "2d_image_no_hu", "message": "2D image without Hounsfield units (read only with allow_2d)"}
        ],
        "refusal": None,
    }
    try:
        ordered = _check_folder(paths) if len(paths) > 1 else list(paths)
        sizes = set()
        for p in ordered:
            try:
                with Image.open(p) as im:
                    sizes.add(tuple(im.size))
            except Exception:
                raise PneumoctInputError("unreadable_file", "could not read a 2D image (damaged or not an image)")
        info["image_sizes_wh"] = sorted(list(s) for s in sizes)
        if len(sizes) > 1:
            info["refusal"] = {
                "code": "2d_size_mismatch",
                "message": "the 2D images have different sizes: read them one at a time",
            }
    except PneumoctInputError as exc:
        info["refusal"] = {"code": exc.code, "message": str(exc)}
    return info
