"""DICOM reader, stage 4b: resample the checked stack onto a regular orthogonal grid.

* **Gantry tilt**: a tilted acquisition has parallel slice planes, but each slice's ImagePositionPatient is
  displaced within the slice plane relative to the normal through the first slice (the stack is sheared). Each
  slice is shifted in-plane by that displacement (linear interpolation, :data:`.dicom_stack.TILT_FILL_HU` where no
  image data), as dcm2niix does, so voxel [k, i, j] lies at ``reference position + (k - ref)·dz·normal + in-plane
  offsets`` (reference: the middle slice).
* **Missing slices**: each gap announced by :func:`.dicom_stack._spacing_checks` gets its missing slice positions
  back, filled by linear interpolation between the two real slices around it. The caller marks these slices
  (``SliceInfo.interpolated``) so no lesion is measured on them.

Both work in acquisition order (slices sorted along the normal), before the canonical reorientation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .dicom_scan import _Frame
from .dicom_stack import TILT_FILL_HU, _gap_plan, _in_plane_offsets


def shift_tilted_slices(
    pixels: np.ndarray,
    frames: Sequence[_Frame],
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Shift each slice in-plane so the stack is orthogonal along ``normal``.

    The grid hangs from the middle slice (it is not moved; the others move toward it): the largest shift, and so
    the strip of field of view lost at the image edge, is half of what hanging it from an end slice would give.
    Returns the shifted int16 stack and each slice's new position (n, 3): the middle slice's position moved along
    the normal only. Stored pixel (i, j) of slice k lies at ``ipp_k + i·ps_row·col_dir + j·ps_col·row_dir``; with
    ``ipp_k = target_k + a·ps_row·col_dir + b·ps_col·row_dir`` the target pixel (i, j) is the stored pixel
    (i - a, j - b), i.e. ``ndimage.shift(slice, (a, b))``.
    """
    ps_row, ps_col = pixel_spacing
    offsets = _in_plane_offsets(frames, normal, ref=len(frames) // 2)
    shift_rows = offsets @ col_dir / ps_row
    shift_cols = offsets @ row_dir / ps_col
    out = pixels.copy()
    for k in range(pixels.shape[0]):
        if abs(shift_rows[k]) < 1e-3 and abs(shift_cols[k]) < 1e-3:
            continue  # the reference slice (and any slice already in line) is left bit-identical
        moved = ndimage.shift(
            pixels[k].astype(np.float32), (shift_rows[k], shift_cols[k]), order=1, mode="constant",
            cval=float(TILT_FILL_HU),
        )
        out[k] = np.clip(np.rint(moved), -32768, 32767).astype(np.int16)
    ipp = np.array([f.ipp for f in frames], dtype=float)
    return out, ipp - offsets


def fill_gaps(
    pixels: np.ndarray, positions: np.ndarray, proj: np.ndarray, median: float
) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """Insert the missing slice positions of each gap, by linear interpolation between the real slices around it.

    Returns (stack, positions (n, 3), source) where ``source[k]`` is the index of the real slice behind output
    slice k, or None for an inserted slice. Real slices keep their pixels and positions bit for bit.
    """
    missing_after = dict(_gap_plan(proj, median))
    if not missing_after:
        return pixels, positions, list(range(pixels.shape[0]))
    images: list[np.ndarray] = []
    where: list[np.ndarray] = []
    source: list[int | None] = []
    for i in range(pixels.shape[0]):
        images.append(pixels[i])
        where.append(positions[i])
        source.append(i)
        n_missing = missing_after.get(i, 0)
        for j in range(1, n_missing + 1):
            w = j / (n_missing + 1)  # even steps between the two real slices
            blend = (1.0 - w) * pixels[i].astype(np.float32) + w * pixels[i + 1].astype(np.float32)
            images.append(np.rint(blend).astype(np.int16))
            where.append((1.0 - w) * positions[i] + w * positions[i + 1])
            source.append(None)
    return np.stack(images), np.array(where), source
