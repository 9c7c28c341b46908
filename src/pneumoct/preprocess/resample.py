"""Resampling of CT volumes and label masks to a new voxel spacing or shape.

Grid convention (used by :func:`resample_volume` and :func:`resample_mask`)
--------------------------------------------------------------------------
* Voxel values sit at voxel **centres**. The centre of voxel ``[0, 0, 0]`` stays fixed at ``origin``: new voxel
  ``i`` along an axis lies at ``i * new_spacing`` mm from it, i.e. at source index ``i * new_spacing /
  old_spacing``. Origin and direction are therefore unchanged.
* The number of voxels is ``round(n * old_spacing / new_spacing)`` (at least 1), so the physical extent
  ``n * spacing`` (the field of view, each voxel counted with its full width) is kept to within half a new voxel
  per axis. New centres that fall past the last source centre (at most about half a source voxel) take the
  edge value (``mode="nearest"``), never a fill value.

:func:`zoom_to_shape` is for arrays without physical geometry (2D crops, maps): it uses the pixel-area
convention of image resizing (the outer pixel *edges* of input and output coincide; source coordinate
``(i + 0.5) * n_in / n_out - 0.5``), the same one the lung-crop coordinate mapping uses.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pneumoct.types import SliceInfo, StudyVolume

__all__ = ["resample_volume", "resample_mask", "zoom_to_shape", "resampled_shape", "resize_bilinear"]


def _as_tuple(values: Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) != ndim:
        raise ValueError(f"{name} needs {ndim} values, got {len(vals)}")
    if not all(np.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{name} must be positive numbers, got {vals}")
    return vals


def resampled_shape(
    shape: Sequence[int], src_spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling: ``max(1, round(n * src / target))`` per axis (keeps the physical extent)."""
    src = _as_tuple(src_spacing, len(shape), "src_spacing")
    dst = _as_tuple(target_spacing, len(shape), "target_spacing")
    return tuple(max(1, int(round(int(n) * s / t))) for n, s, t in zip(shape, src, dst))


def _resample_grid(
    array: np.ndarray, scale: Sequence[float], out_shape: Sequence[int], order: int, offset: Sequence[float] | None = None,
    output_dtype: type = np.float32,
) -> np.ndarray:
    """Sample ``array`` at source index ``i * scale + offset`` for every output index ``i`` (separable, fast path)."""
    if offset is None:
        offset = [0.0] * array.ndim
    return ndimage.affine_transform(
        np.asarray(array, dtype=output_dtype) if order > 0 else array,
        np.asarray(scale, dtype=np.float64),  # 1D matrix = diagonal: scipy's zoom/shift fast path
        offset=np.asarray(offset, dtype=np.float64),
        output_shape=tuple(int(s) for s in out_shape),
        order=int(order),
        mode="nearest",
        prefilter=order > 1,
    )


def resample_volume(study: StudyVolume, target_spacing_zyx: Sequence[float], order: int = 1) -> StudyVolume:
    """Resample a study to ``target_spacing_zyx`` (mm); returns a new :class:`StudyVolume`.

    * ``hu``: int16 HU, interpolated with spline ``order`` (1 = trilinear), rounded and clipped to int16.
    * ``spacing``: exactly the target; ``origin`` and ``direction``: unchanged (voxel ``[0,0,0]`` centre fixed,
      see the module docstring for the grid convention).
    * ``slices``: one :class:`SliceInfo` per new z index with ``position_mm`` recomputed from origin, direction
      and the new z spacing; SOP instance UIDs, frame numbers and source names are dropped, since slices no
      longer map 1:1 onto source images.
    * ``metadata``: a deep copy (not shared with the input) plus ``resampled_from_spacing_mm_zyx`` and
      ``resampled_from_shape_zyx``; ``warnings``: a copy of the input's (they describe the input, which is still
      what was read); resampling adds none.
    """
    src_spacing = _as_tuple(study.spacing, 3, "study.spacing")
    dst_spacing = _as_tuple(target_spacing_zyx, 3, "target_spacing_zyx")
    out_shape = resampled_shape(study.hu.shape, src_spacing, dst_spacing)
    scale = [d / s for d, s in zip(dst_spacing, src_spacing)]
    if out_shape == tuple(study.hu.shape) and all(abs(x - 1.0) < 1e-9 for x in scale):
        hu = study.hu.astype(np.int16, copy=True)
    else:
        res = _resample_grid(study.hu, scale, out_shape, order)
        if order > 0:
            res = np.rint(res)
        info = np.iinfo(np.int16)
        hu = np.clip(res, info.min, info.max).astype(np.int16)

    direction = np.asarray(study.direction, dtype=np.float64)
    origin = np.asarray(study.origin, dtype=np.float64)
    z_dir = direction[:, 2]  # LPS direction of the slice axis
    slices = [
        SliceInfo(index=k, position_mm=float(origin[2] + k * dst_spacing[0] * z_dir[2]))
        for k in range(out_shape[0])
    ]
    metadata = copy.deepcopy(study.metadata)
    metadata["resampled_from_spacing_mm_zyx"] = [float(s) for s in src_spacing]
    metadata["resampled_from_shape_zyx"] = [int(s) for s in study.hu.shape]
    return StudyVolume(
        hu=hu,
        spacing=tuple(float(s) for s in dst_spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in study.origin),  # type: ignore[arg-type]
        direction=direction.copy(),
        slices=slices,
        source_format=study.source_format,
        warnings=[copy.copy(w) for w in study.warnings],
        metadata=metadata,
        is_2d_image=study.is_2d_image,
    )


def resample_mask(
    mask: np.ndarray,
    src_spacing: Sequence[float],
    dst_shape: Sequence[int] | None = None,
    *,
    target_spacing: Sequence[float] | None = None,
    order: int = 0,
) -> np.ndarray:
    """Resample a label mask onto a new grid (same convention as :func:`resample_volume`).

    Give ``target_spacing`` (mm; the shape is then :func:`resampled_shape`, exactly as for
    :func:`resample_volume`), or ``dst_shape`` alone (the new spacing is then ``n * src / n_new`` per axis, so the
    extent is kept), or both (that grid exactly: to put a mask on a resampled study's grid, pass
    ``dst_shape=study.shape, target_spacing=study.spacing``). The result has the input's dtype and holds only
    labels present in the input.

    ``order=0`` (default): nearest neighbour. ``order>0``: smoother boundaries — a boolean mask is interpolated
    and thresholded at 0.5; an integer label mask is interpolated one label at a time and each voxel takes the
    label with the highest interpolated membership.
    """
    mask = np.asarray(mask)
    src = _as_tuple(src_spacing, mask.ndim, "src_spacing")
    if dst_shape is None and target_spacing is None:
        raise ValueError("give dst_shape, target_spacing or both")
    if dst_shape is not None:
        out_shape = tuple(int(s) for s in dst_shape)
        if len(out_shape) != mask.ndim or min(out_shape) < 1:
            raise ValueError(f"dst_shape {out_shape} does not fit a {mask.ndim}D mask")
    if target_spacing is not None:
        dst = list(_as_tuple(target_spacing, mask.ndim, "target_spacing"))
        if dst_shape is None:
            out_shape = resampled_shape(mask.shape, src, dst)
    else:
        dst = [n * s / m for n, s, m in zip(mask.shape, src, out_shape)]
    scale = [d / s for d, s in zip(dst, src)]

    if order == 0:
        src_arr = mask.view(np.uint8) if mask.dtype == bool else mask
        out = _resample_grid(src_arr, scale, out_shape, 0, output_dtype=src_arr.dtype)
        return out.astype(mask.dtype, copy=False)
    if mask.dtype == bool:
        return _resample_grid(mask, scale, out_shape, order) >= 0.5
    labels = np.unique(mask)
    best = np.full(out_shape, -np.inf, dtype=np.float32)
    out = np.zeros(out_shape, dtype=mask.dtype)
    for lab in labels:
        memb = _resample_grid(mask == lab, scale, out_shape, order)
        take = memb > best
        out[take] = lab
        best[take] = memb[take]
    return out


def zoom_to_shape(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resize ``array`` to ``shape`` (pixel-area convention: outer pixel edges of input and output coincide).

    ``order=0`` keeps the dtype (labels stay labels); ``order>0`` returns ``float32``. ``shape`` may cover only the
    trailing axes (e.g. ``(224, 224)`` for a ``(Z, Y, X)`` stack resizes every slice).
    """
    arr = np.asarray(array)
    shape = tuple(int(s) for s in shape)
    if len(shape) > arr.ndim or min(shape, default=1) < 1:
        raise ValueError(f"cannot zoom an array of shape {arr.shape} to {shape}")
    full = arr.shape[: arr.ndim - len(shape)] + shape
    if full == arr.shape:
        return arr.copy() if order == 0 else arr.astype(np.float32)
    scale = [n_in / n_out for n_in, n_out in zip(arr.shape, full)]
    offset = [0.5 * s - 0.5 for s in scale]
    if order == 0:
        src_arr = arr.view(np.uint8) if arr.dtype == bool else arr
        out = _resample_grid(src_arr, scale, full, 0, offset=offset, output_dtype=src_arr.dtype)
        return out.astype(arr.dtype, copy=False)
    return _resample_grid(arr, scale, full, order, offset=offset)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two source indices and the weight of the second (pixel-area convention, source
    coordinate ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the first and last centre)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_bilinear(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(K, H, W) maps → (K, h, w) float32, bilinear, the convention of PyTorch's ``interpolate(...,
    mode="bilinear", align_corners=False)`` (values agree to ~1e-5, float32 rounding) and of :func:`zoom_to_shape`
    inside the outer pixel centres. Two separable gathers and blends: ~0.5 ms for a (2, 128, 128) map to
    300 x 280, as fast as PyTorch's kernel and ~4x SciPy's, without importing PyTorch."""
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise ValueError(f"need (K, H, W) maps, got shape {m.shape}")
    h, w = (int(v) for v in shape)
    r0, r1, lr = _bilinear_taps(m.shape[1], h)
    c0, c1, lc = _bilinear_taps(m.shape[2], w)
    rows = m[:, r0]
    rows += lr[:, None] * (m[:, r1] - rows)
    out = rows[:, :, c0]
    out += lc * (rows[:, :, c1] - out)
    return out

