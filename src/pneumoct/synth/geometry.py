"""Shared numeric helpers (seeded streams, soft masks, JSON-ready values) and the case geometry :class:`_Geom`.

Coordinates follow :mod:`pneumoct.synth.phantom`: patient frame ``(zz, X, Y)`` in mm, canonical image grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------------------- helpers
def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (2**63), *stream])


def _soft(sd: np.ndarray | float, w: float) -> np.ndarray:
    """Fraction inside from a signed distance (negative inside), linear ramp over ``w`` mm (~1 pixel)."""
    return np.clip(0.5 - np.asarray(sd, dtype=np.float32) / np.float32(w), 0.0, 1.0)


def _mix(img: np.ndarray, value: np.ndarray | float, f: np.ndarray) -> None:
    """In place: img <- img + f * (value - img)."""
    img += f * (value - img)


def _sstep(t: np.ndarray | float) -> np.ndarray | float:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _native(x: Any) -> Any:
    """Plain Python (JSON-ready) values: floats rounded to 2 decimals."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_native(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return round(float(x), 2)
    return x


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else v


def _ellipse_sd(dx: np.ndarray, dy: np.ndarray, ax: float, ay: float) -> np.ndarray:
    """Approximate signed distance (mm, radial) to an axis-aligned ellipse; negative inside."""
    q2 = (dx / ax) ** 2 + (dy / ay) ** 2
    r = np.sqrt(dx * dx + dy * dy)
    q = np.sqrt(q2)
    return r - r / np.maximum(q, 1e-6)


@dataclass
class _Geom:
    M: int
    n: int
    ps: float  # in-plane pixel spacing (x and y)
    dz: float  # slice spacing
    fov: float
    zz0: float  # anatomical depth of slice 0's centre
    origin: tuple[float, float, float]
    pad: int
    tx: float  # body centre in the image frame (mm from the image centre)
    ty: float
    cos: float  # patient rotation in the axial plane
    sin: float

    def zz(self, i: int | np.ndarray) -> np.ndarray | float:
        return self.zz0 + np.asarray(i) * self.dz

    # patient (zz, X, Y) -> image (zz, Xi, Yi)
    def to_image(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        zz, X, Y = p[..., 0], p[..., 1], p[..., 2]
        Xi = self.cos * X - self.sin * Y + self.tx
        Yi = self.sin * X + self.cos * Y + self.ty
        return np.stack([zz, Xi, Yi], axis=-1)

    def to_patient_xy(self, Xi: np.ndarray, Yi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = Xi - self.tx, Yi - self.ty
        return self.cos * dx + self.sin * dy, -self.sin * dx + self.cos * dy

    def to_voxel(self, p: np.ndarray) -> np.ndarray:
        """Patient (zz, X, Y) mm -> (slice, row, col) float voxel coordinates."""
        q = self.to_image(p)
        c = (self.M - 1) / 2.0
        return np.stack([(q[..., 0] - self.zz0) / self.dz, q[..., 2] / self.ps + c, q[..., 1] / self.ps + c], -1)

    @property
    def ksub(self) -> int:
        """Sub-slice samples per slice for rasterised structures (partial volume along z)."""
        return 1 if self.dz <= 1.5 * self.ps else int(min(4, max(2, round(self.dz / self.ps))))
