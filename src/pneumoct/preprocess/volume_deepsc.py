"""DeepSC-COVID input chain (Wang et al., IEEE TMI 2022, Sec. V-A "Preprocessing"), one recorded chain for
training and inference, and the way back from the model grid to the study grid.

Steps (:func:`prepare`), each recorded by :meth:`PreparedVolume.record`:

1. HU truncated to ``hu_window`` = [-1400, 200] and scaled to [0, 1] (paper: "[-1400 HU, 200 HU]", then [0, 1]);
2. multiplied by the binary lung mask (paper: "masked with the lung binary masks");
3. cropped to the lung bounding box plus ``margin_mm`` (our addition: the paper feeds the whole 512x512 slice; on a
   CPU the few in-plane pixels we can afford are better spent on the lung);
4. resized: in-plane to ``patch[1:]`` (H, W) and, when ``z_spacing_mm`` is set, along z to that slice spacing
   (our addition: phantoms and real studies then have comparable z sampling; ``None`` keeps the slices, as the
   paper). Shrinking uses area averaging, enlarging (bi)linear interpolation; both use the pixel-area convention of
   :func:`pneumoct.preprocess.resample.zoom_to_shape` (outer voxel edges of input and output coincide);
5. segmentation input: the model volume zero-padded at the bottom to a multiple of D and cut into non-overlapping
   D x H x W patches (paper: 24 x 256 x 256; "the 3D segmented patches are aligned as the final result");
6. classification input: N slices spaced equidistantly (DeepSC-COVID Eq. (12)): ``s_k = k * floor(S / N)``,
   k = 0 .. N-1 (0-based; the paper's 48). When S < N the slices are ``round(linspace(0, S - 1, N))`` instead
   (Eq. (12) would repeat slice 0).

Back to the study (canonical (Z, Y, X)): :meth:`PreparedVolume.to_study_grid` crops the padding, resizes the map to
the lung box and places it into a zero volume of the study's shape; :meth:`PreparedVolume.cls_to_model_grid`
first spreads a map on the N sampled slices over all model slices (linear between sampled slices, constant past
the first / last one).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["DeepSCInputSpec", "PreparedVolume", "prepare", "sample_slice_indices", "resize_volume",
           "split_patches", "join_patches"]


@dataclass(frozen=True)
class DeepSCInputSpec:
    """Sizes of the chain. ``patch`` = (D, H, W) of a segmentation patch; H x W is also the in-plane size of the
    classification slices. ``cls_slices`` = N of Eq. (12). Paper: patch (24, 256, 256) on 512 x 512 slices without
    crop, N = 48, no z resampling."""

    patch: tuple[int, int, int] = (16, 96, 96)
    cls_slices: int = 16
    hu_window: tuple[float, float] = (-1400.0, 200.0)
    z_spacing_mm: float | None = 5.0
    crop_to_lungs: bool = True
    margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if len(self.patch) != 3 or min(self.patch) < 1 or self.cls_slices < 1:
            raise ValueError(f"bad DeepSC input sizes: patch {self.patch}, cls_slices {self.cls_slices}")
        if self.hu_window[1] <= self.hu_window[0]:
            raise ValueError(f"bad HU window {self.hu_window}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepSCInputSpec":
        d = dict(d)
        for k in ("patch", "hu_window"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def sample_slice_indices(n_slices: int, n: int) -> np.ndarray:
    """DeepSC-COVID Eq. (12): N equidistant slice indices of a scan of S slices (module docstring)."""
    if n_slices < 1 or n < 1:
        raise ValueError("need at least one slice")
    step = n_slices // n
    if step >= 1:
        return np.arange(n, dtype=np.int64) * step  # Eq. (12): s_k = 1 + (k-1) floor(S/N), here 0-based
    return np.round(np.linspace(0, n_slices - 1, n)).astype(np.int64)


def resize_volume(vol: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(Z, Y, X) float -> ``shape`` float32: in-plane first, then along z; each step by area averaging when it
    shrinks the axes and (bi)linear interpolation when it enlarges them (pixel-area convention)."""
    import torch
    import torch.nn.functional as F

    z, y, x = (int(s) for s in shape)
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))

    def in_plane(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] == (y, x):
            return t
        shrink = y <= t.shape[1] and x <= t.shape[2]
        return F.interpolate(t[:, None], size=(y, x), mode="area" if shrink else "bilinear",
                             **({} if shrink else {"align_corners": False}))[:, 0]

    def along_z(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == z:
            return t
        h, w = t.shape[1:]
        flat = t.reshape(t.shape[0], -1).T[None]  # (1, H*W, Z): one 1D resize along z per pixel
        mode = "area" if z <= t.shape[0] else "linear"
        flat = F.interpolate(flat, size=z, mode=mode, **({} if mode == "area" else {"align_corners": False}))
        return flat[0].T.reshape(z, h, w)

    # the step that enlarges runs last, on the fewest voxels (same result: the two steps are separable)
    if y * x > t.shape[1] * t.shape[2]:
        t = in_plane(along_z(t))
    else:
        t = along_z(in_plane(t))
    return t.contiguous().numpy()


def split_patches(volume: np.ndarray, depth: int) -> np.ndarray:
    """(Z', H, W) with Z' a multiple of ``depth`` -> (P, depth, H, W) non-overlapping patches (a view)."""
    if volume.shape[0] % depth:
        raise ValueError(f"{volume.shape[0]} slices are not a multiple of the patch depth {depth}")
    return volume.reshape(volume.shape[0] // depth, depth, *volume.shape[1:])


def join_patches(patches: np.ndarray) -> np.ndarray:
    """(P, D, H, W) -> (P * D, H, W): the patches "aligned as the final segmentation result"."""
    return patches.reshape(-1, *patches.shape[2:])


@dataclass
class PreparedVolume:
    """A study on the model grid. ``volume``: (Z', H, W) float32 in [0, 1], lung-masked, zero-padded to a multiple
    of D; ``lung``: (Z', H, W) bool; ``n_real``: model slices before the padding; ``box``: (z0, z1, y0, y1, x0, x1)
    of the study grid that was resized; ``cls_index``: (N,) model-grid slices of Eq. (12)."""

    spec: DeepSCInputSpec
    volume: np.ndarray
    lung: np.ndarray
    n_real: int
    box: tuple[int, int, int, int, int, int]
    study_shape: tuple[int, int, int]
    study_spacing: tuple[float, float, float]
    cls_index: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def box_shape(self) -> tuple[int, int, int]:
        z0, z1, y0, y1, x0, x1 = self.box
        return z1 - z0, y1 - y0, x1 - x0

    def patches(self) -> np.ndarray:
        """(P, D, H, W) segmentation inputs."""
        return split_patches(self.volume, self.spec.patch[0])

    def cls_input(self) -> np.ndarray:
        """(N, H, W) classification input (Eq. (12))."""
        return self.volume[self.cls_index]

    def to_model_grid(self, arr: np.ndarray, *, binary: bool = False) -> np.ndarray:
        """A study-grid (Z, Y, X) array (e.g. the voxel lesion truth) -> (Z', H, W) float32 on the model grid
        (``binary``: the resized fraction >= 0.5, as float 0/1)."""
        z0, z1, y0, y1, x0, x1 = self.box
        crop = np.asarray(arr[z0:z1, y0:y1, x0:x1], np.float32)
        out = resize_volume(crop, (self.n_real, *self.spec.patch[1:]))
        if binary:
            out = (out >= 0.5).astype(np.float32)
        pad = self.volume.shape[0] - self.n_real
        return np.pad(out, ((0, pad), (0, 0), (0, 0))) if pad else out

    def slice_labels_to_model(self, labels: np.ndarray) -> np.ndarray:
        """(Z,) 0/1 study slice labels -> (Z',) float32: a model slice is positive when any study slice it covers
        (inside the lung box) is; the padding slices are 0."""
        z0, z1 = self.box[0], self.box[1]
        lab = np.asarray(labels, np.float32)[z0:z1]
        edges = np.linspace(0, lab.size, self.n_real + 1)
        out = np.zeros(self.volume.shape[0], np.float32)
        for k in range(self.n_real):
            a, b = int(np.floor(edges[k])), max(int(np.ceil(edges[k + 1])), int(np.floor(edges[k])) + 1)
            out[k] = float(lab[a:min(b, lab.size)].max()) if a < lab.size else 0.0
        return out

    def cls_to_model_grid(self, arr: np.ndarray) -> np.ndarray:
        """(N, H, W) map on the sampled slices -> (n_real, H, W): linear between sampled slices along z, constant
        before the first and after the last."""
        idx = self.cls_index.astype(np.float64)
        zs = np.arange(self.n_real, dtype=np.float64)
        hi = np.clip(np.searchsorted(idx, zs, side="left"), 0, len(idx) - 1)
        lo = np.clip(hi - 1, 0, len(idx) - 1)
        span = np.where(idx[hi] > idx[lo], idx[hi] - idx[lo], 1.0)
        w = np.clip((zs - idx[lo]) / span, 0.0, 1.0)
        w = np.where(hi == lo, 0.0, w)
        a = np.asarray(arr, np.float32)
        return ((1.0 - w)[:, None, None] * a[lo] + w[:, None, None] * a[hi]).astype(np.float32)

    def to_study_grid(self, arr: np.ndarray) -> np.ndarray:
        """A map on the model grid ((Z', H, W) or (n_real, H, W)) -> (Z, Y, X) float32 on the study grid, zero
        outside the lung box."""
        out = np.zeros(self.study_shape, np.float32)
        z0, z1, y0, y1, x0, x1 = self.box
        out[z0:z1, y0:y1, x0:x1] = resize_volume(np.asarray(arr[: self.n_real], np.float32), self.box_shape)
        return out

    def record(self) -> dict[str, Any]:
        """The chain as run (for result.json / model cards): sizes, box, grid, no image content."""
        s = self.spec
        return {
            "paper": "DeepSC-COVID Sec. V-A (HU [-1400, 200] -> [0, 1], lung-masked, non-overlapping 3D patches, "
                     "Eq. (12) slice sampling)",
            "hu_window": list(s.hu_window), "lung_masked": True, "crop_to_lungs": s.crop_to_lungs,
            "margin_mm": s.margin_mm, "box_zyx": [int(v) for v in self.box],
            "z_spacing_mm": s.z_spacing_mm, "model_grid_zyx": [int(self.n_real), *s.patch[1:]],
            "padded_slices": int(self.volume.shape[0] - self.n_real), "patch_dhw": list(s.patch),
            "n_patches": int(self.volume.shape[0] // s.patch[0]), "cls_slices": int(s.cls_slices),
            "cls_index": [int(i) for i in self.cls_index],
            "timing_s": {k: round(v, 3) for k, v in self.timing.items()},
        }


def _lung_box(lung: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[int, ...]:
    zs, ys, xs = (np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if zs.size == 0:
        return (0, lung.shape[0], 0, lung.shape[1], 0, lung.shape[2])
    box = []
    for idx, n, sp in ((zs, lung.shape[0], spacing[0]), (ys, lung.shape[1], spacing[1]),
                       (xs, lung.shape[2], spacing[2])):
        m = int(np.ceil(margin_mm / max(float(sp), 1e-6)))
        box += [max(0, int(idx[0]) - m), min(n, int(idx[-1]) + 1 + m)]
    return tuple(box)


def prepare(hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float],
            spec: DeepSCInputSpec | None = None) -> PreparedVolume:
    """Run the chain (module docstring) on a canonical (Z, Y, X) HU volume and its lung labels (0 / 1 / 2)."""
    import time

    spec = spec or DeepSCInputSpec()
    t0 = time.perf_counter()
    hu = np.asarray(hu)
    lung_b = np.asarray(lung) > 0
    if hu.shape != lung_b.shape or hu.ndim != 3:
        raise ValueError(f"HU {hu.shape} and lung {lung_b.shape} must be the same (Z, Y, X) shape")
    box = (_lung_box(lung_b, spacing, spec.margin_mm) if spec.crop_to_lungs
           else (0, hu.shape[0], 0, hu.shape[1], 0, hu.shape[2]))
    z0, z1, y0, y1, x0, x1 = box
    lo, hi = spec.hu_window
    # DeepSC-COVID Sec. V-A: truncate to [-1400, 200] HU, scale to [0, 1], mask with the lungs
    crop_l = lung_b[z0:z1, y0:y1, x0:x1]
    vol = (np.clip(hu[z0:z1, y0:y1, x0:x1].astype(np.float32), lo, hi) - lo) / (hi - lo)
    vol *= crop_l
    n_real = (z1 - z0) if spec.z_spacing_mm is None else max(
        1, int(round((z1 - z0) * float(spacing[0]) / float(spec.z_spacing_mm))))
    grid = (n_real, *spec.patch[1:])
    vol = np.clip(resize_volume(vol, grid), 0.0, 1.0)
    lung_m = resize_volume(crop_l.astype(np.float32), grid) >= 0.5
    d = spec.patch[0]
    pad = (-n_real) % d
    if pad:
        vol = np.pad(vol, ((0, pad), (0, 0), (0, 0)))
        lung_m = np.pad(lung_m, ((0, pad), (0, 0), (0, 0)))
    pv = PreparedVolume(spec=spec, volume=vol, lung=lung_m, n_real=n_real, box=tuple(int(v) for v in box),
                        study_shape=tuple(int(s) for s in hu.shape),
                        study_spacing=tuple(float(s) for s in spacing),
                        cls_index=sample_slice_indices(n_real, spec.cls_slices))
    pv.timing["prepare"] = time.perf_counter() - t0
    return pv
