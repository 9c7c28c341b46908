"""Dual-sampling attention network input: one recorded, invertible chain from a study to the network grid.

Dual-sampling paper Sec. IV-B: (1) resample CT and masks to 0.7168 x 0.7168 x 1.25 mm (x, y, z); (2) shrink by
one common factor in all three axes (the paper: about 2) and pad zeros to a fixed size (138 x 256 x 256);
(3) truncate to the window [-1350, 150] HU and (4) normalise to [0, 1]. Sec. III: the input is the CT masked to
the lungs. Steps (1) and (2) are done as one resampling to ``factor * (1.25, 0.7168, 0.7168)`` mm (the same grid,
without a full-resolution intermediate volume). The factor is the configured one unless the volume would not fit
the fixed size, then the smallest that fits (recorded), so nothing is ever cropped away.

    x, lesion, rec = prepare_volume(hu, spacing, lung, DualPrepConfig(size=(64, 96, 96)), lesion=truth)
    att_study = to_study_grid(att_net, rec)       # (Z, Y, X) on the study grid, canonical

Arrays are canonical (Z, Y, X) = (slice, row, column). ``crop_to_lungs`` (not in the paper; the CPU setting uses
it) first crops the study to the lungs' bounding box (+ margin), so the few CPU voxels are spent on the lungs.
Shrinking uses area averaging (anti-aliased), growing trilinear interpolation, both with the pixel-area
convention (outer voxel edges coincide), so :func:`to_study_grid` inverts the grid exactly by the same convention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PneumoctInputError

__all__ = ["PAPER_SPACING_ZYX", "PAPER_WINDOW", "DualPrepConfig", "PrepRecord", "prepare_volume", "to_study_grid",
           "resize_area"]

#: Sec. IV-B resampling target, (z, y, x) mm
PAPER_SPACING_ZYX = (1.25, 0.7168, 0.7168)
#: Sec. IV-B window (level -600, width 1500) -> [-1350, 150] HU
PAPER_WINDOW = (-1350.0, 150.0)


@dataclass
class DualPrepConfig:
    """size: fixed network grid (Z, Y, X) (paper 138 x 256 x 256); factor: common shrink factor after resampling
    (paper ~2); crop_to_lungs / margin_mm: optional lung bounding-box crop first (CPU setting)."""

    size: tuple[int, int, int] = (138, 256, 256)
    factor: float = 2.0
    spacing_zyx: tuple[float, float, float] = PAPER_SPACING_ZYX
    window: tuple[float, float] = PAPER_WINDOW
    crop_to_lungs: bool = False
    margin_mm: float = 10.0

    @classmethod
    def from_dict(cls, d: dict) -> "DualPrepConfig":
        d = dict(d)
        for k in ("size", "spacing_zyx", "window"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class PrepRecord:
    """Everything needed to map a network-grid array back onto the study grid."""

    study_shape: tuple[int, int, int]
    box: tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 of the (cropped) region, study voxels
    factor: float  # the common shrink factor used (>= the configured one)
    spacing_zyx: tuple[float, float, float]  # network voxel size, mm
    shape: tuple[int, int, int]  # resampled region before padding
    offset: tuple[int, int, int]  # where that region starts in the padded network grid
    size: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def resize_area(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *shape): area average on shrinking axes (no aliasing when shrinking by 5x), trilinear
    on growing ones; both keep the outer voxel edges fixed, so resizing back inverts the geometry."""
    src = tuple(x.shape[2:])
    if src == tuple(shape):
        return x
    mid = tuple(min(a, b) for a, b in zip(src, shape))
    if mid != src:
        x = F.adaptive_avg_pool3d(x, mid)
    if mid != tuple(shape):
        x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    return x


def _lung_box(lung: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> tuple[int, ...]:
    nz = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(v.size == 0 for v in nz):
        raise PneumoctInputError("no_lungs", "no lung voxels: the dual-sampling network needs lung-masked input")
    box = []
    for ax, v in enumerate(nz):
        m = int(np.ceil(margin_mm / spacing[ax]))
        box += [max(0, int(v[0]) - m), min(lung.shape[ax], int(v[-1]) + 1 + m)]
    return tuple(box)


def prepare_volume(hu: np.ndarray, spacing, lung: np.ndarray, cfg: DualPrepConfig, *,
                   lesion: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, PrepRecord]:
    """Study (Z, Y, X) HU + lung labels -> network input (Z', Y', X') float32 in [0, 1], zero outside the lungs
    and in the padding, with Z'Y'X' = ``cfg.size``. ``lesion`` (voxel truth, >0 lesion) comes out on the same grid
    as the lesion fraction per network voxel in [0, 1] (the target M of Eq. 3, partial volume kept). Returns
    ``(x, lesion_or_None, record)``."""
    hu = np.asarray(hu)
    lung = np.asarray(lung)
    if hu.ndim != 3 or lung.shape != hu.shape:
        raise PneumoctInputError("bad_input", f"need a 3D study and a lung mask of its shape, got {hu.shape} "
                                 f"and {lung.shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise PneumoctInputError("bad_input", f"voxel spacing must be three positive numbers, got {spacing}")
    if cfg.crop_to_lungs:
        box = _lung_box(lung > 0, sp, cfg.margin_mm)
    else:
        if not (lung > 0).any():
            raise PneumoctInputError("no_lungs", "no lung voxels: the dual-sampling network needs lung-masked input")
        box = (0, hu.shape[0], 0, hu.shape[1], 0, hu.shape[2])
    z0, z1, y0, y1, x0, x1 = box
    extent = np.array([(z1 - z0) * sp[0], (y1 - y0) * sp[1], (x1 - x0) * sp[2]])
    base = np.asarray(cfg.spacing_zyx, float)
    size = np.asarray(cfg.size, int)
    # the smallest common factor at which the region fits the fixed grid; the configured one when larger
    need = float(np.max(extent / (base * size)))
    factor = max(float(cfg.factor), need * (1 + 1e-6))
    shape = tuple(int(v) for v in np.clip(np.round(extent / (base * factor)), 1, size))
    lo, hi = cfg.window
    region = torch.from_numpy(np.ascontiguousarray(hu[z0:z1, y0:y1, x0:x1])).float()
    # Sec. IV-B steps 3-4 before resampling (window then [0, 1]); Sec. III lung masking: outside = 0
    region = ((region.clamp_(lo, hi) - lo) / (hi - lo))
    mask = torch.from_numpy(np.ascontiguousarray(lung[z0:z1, y0:y1, x0:x1] > 0)).float()
    region.mul_(mask)
    stack = [region, mask]
    if lesion is not None:
        stack.append(torch.from_numpy(np.ascontiguousarray(
            (np.asarray(lesion)[z0:z1, y0:y1, x0:x1] > 0) & (lung[z0:z1, y0:y1, x0:x1] > 0))).float())
    small = resize_area(torch.stack(stack)[None], shape)[0]
    # area averaging dilutes the lung border with zeros; dividing by the lung fraction restores the lung HU there
    img = torch.where(small[1] > 1e-3, small[0] / small[1].clamp_min(1e-3), torch.zeros(()))
    img = img * (small[1] >= 0.5)
    offset = tuple(int((s - n) // 2) for s, n in zip(size, shape))
    sl = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    x = np.zeros(tuple(size), np.float32)
    x[sl] = img.clamp_(0, 1).numpy()
    les = None
    if lesion is not None:
        les = np.zeros(tuple(size), np.float32)
        les[sl] = small[2].clamp_(0, 1).numpy()
    rec = PrepRecord(study_shape=tuple(int(s) for s in hu.shape), box=tuple(int(b) for b in box), factor=factor,
                     spacing_zyx=tuple(float(v) for v in base * factor), shape=shape, offset=offset,
                     size=tuple(int(s) for s in size))
    return x, les, rec


def to_study_grid(arr: np.ndarray | torch.Tensor, rec: PrepRecord) -> np.ndarray:
    """Network-grid array (Z', Y', X') -> study grid (Z, Y, X) float32: remove the padding, resize back to the
    cropped region (trilinear, same voxel-edge convention), zero outside the region."""
    t = torch.as_tensor(np.asarray(arr, np.float32) if not torch.is_tensor(arr) else arr).float()
    if tuple(t.shape) != tuple(rec.size):
        raise ValueError(f"map shape {tuple(t.shape)} is not the network grid {rec.size}")
    sl = tuple(slice(o, o + n) for o, n in zip(rec.offset, rec.shape))
    z0, z1, y0, y1, x0, x1 = rec.box
    back = F.interpolate(t[sl][None, None], size=(z1 - z0, y1 - y0, x1 - x0), mode="trilinear",
                         align_corners=False)[0, 0]
    out = np.zeros(rec.study_shape, np.float32)
    out[z0:z1, y0:y1, x0:x1] = back.numpy()
    return out
