"""Seeded synthetic chest-CT phantoms with voxel ground truth (anatomy + class-specific lesions).

Everything is built in millimetres in a *patient frame*: ``X`` toward the patient's left, ``Y`` posterior,
``zz`` inferior (depth below the top of the anatomical chest), origin at the body centre. The patient frame is
rotated by a few degrees and shifted inside the image (patients never lie perfectly straight), then sampled on
the canonical grid of :mod:`pneumoct.types` (slice 0 superior, row 0 anterior, column 0 patient right).

Work is organised so that a 512 x 512 x 500 volume stays well under 3 GB and a 512 x 512 x 300 one generates in
seconds: the trunk anatomy is analytic and evaluated slice by slice on 2D coordinate grids; tubes (aorta, great
vessels, airway and vessel trees) and lesions are rasterised on bounded sub-blocks, with sub-slice sampling in
z so that thick slices get realistic partial volume. See ``docs/phantoms.md`` for the model and its gaps.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage as ndi

from ..types import (
    CLASS_NAMES,
    LESION_CONSOLIDATION,
    LESION_GGO,
    LUNG_LEFT,
    LUNG_RIGHT,
    SliceInfo,
    StudyVolume,
)

GENERATOR_VERSION = "pneumoct.synth 1.0"
DATA_SOURCE = "synthetic phantom (pneumoct.synth)"

#: slice spacings (mm) a drawn geometry picks from, with their weights (thin reconstructions are most common)
_SPACINGS = np.array([0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0])
_SPACING_P = np.array([0.06, 0.08, 0.18, 0.14, 0.10, 0.10, 0.08, 0.10, 0.16])
#: (lower, upper) of the chest length a scan covers, mm
_CHEST_LENGTH_MM = (255.0, 330.0)
HU_MIN, HU_MAX = -1024, 3071


# ----------------------------------------------------------------------------------------------------- public API
@dataclass
class PhantomConfig:
    """What to generate. ``None`` fields are drawn from ``seed`` (see ``Phantom.config`` for the resolved values).

    label: one of ``pneumoct.types.CLASS_NAMES``.
    matrix: in-plane pixels (square); real CT is 512.
    n_slices: slice count; None -> drawn so that the slices cover a chest (~255-330 mm), within [24, 500].
    slice_spacing_mm: None -> drawn from 0.625-5 mm (or chest length / n_slices when n_slices is given).
    pixel_spacing_mm: None -> a field of view of 320-420 mm over ``matrix`` pixels.
    difficulty: 0..1; 1 = smaller, fewer lesions whose density is closer to aerated lung.
    noise_hu: standard deviation of the (kernel-correlated) image noise in HU.
    pad_hu: value outside the reconstruction circle; None -> drawn, -2048 (70 %) or -3024 (30 %). A value of
        -1024 or more makes the DICOM series store unsigned pixels.
    """

    label: str
    seed: int = 0
    matrix: int = 256
    n_slices: int | None = None
    slice_spacing_mm: float | None = None
    pixel_spacing_mm: float | None = None
    difficulty: float = 0.0
    noise_hu: float = 15.0
    pad_hu: int | None = None

    def __post_init__(self) -> None:
        if self.label not in CLASS_NAMES:
            raise ValueError(f"label must be one of {CLASS_NAMES}, got {self.label!r}")
        if int(self.matrix) < 32:
            raise ValueError("matrix must be at least 32")
        if self.n_slices is not None and int(self.n_slices) < 1:
            raise ValueError("n_slices must be positive")
        for name in ("slice_spacing_mm", "pixel_spacing_mm"):
            v = getattr(self, name)
            if v is not None and not (float(v) > 0):
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= float(self.difficulty) <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        if float(self.noise_hu) < 0:
            raise ValueError("noise_hu must be >= 0")
        if self.pad_hu is not None and not -3024 <= int(self.pad_hu) <= -1000:
            raise ValueError("pad_hu must be within [-3024, -1000]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Phantom:
    """A generated case. Arrays are canonical (Z, Y, X), same shape as ``study.hu``."""

    study: StudyVolume
    lung_mask: np.ndarray  # uint8: 0 background, 1 right lung (image left), 2 left lung
    lesion_mask: np.ndarray  # uint8: 0 none, 1 ground-glass, 2 consolidation; always inside the lung mask
    label: str
    slice_lesion_labels: np.ndarray  # bool (Z,)
    lesion_volume_ratio: float
    lesions: list[dict]
    config: PhantomConfig  # resolved: every drawn geometry field filled in
    #: landmarks (slice indices, mm) and drawn patient parameters, for reports and tests
    anatomy: dict[str, Any] = field(default_factory=dict)

    @property
    def lung_volume_ml(self) -> float:
        return float((self.lung_mask > 0).sum()) * self.study.voxel_volume_ml


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


def _resolve_geometry(cfg: PhantomConfig) -> tuple[_Geom, dict[str, Any]]:
    g = _rng(cfg.seed, 1)
    chest_len = g.uniform(*_CHEST_LENGTH_MM)
    dz_draw = float(g.choice(_SPACINGS, p=_SPACING_P / _SPACING_P.sum()))
    fov_draw = g.uniform(320.0, 420.0)
    pad_draw = int(g.choice([-2048, -3024], p=[0.7, 0.3]))
    z_origin = round(g.uniform(-260.0, 60.0), 1)
    off_x, off_y = g.uniform(-6, 6), g.uniform(-28, 2)
    rot = math.radians(g.uniform(-4.0, 4.0))
    partial_pos = g.uniform(0.45, 0.6)

    M = int(cfg.matrix)
    if cfg.n_slices is not None and cfg.slice_spacing_mm is not None:
        n, dz = int(cfg.n_slices), float(cfg.slice_spacing_mm)
    elif cfg.n_slices is not None:
        n = int(cfg.n_slices)
        dz = round(chest_len / n, 3)
    elif cfg.slice_spacing_mm is not None:
        dz = float(cfg.slice_spacing_mm)
        n = int(np.clip(round(chest_len / dz), 24, 500))
    else:
        dz = dz_draw
        n = int(np.clip(round(chest_len / dz), 24, 500))
    if cfg.pixel_spacing_mm is not None:
        ps = float(cfg.pixel_spacing_mm)
    else:
        ps = round(fov_draw / M, 4)
    fov = ps * M
    if fov < 200.0:
        raise ValueError(f"field of view {fov:.0f} mm (matrix x pixel spacing) is too small for a chest; "
                         "use at least 200 mm")
    pad = int(cfg.pad_hu) if cfg.pad_hu is not None else pad_draw
    coverage = n * dz
    if coverage >= 0.85 * chest_len:
        chest_len = min(coverage, 340.0)
        zz0 = -(coverage - chest_len) / 2.0 + dz / 2.0
    else:  # a partial scan: a slab of the chest around the lower-middle lung
        zz0 = float(np.clip(partial_pos * chest_len - coverage / 2.0, 0.0, chest_len - coverage)) + dz / 2.0
    c = (M - 1) / 2.0
    origin = (round(-c * ps + g.uniform(-3, 3), 3), round(-c * ps + g.uniform(-3, 3) + 10.0, 3), z_origin)
    geom = _Geom(M=M, n=n, ps=ps, dz=dz, fov=fov, zz0=zz0, origin=origin, pad=pad, tx=off_x, ty=off_y,
                 cos=math.cos(rot), sin=math.sin(rot))
    return geom, {"chest_length_mm": chest_len, "rotation_deg": round(math.degrees(rot), 2)}


# ------------------------------------------------------------------------------------------------------- anatomy
class _Anatomy:
    """Drawn patient parameters and per-slice (zz-dependent) geometry, all in the patient frame (mm)."""

    def __init__(self, rng: np.random.Generator, geom: _Geom, chest_len: float):
        u = rng.uniform
        self.L = L = chest_len
        s = u(0.88, 1.12)
        a_body = 162.0 * s * u(0.94, 1.06)
        k = min(1.0, 0.45 * geom.fov / a_body)  # a small field of view gets a smaller patient
        s *= k
        self.s = s
        self.a_body = a_body * k
        self.b_body = 110.0 * s * u(0.9, 1.08)
        self.post_ratio = u(1.0, 1.07)
        self.skin = 1.6
        self.fat_lat = u(4.0, 22.0) * s
        self.fat_ant = self.fat_lat * u(0.45, 0.85)
        self.fat_post = self.fat_lat * u(0.5, 0.8)
        self.mus_lat = u(6.0, 11.0) * s
        self.mus_ant = u(9.0, 18.0) * s
        self.mus_post = u(8.0, 13.0) * s
        self.wall = u(9.0, 12.0) * s ** 0.5

        # landmarks along zz
        self.zz_apex = u(12.0, 28.0) * L / 290.0
        self.zz_rec = L - u(8.0, 20.0)
        self.H = H = self.zz_rec - self.zz_apex
        self.zz_domeR = self.zz_apex + H * u(0.62, 0.70)
        self.zz_domeL = self.zz_domeR + u(8.0, 20.0)
        self.zz_carina = self.zz_apex + H * u(0.27, 0.33)
        self.zz_full = self.zz_apex + u(45.0, 65.0)
        self.zz_T1 = self.zz_apex - u(4.0, 16.0)
        self.vh = (self.zz_rec + 15.0 - self.zz_T1) / 12.0  # vertebral level height

        # spine
        self.vb_off = u(13.0, 21.0)
        self.kyph = u(3.0, 9.0)
        self.r_can = 7.0 * s ** 0.5
        self.hu_cancellous = u(190.0, 300.0)
        self.hu_cortical = u(700.0, 1000.0)

        # heart (rotated ellipsoid with a flat base on the diaphragm)
        self.hC = u(52.0, 62.0) * s
        self.hA = u(56.0, 68.0) * s
        self.hB = u(40.0, 47.0) * s
        self.h_ang = math.radians(u(25.0, 42.0))
        self.hX = u(14.0, 26.0) * s
        self.zz_h = self.zz_domeL - 0.62 * self.hC
        self.h_pf = u(3.0, 7.0)  # pericardial fat
        self.h_base = 0.5 * (self.zz_domeR + self.zz_domeL) + 10.0
        zz_h = self.zz_h
        ex = math.hypot(self.hA * math.cos(self.h_ang), self.hB * math.sin(self.h_ang))
        ey = math.hypot(self.hA * math.sin(self.h_ang), self.hB * math.cos(self.h_ang))
        front = -self.b_cav_ant(zz_h)
        back_limit = self.Y_vb(zz_h) - self.ry_vb(zz_h) - 16.0
        if front + 2 * ey + 3.0 > back_limit:  # heart too deep for this chest: shrink it
            f = (back_limit - front - 3.0) / (2 * ey)
            self.hA *= f
            self.hB *= f
            ex *= f
            ey *= f
        if self.hX + ex > 0.8 * self.a_cav(zz_h):
            self.hX = max(5.0, 0.8 * self.a_cav(zz_h) - ex)
        self.hY = front + ey + 3.0

        # lungs
        self.lung_base = u(-905.0, -860.0)
        self.lung_grad = u(15.0, 45.0)
        self.dep_amp = u(50.0, 160.0)
        self.dep_len = u(3.0, 8.0)
        self.strip_half = (9.0 + 4.0 * s) * u(0.9, 1.15)
        self.fis_top = (self.zz_apex + u(45.0, 70.0), self.zz_apex + u(40.0, 65.0))  # right, left

        # airway
        self.r_tr = u(7.5, 9.5) * s ** 0.5

        # table, abdomen
        self.table_gap = u(3.0, 18.0)
        self.table_curve = u(12.0, 32.0) / 200.0 ** 2
        self.hu_liver = u(48.0, 65.0)
        self.hu_muscle = u(38.0, 52.0)
        self.hu_fat = u(-110.0, -85.0)
        self.blur_px = u(0.55, 1.0)

    # --- body profile (patient frame) ---
    def a(self, zz: float) -> float:
        t = zz / self.L
        return self.a_body * (0.9 + 0.1 * _sstep(t / 0.3))

    def b_ant(self, zz: float) -> float:
        t = zz / self.L
        return self.b_body * (0.86 + 0.14 * _sstep(t / 0.35)) * (1 + 0.04 * _sstep((t - 0.7) / 0.3))

    def b_post(self, zz: float) -> float:
        return self.b_ant(zz) * self.post_ratio

    def Y_back(self, zz: float) -> float:
        return 0.93 * self.b_post(zz)

    def t_mus_ant(self, zz: float) -> float:
        return self.mus_ant * (1 - 0.6 * _sstep((zz - self.zz_carina) / 70.0))

    def depth_total_lat(self) -> float:
        return self.skin + self.fat_lat + self.mus_lat + self.wall

    def a_cav(self, zz: float) -> float:
        return self.a(zz) - self.depth_total_lat()

    def b_cav_ant(self, zz: float) -> float:
        return self.b_ant(zz) - (self.skin + self.fat_ant + self.t_mus_ant(zz) + self.wall)

    def Y_cav_post(self, zz: float) -> float:
        return self.Y_back(zz) - (self.skin + self.fat_post + self.mus_post + self.wall)

    # --- spine ---
    def r_vb(self, zz: float) -> float:
        return (12.5 + 6.0 * float(np.clip(zz / self.L, 0, 1.2))) * self.s ** 0.5

    def rx_vb(self, zz: float) -> float:
        return 1.15 * self.r_vb(zz)

    def ry_vb(self, zz: float) -> float:
        return 0.95 * self.r_vb(zz)

    def Y_vb(self, zz: float) -> float:
        return (self.Y_cav_post(zz) - self.ry_vb(zz) - self.vb_off
                + self.kyph * math.sin(math.pi * float(np.clip(zz / self.L, 0, 1))))

    def Y_can(self, zz: float) -> float:
        return self.Y_vb(zz) + self.ry_vb(zz) + self.r_can + 1.5

    def paraspinal(self, zz: float) -> tuple[float, float, float, float]:
        """(|X| centre, Y centre, semi-axis X, semi-axis Y) of the erector spinae, behind the transverse processes."""
        return self.rx_vb(zz) + 14.0 * self.s, self.Y_can(zz) + 20.0, 24.0 * self.s, 26.0 * self.s

    # --- airway / mediastinum ---
    def Y_tr(self, zz: float) -> float:
        t = float(np.clip(zz / max(self.zz_carina, 1.0), 0, 1))
        return self.Y_vb(zz) - self.ry_vb(zz) - 13.0 - self.r_tr - 10.0 * (1 - t)

    def X_tr(self, zz: float) -> float:
        return -1.5

    def s_lung(self, zz: float) -> float:
        """Apex taper of the lung envelope (0 above the apex, 1 below ``zz_full``)."""
        if zz <= self.zz_apex:
            return 0.0
        if zz >= self.zz_full:
            return 1.0
        t = (self.zz_full - zz) / (self.zz_full - self.zz_apex)
        return math.sqrt(max(0.0, 1 - t * t))

    def heart_section(self, zz: float) -> tuple[float, float] | None:
        """(A, B) semi-axes of the heart's cross-section at zz, or None."""
        d = zz - self.zz_h
        if d < 0:
            v = 1 - (d / self.hC) ** 2
        else:
            cb = max(self.h_base - self.zz_h, 5.0)
            v = 1 - (d / cb) ** 4
        if v <= 0.02:
            return None
        f = math.sqrt(v)
        return self.hA * f, self.hB * f

    def zrel(self, zz: np.ndarray | float) -> np.ndarray | float:
        return (np.asarray(zz) - self.zz_apex) / self.H


# ---------------------------------------------------------------------------------------------- tube rasteriser
def _raster_tubes(vol: np.ndarray, segs: list[tuple], geom: _Geom, weight: float = 1.0) -> None:
    """Max-composite soft cylinders (capsules with linearly varying radius) into a uint8 fraction volume.

    segs: (p0, p1, r0, r1) in the patient frame, p = (zz, X, Y) mm.
    """
    if not segs:
        return
    K = geom.ksub
    ps, dz = geom.ps, geom.dz
    c = (geom.M - 1) / 2.0
    nz, ny, nx = vol.shape
    sub = ((np.arange(K) + 0.5) / K - 0.5) * dz
    for p0, p1, r0, r1 in segs:
        q0 = geom.to_image(np.asarray(p0, float))
        q1 = geom.to_image(np.asarray(p1, float))
        rmax = max(r0, r1) + ps
        lo, hi = np.minimum(q0, q1) - rmax, np.maximum(q0, q1) + rmax
        i0 = max(0, math.ceil((lo[0] - geom.zz0) / dz - 0.5))
        i1 = min(nz - 1, math.floor((hi[0] - geom.zz0) / dz + 0.5))
        x0 = max(0, math.ceil(lo[1] / ps + c))
        x1 = min(nx - 1, math.floor(hi[1] / ps + c))
        y0 = max(0, math.ceil(lo[2] / ps + c))
        y1 = min(ny - 1, math.floor(hi[2] / ps + c))
        if i1 < i0 or x1 < x0 or y1 < y0:
            continue
        Z = ((geom.zz0 + np.arange(i0, i1 + 1) * dz)[:, None] + sub[None, :]).ravel() - q0[0]
        X = (np.arange(x0, x1 + 1) - c) * ps - q0[1]
        Y = (np.arange(y0, y1 + 1) - c) * ps - q0[2]
        d = q1 - q0
        L2 = float(d @ d) + 1e-9
        Zc, Yc, Xc = Z[:, None, None], Y[None, :, None], X[None, None, :]
        t = np.clip((Zc * d[0] + Xc * d[1] + Yc * d[2]) * (1.0 / L2), 0.0, 1.0)
        dd = (Zc - t * d[0]) ** 2 + (Xc - t * d[1]) ** 2 + (Yc - t * d[2]) ** 2
        r = r0 + (r1 - r0) * t
        f = np.clip(0.5 + (r - np.sqrt(dd)) / ps, 0.0, 1.0)
        rm = 0.5 * (r0 + r1)
        if rm < ps:  # thin tube: its peak fraction is its area fraction of a pixel, not the ramp's
            f *= min(1.0, math.pi * rm * rm / (ps * ps)) / min(1.0, 0.5 + rm / ps)
        if K > 1:
            f = f.reshape(i1 - i0 + 1, K, y1 - y0 + 1, x1 - x0 + 1).mean(axis=1)
        block = vol[i0:i1 + 1, y0:y1 + 1, x0:x1 + 1]
        np.maximum(block, (f * (255.0 * weight) + 0.5).astype(np.uint8), out=block)


def _polyline(points: list, radii: list) -> list[tuple]:
    return [(points[k], points[k + 1], radii[k], radii[k + 1]) for k in range(len(points) - 1)]


# --------------------------------------------------------------------------------------- central (mediastinal)
def _central_structures(an: _Anatomy, geom: _Geom, rng: np.random.Generator) -> dict[str, Any]:
    """Aorta, great vessels, SVC, pulmonary trunk/arteries/veins roots, oesophagus, trachea, main bronchi."""
    u = rng.uniform
    s = an.s
    zz_top = min(geom.zz0 - geom.dz, -10.0) - 10.0
    zz_bot = geom.zz(geom.n - 1) + geom.dz + 10.0
    car = an.zz_carina
    P = lambda zz, X, Y: np.array([zz, X, Y], float)  # noqa: E731

    # trachea and main bronchi
    tr_pts = [P(z, an.X_tr(z), an.Y_tr(z)) for z in np.linspace(zz_top, car, 8)]
    C = tr_pts[-1]
    a_c = an.a_cav(car + 30.0)
    HR = P(car + u(30.0, 40.0), -0.27 * a_c, C[2] + u(2.0, 8.0))
    HL = P(car + u(25.0, 32.0), 0.31 * a_c, C[2] + u(5.0, 11.0))
    r_tr = an.r_tr
    rR, rL = r_tr * 0.72, r_tr * 0.64
    wall = lambda r: 0.12 * r + 0.5  # noqa: E731
    airway_central = _polyline(tr_pts, [r_tr] * len(tr_pts)) + [(C, HR, rR, rR * 0.85), (C, HL, rL, rL * 0.85)]

    # aorta: root -> ascending -> arch -> descending
    zz_arch = car - u(16.0, 26.0)
    Y_asc = an.hY - 0.2 * an.hB - 12.0
    root = P(an.zz_h - 0.35 * an.hC, an.hX * 0.25, an.hY - 0.3 * an.hB)
    asc_top = P(zz_arch, -6.0 * s, Y_asc)
    X_da = an.rx_vb(zz_arch) + 10.0 * s
    Y_da = an.Y_vb(zz_arch) - 0.45 * an.ry_vb(zz_arch)
    arch = []
    for t in np.linspace(0, 1, 9):
        arch.append(P(zz_arch - 14.0 * s * math.sin(math.pi * t), asc_top[1] + t * (X_da - asc_top[1]),
                      asc_top[2] + t * (Y_da - asc_top[2])))
    r_asc, r_arch, r_desc = u(13.0, 16.0) * s, u(11.5, 13.5) * s, u(10.0, 12.0) * s
    desc = [arch[-1]]
    zz_hiatus = an.zz_domeL + 25.0
    for z in np.linspace(zz_arch + 20.0, max(zz_bot, zz_arch + 40.0), 8):
        t = float(np.clip((z - zz_arch) / (zz_hiatus - zz_arch), 0, 1))
        desc.append(P(z, X_da + t * (6.0 - X_da), an.Y_vb(z) - 0.45 * an.ry_vb(z) - t * 0.6 * an.ry_vb(z)))
    tubes = [(root, asc_top, r_asc, r_asc)]
    tubes += _polyline(arch, list(np.linspace(r_asc, r_arch, len(arch))))
    tubes += _polyline(desc, [r_arch] + [r_desc] * (len(desc) - 1))
    # arch branches up to the top of the scan
    Ytr_top = an.Y_tr(zz_top)
    for t, dx, dy, r in ((0.22, -14.0, -14.0, 6.5), (0.42, 9.0, -12.0, 4.5), (0.62, 22.0, 2.0, 5.2)):
        k = int(round(t * (len(arch) - 1)))
        a0 = arch[k]
        tubes.append((a0, P(zz_top, dx * s, Ytr_top + dy * s), r * s, r * s * 0.9))
    # superior vena cava into the right atrium
    svc_bot = P(an.zz_h - 0.55 * an.hC, an.hX - 0.8 * an.hA, an.hY - 0.1 * an.hB)
    svc_top = P(zz_top, -26.0 * s, Ytr_top - 18.0 * s)
    tubes.append((svc_top, P(zz_arch, -24.0 * s, Y_asc + 4.0), 9.5 * s, 9.5 * s))
    tubes.append((P(zz_arch, -24.0 * s, Y_asc + 4.0), svc_bot, 9.5 * s, 10.0 * s))
    # oesophagus: behind the trachea, slightly left, down to the hiatus then to the stomach
    oes = [P(z, 5.0 * s, an.Y_vb(z) - an.ry_vb(z) - 7.0) for z in np.linspace(zz_top, an.zz_domeL + 10.0, 8)]
    oes.append(P(an.zz_domeL + 40.0, 0.35 * an.a_cav(an.zz_domeL), -0.05 * an.b_cav_ant(an.zz_domeL)))
    tubes += _polyline(oes, [7.0 * s] * len(oes))
    # pulmonary trunk and arteries (roots of the intrapulmonary arterial trees)
    pt0 = P(an.zz_h - 0.7 * an.hC, an.hX + 0.1 * an.hA, an.hY - 0.75 * an.hB)
    bif = P(car + 6.0, 8.0 * s, C[2] - 22.0 * s)
    r_pt = u(12.0, 14.5) * s
    tubes.append((pt0, bif, r_pt, r_pt))
    art_root = {
        LUNG_RIGHT: HR + P(-2.0, -4.0, -9.0),
        LUNG_LEFT: HL + P(-7.0, 3.0, -4.0),
    }
    r_pa = 0.7 * r_pt
    tubes.append((bif, art_root[LUNG_RIGHT], r_pa, 0.8 * r_pa))
    tubes.append((bif, art_root[LUNG_LEFT], r_pa * 0.95, 0.8 * r_pa))
    # pulmonary veins from the left atrium
    la = P(an.zz_h - 0.35 * an.hC, an.hX - 0.15 * an.hA, an.hY + 0.6 * an.hB)
    a_v = an.a_cav(car + 55.0)
    vein_root = {
        LUNG_RIGHT: P(car + u(48.0, 60.0), -0.27 * a_v, la[2] + 3.0),
        LUNG_LEFT: P(car + u(45.0, 58.0), 0.33 * a_v, la[2] + 6.0),
    }
    for side in (LUNG_RIGHT, LUNG_LEFT):
        tubes.append((la, vein_root[side], 7.0 * s, 6.0 * s))
    return {
        "tubes": tubes,
        "airway_central": airway_central,
        "airway_wall": wall,
        "bronchus_root": {LUNG_RIGHT: (HR, _unit(HR - C), rR * 0.8), LUNG_LEFT: (HL, _unit(HL - C), rL * 0.8)},
        "art_root": art_root,
        "vein_root": vein_root,
        "carina": C,
        "zz_arch": zz_arch,
    }


# --------------------------------------------------------------------------------------------- trunk per slice
class _Grids:
    """Per-case 2D coordinate grids (float32), image frame and patient frame."""

    def __init__(self, geom: _Geom):
        M, ps = geom.M, geom.ps
        c = (M - 1) / 2.0
        ax = ((np.arange(M) - c) * ps).astype(np.float32)
        self.Xi = np.broadcast_to(ax[None, :], (M, M))
        self.Yi = np.broadcast_to(ax[:, None], (M, M))
        Xp, Yp = geom.to_patient_xy(self.Xi.astype(np.float64), self.Yi.astype(np.float64))
        self.X = Xp.astype(np.float32)
        self.Y = Yp.astype(np.float32)
        self.X2, self.Y2 = self.X ** 2, self.Y ** 2
        self.R = np.sqrt(self.X2 + self.Y2)
        Rs = np.maximum(self.R, 1e-3)
        self.ux2 = self.X2 / Rs ** 2
        self.uy2 = self.Y2 / Rs ** 2
        self.ant = self.Y < 0
        self.absX = np.abs(self.X)
        self.psi = np.arctan2(self.absX, self.Y)  # 0 = posterior midline, pi = anterior midline
        self.circle = (self.Xi ** 2 + self.Yi ** 2) > (M / 2.0 * ps) ** 2
        self.rows = np.arange(M)
        self.geom = geom

    def bbox(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Image index window covering a patient-frame rectangle (plus a margin)."""
        g = self.geom
        corners = np.array([[0, x, y] for x in (x0, x1) for y in (y0, y1)], float)
        q = g.to_image(corners)
        c = (g.M - 1) / 2.0
        cols = q[:, 1] / g.ps + c
        rows = q[:, 2] / g.ps + c
        ca, cb = max(0, int(math.floor(cols.min())) - 2), min(g.M, int(math.ceil(cols.max())) + 3)
        ra, rb = max(0, int(math.floor(rows.min())) - 2), min(g.M, int(math.ceil(rows.max())) + 3)
        if cb <= ca or rb <= ra:
            return None
        return slice(ra, rb), slice(ca, cb)


def _body_fields(an: _Anatomy, gr: _Grids, zz: float) -> dict[str, np.ndarray]:
    a, ba, bp = an.a(zz), an.b_ant(zz), an.b_post(zz)
    inv_b2 = np.where(gr.ant, np.float32(1.0 / ba ** 2), np.float32(1.0 / bp ** 2))
    q = np.sqrt(gr.X2 * np.float32(1.0 / a ** 2) + gr.Y2 * inv_b2)
    sd_e = gr.R - gr.R / np.maximum(q, 1e-4)
    sd_body = np.maximum(sd_e, gr.Y - np.float32(an.Y_back(zz)))
    t_ap_fat = np.where(gr.ant, np.float32(an.fat_ant), np.float32(an.fat_post))
    t_ap_mus = np.where(gr.ant, np.float32(an.t_mus_ant(zz)), np.float32(an.mus_post))
    fat = gr.ux2 * np.float32(an.fat_lat) + gr.uy2 * t_ap_fat
    mus = gr.ux2 * np.float32(an.mus_lat) + gr.uy2 * t_ap_mus
    d2 = an.skin + fat
    d3 = d2 + mus
    d4 = d3 + np.float32(an.wall)
    return {"sd": sd_body, "d2": d2, "d3": d3, "d4": d4}


def _diaphragm_z(an: _Anatomy, gr: _Grids, zz: float) -> np.ndarray:
    """zz of the diaphragm surface below each pixel (lung is above: zz < z_d)."""
    a_c = an.a_cav(zz)
    bca, ycp = max(an.b_cav_ant(zz), 20.0), max(an.Y_cav_post(zz), 20.0)
    right = gr.X < 0
    Xd = np.where(right, np.float32(-0.45 * a_c), np.float32(0.45 * a_c))
    dx = (gr.X - Xd) / np.float32(0.5 * a_c)
    lateral = np.abs(gr.X) > np.abs(Xd)
    r2 = dx * dx * np.where(lateral, np.float32(1.0), np.float32(0.25))
    Yd = -0.05 * bca
    dy = gr.Y - np.float32(Yd)
    r2 += np.where(dy > 0, (dy / np.float32(0.8 * ycp)) ** 2, 0.6 * (dy / np.float32(0.9 * bca)) ** 2)
    dome = np.where(right, np.float32(an.zz_domeR), np.float32(an.zz_domeL))
    rec = np.where(right, np.float32(an.zz_rec - 6.0), np.float32(an.zz_rec))
    return dome + (rec - dome) * np.minimum(r2, 1.0)


def _lung_slice(an: _Anatomy, gr: _Grids, geom: _Geom, zz: float, medtube: np.ndarray) -> np.ndarray:
    """Soft lung fraction (float32) of one slice."""
    sl = an.s_lung(zz)
    if sl <= 0 or zz > an.zz_rec + geom.dz:
        return np.zeros((geom.M, geom.M), np.float32)
    ps = geom.ps
    X, Y = gr.X, gr.Y
    bf = _body_fields(an, gr, zz)
    sd = bf["sd"] + bf["d4"]  # thoracic cavity
    # envelope of each lung (apex taper), one per side
    a_c = an.a_cav(zz)
    bca, ycp = an.b_cav_ant(zz), an.Y_cav_post(zz)
    xa = an.rx_vb(zz) + 24.0
    xe = xa + sl * (0.5 * a_c - xa)
    ye = 0.4 * ycp * (1 - sl)
    axe, aye = sl * 0.85 * a_c + 4.0 * sl, sl * 1.25 * (bca + ycp) / 2 + 4.0 * sl
    sd_env = _ellipse_sd(gr.absX - np.float32(xe), Y - np.float32(ye), axe, aye)
    sd = np.maximum(sd, sd_env)
    # mediastinal strip
    sd = np.maximum(sd, np.float32(an.strip_half) - np.abs(X - np.float32(1.0)))
    def cut(box: tuple[float, float, float, float], fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """sd <- max(sd, -sd_shape) on the shape's bounding window only (outside it the shape has no effect)."""
        bb = gr.bbox(*box)
        if bb is not None:
            sd[bb] = np.maximum(sd[bb], -fn(X[bb], Y[bb]))

    # upper mediastinum (trachea, oesophagus, great vessels in fat)
    um = 1.0 - _sstep((zz - an.zz_carina - 10.0) / 30.0)
    if um > 0.02:
        ax_, ay_, yc_ = 24.0 * an.s * um + 1e-3, 30.0 * an.s * um + 1e-3, an.Y_tr(zz) + 6.0
        cut((2.0 - ax_ - 3, 2.0 + ax_ + 3, yc_ - ay_ - 3, yc_ + ay_ + 3),
            lambda Xb, Yb: _ellipse_sd(Xb - np.float32(2.0), Yb - np.float32(yc_), ax_, ay_))
    # heart + pericardial fat
    hs = an.heart_section(zz)
    if hs is not None:
        A, B = hs
        c, s_ = math.cos(an.h_ang), math.sin(an.h_ang)
        e = max(A, B) + an.h_pf + 3.0

        def heart(Xb: np.ndarray, Yb: np.ndarray) -> np.ndarray:
            dx, dy = Xb - np.float32(an.hX), Yb - np.float32(an.hY)
            # long axis points to the patient's left and anterior (Y < 0)
            return _ellipse_sd(dx * c - dy * s_, dx * s_ + dy * c, A + an.h_pf, B + an.h_pf)

        cut((an.hX - e, an.hX + e, an.hY - e, an.hY + e), heart)
    # spine block: vertebral body, posterior elements, paraspinal muscles
    rx, ry, yvb = an.rx_vb(zz), an.ry_vb(zz), an.Y_vb(zz)
    cut((-rx - 6, rx + 6, yvb - ry - 6, yvb + ry + 6),
        lambda Xb, Yb: _ellipse_sd(Xb, Yb - np.float32(yvb), rx + 3.0, ry + 3.0))
    bb = gr.bbox(-rx - 8, rx + 8, yvb - 2, an.b_post(zz) + 5)
    if bb is not None:
        sd[bb] = np.maximum(sd[bb], np.where(Y[bb] > yvb, np.float32(rx + 4.0) - gr.absX[bb], np.float32(-1e3)))
    xp, yp, axp, ayp = an.paraspinal(zz)
    for sgn in (-1.0, 1.0):
        cut((sgn * xp - axp - 3, sgn * xp + axp + 3, yp - ayp - 3, yp + ayp + 3),
            lambda Xb, Yb, sgn=sgn: _ellipse_sd(Xb - np.float32(sgn * xp), Yb - np.float32(yp), axp, ayp))
    f = _soft(sd, ps)
    # diaphragm (partial volume along z: the fraction of the slab above the surface)
    if an.zz_domeR - zz < 0.5 * max(geom.dz, ps):  # (above the domes the diaphragm cuts nothing)
        zd = _diaphragm_z(an, gr, zz)
        f *= np.clip(0.5 - (zz - zd) / np.float32(max(geom.dz, ps)), 0.0, 1.0)
    f *= 1.0 - medtube.astype(np.float32) * np.float32(1.0 / 255.0)
    return f


# ------------------------------------------------------------------------------------------------------- trees
def _tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, pts: np.ndarray, r0: float,
          r_min: float, g0: int, g_max: int, frac: float = 0.4, split: str = "major",
          max_angle_deg: float = 65.0) -> list[dict]:
    """Space-filling branching tree (after Tawhai et al.): each branch heads toward the centroid of the lung
    points it supplies, the points split in two by a plane along the branch; radii follow Murray's law."""
    segs: list[dict] = []
    if len(pts) < 4:
        return segs
    cos_max = math.cos(math.radians(max_angle_deg))
    stack = [(np.asarray(root, float), _unit(np.asarray(direction, float)), np.arange(len(pts)), r0, g0, -1)]
    while stack:
        p, d, idx, r, g, parent = stack.pop()
        P = pts[idx]
        cen = P.mean(axis=0)
        v = cen - p
        dist = float(np.linalg.norm(v))
        if dist < 1.0:
            continue
        u = v / dist
        cu = float(u @ d)
        if cu < cos_max:  # limit the branching angle: rotate toward the parent direction
            perp = _unit(u - cu * d)
            ang = math.acos(cos_max)
            u = d * math.cos(ang) + perp * math.sin(ang)
        terminal = len(idx) < 6 or r * 0.8 < r_min or g >= g_max
        length = dist * (0.8 if terminal else frac)
        length = max(length, 2.0 * r)
        e = p + u * length
        sid = len(segs)
        segs.append({"p0": p, "p1": e, "r": r, "gen": g, "parent": parent, "n": len(idx), "children": []})
        if parent >= 0:
            segs[parent]["children"].append(sid)
        if terminal:
            continue
        Q = P - cen
        Qp = Q - np.outer(Q @ u, u)
        cov = Qp.T @ Qp
        _, V = np.linalg.eigh(cov)
        nrm = V[:, -1] if split == "major" else V[:, -2]
        nrm = _unit(nrm + rng.normal(0, 0.15, 3))
        side = (Q @ nrm) > 0
        for sel in (side, ~side):
            child = idx[sel]
            if len(child) == 0:
                continue
            rc = r * (len(child) / len(idx)) ** (1.0 / 3.0)
            stack.append((e, u, child, rc, g + 1, sid))
    return segs


def _offset_tree(segs: list[dict], root_offset: np.ndarray, gap: float, rad: Callable[[dict], float]) -> list[tuple]:
    """Copy of a bronchial tree displaced sideways (the accompanying pulmonary artery), continuous at branches."""
    ref = np.array([0.0, 1.0, 0.0])
    end_off: dict[int, np.ndarray] = {}
    out = []
    for k, sgm in enumerate(segs):
        d = _unit(sgm["p1"] - sgm["p0"])
        n = np.cross(d, ref)
        if np.linalg.norm(n) < 0.2:
            n = np.cross(d, np.array([0.0, 0.0, 1.0]))
        n = _unit(n)
        if n[2] > 0:  # keep the artery anterior of (or level with) its bronchus
            n = -n
        ra = rad(sgm)
        o1 = n * (sgm["r"] * 1.25 + ra + gap)
        o0 = end_off.get(sgm["parent"], root_offset if sgm["parent"] < 0 else o1)
        end_off[k] = o1
        out.append((sgm["p0"] + o0, sgm["p1"] + o1, ra, ra))
    return out


# ------------------------------------------------------------------------------------------------------ lesions
class _LesionCanvas:
    """Global lesion fields: membership alpha (uint8), target HU (int16) and the label mask (uint8)."""

    def __init__(self, shape: tuple[int, int, int], lung_mask: np.ndarray, geom: _Geom):
        self.alpha = np.zeros(shape, np.uint8)
        self.target = np.zeros(shape, np.int16)
        self.label = np.zeros(shape, np.uint8)
        self.lung = lung_mask
        self.geom = geom

    def paint(self, lo: np.ndarray, hi: np.ndarray, fn: Callable, force_peak: bool = False) -> dict[str, int] | None:
        """Evaluate ``fn(zz, X, Y) -> (alpha_outer, alpha_core, t_outer, t_core)`` on the voxels of a patient-
        frame box [lo, hi] (zz, X, Y) and composite it. Returns voxel counts, or None if no lesion voxel results."""
        g = self.geom
        K = g.ksub
        corners = np.array([[z, x, y] for z in (lo[0], hi[0]) for x in (lo[1], hi[1]) for y in (lo[2], hi[2])])
        v = g.to_voxel(corners)
        nz, ny, nx = self.alpha.shape
        i0, i1 = max(0, math.floor(v[:, 0].min() - 0.5)), min(nz - 1, math.ceil(v[:, 0].max() + 0.5))
        y0, y1 = max(0, math.floor(v[:, 1].min()) - 1), min(ny - 1, math.ceil(v[:, 1].max()) + 1)
        x0, x1 = max(0, math.floor(v[:, 2].min()) - 1), min(nx - 1, math.ceil(v[:, 2].max()) + 1)
        if i1 < i0 or y1 < y0 or x1 < x0:
            return None
        lung = self.lung[i0:i1 + 1, y0:y1 + 1, x0:x1 + 1] > 0
        if not lung.any():
            return None
        c = (g.M - 1) / 2.0
        sub = ((np.arange(K) + 0.5) / K - 0.5) * g.dz
        Xi = ((np.arange(x0, x1 + 1) - c) * g.ps)[None, :]
        Yi = ((np.arange(y0, y1 + 1) - c) * g.ps)[:, None]
        X, Y = g.to_patient_xy(Xi, Yi)
        X, Y = X[None].astype(np.float32), Y[None].astype(np.float32)
        box = (slice(i0, i1 + 1), slice(y0, y1 + 1), slice(x0, x1 + 1))
        backup = (self.alpha[box].copy(), self.target[box].copy(), self.label[box].copy())
        counts = {"n_voxels": 0, "n_ggo_voxels": 0, "n_consolidation_voxels": 0}
        best = (0.0, None, 0)  # peak alpha within the lung, its flat index in the box, its label
        ny_, nx_ = y1 - y0 + 1, x1 - x0 + 1
        step = max(1, int(3_000_000 // (K * ny_ * nx_)))  # bounded temporaries for big lesions
        for a in range(i0, i1 + 1, step):
            b = min(i1, a + step - 1)
            Z = ((g.zz0 + np.arange(a, b + 1) * g.dz)[:, None] + sub[None, :]).ravel()[:, None, None]
            ao, ac, to, tc = fn(Z.astype(np.float32), X, Y)
            ao = np.broadcast_to(ao, (Z.shape[0], ny_, nx_))
            ac = np.broadcast_to(ac, ao.shape)
            alpha = np.maximum(ao, ac)
            at = ao * (1 - ac) * to + ac * tc
            shp = (b - a + 1, K, ny_, nx_)
            alpha_m = alpha.reshape(shp).mean(1)
            at_m = np.broadcast_to(at, alpha.shape).reshape(shp).mean(1)
            ac_m = ac.reshape(shp).mean(1)
            del ao, ac, alpha, at
            lung = self.lung[a:b + 1, y0:y1 + 1, x0:x1 + 1] > 0
            target = np.where(alpha_m > 1e-3, at_m / np.maximum(alpha_m, 1e-3), -1000.0)
            lab = np.where(ac_m >= 0.5, LESION_CONSOLIDATION, np.where(alpha_m >= 0.5, LESION_GGO, 0)).astype(np.uint8)
            lab[~lung] = 0
            if force_peak:
                m = np.where(lung, alpha_m, 0)
                k = int(np.argmax(m))
                if m.flat[k] > best[0]:
                    kl = LESION_CONSOLIDATION if ac_m.flat[k] >= 0.5 * alpha_m.flat[k] else LESION_GGO
                    best = (float(m.flat[k]), np.ravel_multi_index(
                        np.unravel_index(k, m.shape) + np.array([a - i0, 0, 0]), (i1 - i0 + 1, ny_, nx_)), kl)
            sl = (slice(a, b + 1), slice(y0, y1 + 1), slice(x0, x1 + 1))
            a_old = self.alpha[sl].astype(np.float32) / 255.0
            t_old = self.target[sl].astype(np.float32)
            upd = alpha_m * (target + 900.0) > a_old * (t_old + 900.0)
            self.alpha[sl] = np.where(upd, np.rint(alpha_m * 255.0), self.alpha[sl]).astype(np.uint8)
            self.target[sl] = np.where(upd, np.rint(np.clip(target, -1000, 300)), self.target[sl]).astype(np.int16)
            np.maximum(self.label[sl], lab, out=self.label[sl])
            counts["n_voxels"] += int((lab > 0).sum())
            counts["n_ggo_voxels"] += int((lab == LESION_GGO).sum())
            counts["n_consolidation_voxels"] += int((lab == LESION_CONSOLIDATION).sum())
        if counts["n_voxels"] == 0 and force_peak and best[1] is not None and best[0] >= 0.12:
            lab_box = self.label[box]
            lab_box.flat[best[1]] = max(lab_box.flat[best[1]], best[2])
            counts["n_voxels"] = 1
            counts["n_ggo_voxels" if best[2] == LESION_GGO else "n_consolidation_voxels"] = 1
        if counts["n_voxels"] == 0:  # nothing visible as ground truth: undo, the caller places it elsewhere
            self.alpha[box], self.target[box], self.label[box] = backup
            return None
        return counts


class _Waves:
    """Smooth 3D random field in [-1, 1]-ish: a sum of random plane waves (cheap on any sub-block)."""

    def __init__(self, rng: np.random.Generator, wavelength: float, n: int = 6):
        self.k = rng.normal(size=(n, 3))
        self.k /= np.linalg.norm(self.k, axis=1, keepdims=True)
        self.k *= (2 * math.pi / wavelength) * rng.uniform(0.7, 1.4, size=(n, 1))
        self.ph = rng.uniform(0, 2 * math.pi, n)
        self.norm = math.sqrt(2.0 / n)

    def __call__(self, Z: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        kz, kx, ky = self.k[:, 0], self.k[:, 1], self.k[:, 2]
        if Z.ndim == 3 and Z.shape[1:] == (1, 1) and X.ndim == 3 and X.shape[0] == 1:
            # separable: sum_j cos(a_j(z) + b_j(x, y)) = [cos a, -sin a] @ [cos b; sin b], one small matmul
            a = Z.reshape(-1, 1) * kz[None, :] + self.ph[None, :]
            b = X.reshape(1, -1) * kx[:, None] + Y.reshape(1, -1) * ky[:, None]
            A = np.concatenate([np.cos(a), -np.sin(a)], axis=1).astype(np.float32)
            B = np.concatenate([np.cos(b), np.sin(b)], axis=0).astype(np.float32)
            return (A @ B).reshape(Z.shape[0], X.shape[1], X.shape[2]) * np.float32(self.norm)
        out = 0.0
        for j in range(len(self.ph)):
            out = out + np.cos(Z * kz[j] + X * kx[j] + Y * ky[j] + self.ph[j])
        return out * np.float32(self.norm)


def _frame_from_normal(n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Columns: t1 (roughly axial tangent), t2 (roughly along z), n."""
    n = _unit(n)
    t1 = np.cross(n, np.array([1.0, 0.0, 0.0]))  # perpendicular to n and to the z axis
    if np.linalg.norm(t1) < 0.2:
        t1 = np.cross(n, np.array([0.0, 1.0, 0.0]))
    t1 = _unit(t1)
    t2 = np.cross(n, t1)
    a = rng.uniform(-0.4, 0.4)
    t1, t2 = t1 * math.cos(a) + t2 * math.sin(a), -t1 * math.sin(a) + t2 * math.cos(a)
    return np.stack([t1, t2, n], axis=1)


def _ellipsoid_lesion(c: np.ndarray, Rm: np.ndarray, axes: tuple[float, float, float], *, amp: float,
                      edge_mm: float, t_outer: float, core_scale: float | None, t_core: float, crazy: dict | None,
                      rng: np.random.Generator, tex_hu: float = 30.0) -> tuple[np.ndarray, np.ndarray, Callable]:
    a = np.asarray(axes, float)
    am = float(a.mean())
    w_shape = _Waves(rng, wavelength=max(8.0, am * rng.uniform(0.6, 1.2)))
    w_core = _Waves(rng, wavelength=max(6.0, am * rng.uniform(0.4, 0.8)))
    w_tex = _Waves(rng, wavelength=rng.uniform(6.0, 14.0))
    w_crazy = _Waves(rng, wavelength=rng.uniform(8.0, 16.0))
    edge = edge_mm / am

    Rs = (Rm / a[None, :]).astype(np.float32)
    c32 = c.astype(np.float32)

    def fn(Z, X, Y):
        dZ, dX, dY = Z - c32[0], X - c32[1], Y - c32[2]
        l0 = dZ * Rs[0, 0] + (dX * Rs[1, 0] + dY * Rs[2, 0])
        l1 = dZ * Rs[0, 1] + (dX * Rs[1, 1] + dY * Rs[2, 1])
        l2 = dZ * Rs[0, 2] + (dX * Rs[1, 2] + dY * Rs[2, 2])
        q = np.sqrt(l0 * l0 + l1 * l1 + l2 * l2)
        # lobulation: the boundary moves by at most ~1.5 amp (in units of the semi-axes), no far satellites
        qn = q + np.float32(amp) * np.clip(w_shape(Z, X, Y), -1.5, 1.5)
        ao = np.clip((1 - qn) * np.float32(1 / edge) + np.float32(0.5), 0, 1)
        if core_scale is not None:
            qc = q + np.float32(1.3 * amp * core_scale) * np.clip(w_core(Z, X, Y), -1.5, 1.5)
            ac = np.clip((np.float32(core_scale) - qc) * np.float32(1 / (edge * 0.6)) + np.float32(0.5), 0, 1)
        else:
            ac = np.zeros_like(ao)
        to = np.float32(t_outer) + np.float32(tex_hu) * w_tex(Z, X, Y)
        if crazy is not None:
            inside = ao > 0
            lines = np.zeros_like(ao)
            zi, yi, xi = np.nonzero(inside)  # only where the lesion is: the pattern is costly
            Zs, Xs, Ys = Z[zi, 0, 0], X[0, yi, xi], Y[0, yi, xi]
            warp = 0.9 * w_crazy(Zs, Xs, Ys)
            sp = crazy["spacing"]
            acc = np.zeros(len(zi), np.float32)
            for nz_, nx_, ny_, ph in crazy["planes"]:
                sv = np.abs(np.sin((Zs * nz_ + Xs * nx_ + Ys * ny_) * (math.pi / sp) + ph + warp))
                acc = np.maximum(acc, np.clip(1 - sv * (sp / math.pi) / crazy["width"], 0, 1))
            lines[zi, yi, xi] = acc
            to = to + np.float32(crazy["hu"]) * lines
        return ao, ac, to, t_core

    ext = np.abs(Rm) @ a * (1 + 1.5 * amp + 0.5 * edge) + 2.0
    return c - ext, c + ext, fn


def _tube_lesion(pts: list[np.ndarray], r_core: float, r_out: float, *, amp: float, edge_mm: float,
                 t_outer: float, t_core: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Callable]:
    w = _Waves(rng, wavelength=rng.uniform(10.0, 22.0))
    w_tex = _Waves(rng, wavelength=rng.uniform(6.0, 12.0))
    P = [np.asarray(p, float) for p in pts]

    def fn(Z, X, Y):
        dmin = None
        tpos = None
        acc = 0.0
        total = sum(float(np.linalg.norm(P[k + 1] - P[k])) for k in range(len(P) - 1)) + 1e-9
        for k in range(len(P) - 1):
            p0, d = P[k], P[k + 1] - P[k]
            L2 = float(d @ d) + 1e-9
            t = np.clip(((Z - p0[0]) * d[0] + (X - p0[1]) * d[1] + (Y - p0[2]) * d[2]) / L2, 0, 1)
            dd = np.sqrt((Z - p0[0] - t * d[0]) ** 2 + (X - p0[1] - t * d[1]) ** 2 + (Y - p0[2] - t * d[2]) ** 2)
            tt = (acc + t * math.sqrt(L2)) / total
            acc += math.sqrt(L2)
            if dmin is None:
                dmin, tpos = dd, tt
            else:
                closer = dd < dmin
                dmin = np.where(closer, dd, dmin)
                tpos = np.where(closer, tt, tpos)
        taper = 1.0 - 0.45 * tpos  # thicker proximally
        dn = dmin + amp * r_out * np.clip(w(Z, X, Y), -1.5, 1.5)
        ao = np.clip((r_out * taper - dn) / edge_mm + 0.5, 0, 1)
        ac = np.clip((r_core * taper - dn) / (0.7 * edge_mm) + 0.5, 0, 1)
        return ao, ac, t_outer + 25.0 * w_tex(Z, X, Y), t_core

    arr = np.stack(P)
    ext = r_out * (1 + 1.5 * amp) + edge_mm + 2.0
    return arr.min(0) - ext, arr.max(0) + ext, fn


def _sphere_lesion(c: np.ndarray, r: float, t: float, solid: bool,
                   ps: float) -> tuple[np.ndarray, np.ndarray, Callable]:
    thin = min(1.0, math.pi * r * r / (ps * ps)) / min(1.0, 0.5 + r / ps) if r < ps else 1.0

    def fn(Z, X, Y):
        d = np.sqrt((Z - c[0]) ** 2 + (X - c[1]) ** 2 + (Y - c[2]) ** 2)
        a = np.clip(0.5 + (r - d) / max(ps, 0.8), 0, 1) * thin
        return (a, a if solid else np.zeros_like(a), t, t)

    ext = r + ps + 2.0
    return c - ext, c + ext, fn


class _LungPoints:
    """Coarse (~4 mm) samples of each lung: positions (patient frame), depth under the pleura, inward normal."""

    def __init__(self, lung_mask: np.ndarray, geom: _Geom, an: _Anatomy):
        sz = max(1, int(round(4.0 / geom.dz)))
        sy = max(1, int(round(4.0 / geom.ps)))
        lm = lung_mask[::sz, ::sy, ::sy]
        sampling = (geom.dz * sz, geom.ps * sy, geom.ps * sy)
        depth = ndi.distance_transform_edt(lm > 0, sampling=sampling).astype(np.float32)
        sm = ndi.gaussian_filter(depth, 1.0)
        gz, gy, gx = (np.gradient(sm, sampling[k], axis=k) if sm.shape[k] >= 2 else np.zeros_like(sm)
                      for k in range(3))
        idx = np.nonzero(lm)
        vox = np.stack([idx[0] * sz, idx[1] * sy, idx[2] * sy], 1).astype(float)
        c = (geom.M - 1) / 2.0
        zz = geom.zz0 + vox[:, 0] * geom.dz
        Yi, Xi = (vox[:, 1] - c) * geom.ps, (vox[:, 2] - c) * geom.ps
        X, Y = geom.to_patient_xy(Xi, Yi)
        self.p = np.stack([zz, X, Y], 1)
        self.side = lm[idx]
        self.depth = depth[idx]
        gX, gY = geom.cos * gx[idx] + geom.sin * gy[idx], -geom.sin * gx[idx] + geom.cos * gy[idx]
        nrm = np.stack([gz[idx], gX, gY], 1)
        nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-6)
        self.normal = nrm
        self.zrel = np.asarray(an.zrel(zz))
        ys = self.p[:, 2]
        self.post = (ys - ys.min()) / max(1e-6, ys.max() - ys.min())

    def of(self, side: int) -> np.ndarray:
        return np.nonzero(self.side == side)[0]


def _pick(rng: np.random.Generator, idx: np.ndarray, w: np.ndarray) -> int | None:
    if len(idx) == 0 or not np.isfinite(w).all() or w.sum() <= 0:
        return None
    return int(idx[rng.choice(len(idx), p=w / w.sum())])


def _place_lesions(label: str, rng: np.random.Generator, canvas: _LesionCanvas, lp: _LungPoints, an: _Anatomy,
                   geom: _Geom, trees: dict, difficulty: float) -> tuple[list[dict], list[tuple]]:
    """Place the class's lesions. Returns the lesion records and extra airway segments (air bronchograms)."""
    d = float(difficulty)
    scale = 1.0 - 0.55 * d
    contrast = 1.0 - 0.6 * d
    contrast_c = 1.0 - 0.35 * d
    base = an.lung_base
    toward = lambda t, k: base + (t - base) * k  # noqa: E731
    lesions: list[dict] = []
    extra_airways: list[tuple] = []
    side_name = {LUNG_RIGHT: "right", LUNG_LEFT: "left"}

    def record(kind: str, side: int, centre: np.ndarray, radius: float, pattern: str, counts: dict, **kw) -> None:
        v = geom.to_voxel(np.asarray(centre, float))
        rec = {"kind": kind, "side": side_name[side], "centre": [round(float(x), 2) for x in v],
               "radius_mm": round(float(radius), 2), "pattern": pattern}
        rec.update({k: _native(x) for k, x in kw.items()})
        rec.update(counts)
        lesions.append(rec)

    if label == "healthy":
        return lesions, extra_airways

    if label == "covid19":
        n = int(rng.integers(3, 9))
        n = max(3, int(round(n * (1 - 0.4 * d))))
        sides = [LUNG_RIGHT, LUNG_LEFT] + [int(x) for x in rng.choice([LUNG_RIGHT, LUNG_LEFT], n - 2)]
        k = 0
        attempts = 0
        while k < n and attempts < 12 * n:
            attempts += 1
            side = sides[k]
            idx = lp.of(side)
            dep = lp.depth[idx]
            # costal (not mediastinal) pleura: the inward normal points medially, or anteriorly at the back
            medial = lp.normal[idx, 1] * (1.0 if side == LUNG_RIGHT else -1.0)
            costal = (medial > -0.15) | (lp.normal[idx, 2] < -0.6)
            w = (dep < 14.0) * costal * np.exp(-dep / 8.0) * (0.08 + lp.zrel[idx].clip(0, 1.2) ** 2.5) \
                * (1 + 0.7 * lp.post[idx])
            j = _pick(rng, idx, w)
            if j is None:
                break
            nrm = lp.normal[j]
            a1 = rng.uniform(12.0, 50.0) * scale
            axes = (a1, a1 * rng.uniform(1.0, 1.8), a1 * rng.uniform(0.5, 0.8))
            pleura = lp.p[j] - nrm * lp.depth[j]
            c = pleura + nrm * axes[2] * rng.uniform(0.35, 0.75)
            Rm = _frame_from_normal(nrm, rng)
            has_core = rng.random() < 0.4
            crazy = None
            pattern = "subpleural_ggo"
            if rng.random() < 0.35:
                planes = []
                for _ in range(3):
                    nv = _unit(rng.normal(size=3))
                    planes.append((nv[0], nv[1], nv[2], rng.uniform(0, math.pi)))
                crazy = {"planes": planes, "spacing": rng.uniform(5.0, 9.0), "width": max(0.6, 0.35 * geom.ps),
                         "hu": rng.uniform(110.0, 220.0) * contrast}
                pattern = "crazy_paving"
            if has_core:
                pattern = "ggo_with_consolidation" if crazy is None else "crazy_paving_with_consolidation"
            t_o = toward(rng.uniform(-650.0, -450.0), contrast)
            t_c = toward(rng.uniform(-120.0, 20.0), contrast_c)
            lo, hi, fn = _ellipsoid_lesion(c, Rm, axes, amp=rng.uniform(0.12, 0.28), edge_mm=rng.uniform(2.0, 5.0),
                                           t_outer=t_o, core_scale=rng.uniform(0.3, 0.6) if has_core else None,
                                           t_core=t_c, crazy=crazy, rng=rng)
            counts = canvas.paint(lo, hi, fn)
            if counts is None or counts["n_voxels"] == 0:
                continue
            record("mixed" if has_core else "ggo", side, c, float(np.prod(axes)) ** (1 / 3), pattern, counts,
                   semi_axes_mm=[round(x, 1) for x in axes], target_hu=round(t_o), peripheral=True)
            k += 1
        return lesions, extra_airways

    airway_segs = trees["airway_segs"]
    if label == "cap":
        n = 1 if rng.random() < 0.6 else 2
        first = int(rng.choice([LUNG_RIGHT, LUNG_LEFT], p=[0.58, 0.42]))
        sides = [first] if n == 1 else [first, first if rng.random() < 0.6 else (3 - first)]
        for side in sides:
            for _ in range(20):
                cand = [sg for sg in airway_segs[side] if 3 <= sg["gen"] <= 5 and sg["r"] >= trees["r_air_min"]]
                if not cand:
                    cand = [sg for sg in airway_segs[side] if sg["r"] >= trees["r_air_min"]]
                near = lp.of(side)
                if not cand or len(near) == 0:
                    break
                zr = np.array([an.zrel(sg["p1"][0]) for sg in cand])
                w = 0.35 + np.clip(zr, 0, 1.1)
                sg = cand[int(rng.choice(len(cand), p=w / w.sum()))]
                dvec = _unit(sg["p1"] - sg["p0"])
                c = sg["p1"] + dvec * rng.uniform(8.0, 22.0) * scale
                # keep the centre inside the lung, more central than covid lesions
                j = near[np.argmin(np.linalg.norm(lp.p[near] - c, axis=1))]
                if lp.depth[j] < 12.0:
                    continue
                axes = (rng.uniform(30.0, 56.0) * scale, rng.uniform(18.0, 34.0) * scale,
                        rng.uniform(16.0, 28.0) * scale)
                ang = rng.uniform(0, 2 * math.pi)
                tilt = rng.uniform(-0.35, 0.35)
                ez = _unit(np.array([1.0, tilt * math.cos(ang), tilt * math.sin(ang)]))
                e1 = _unit(np.cross(ez, np.array([0.0, math.cos(ang + 1.0), math.sin(ang + 1.0)])))
                e2 = np.cross(ez, e1)
                Rm = np.stack([ez, e1, e2], axis=1)
                t_c = toward(rng.uniform(-40.0, 45.0), contrast_c)
                t_o = toward(rng.uniform(-600.0, -400.0), contrast)
                lo, hi, fn = _ellipsoid_lesion(c, Rm, axes, amp=rng.uniform(0.12, 0.22), edge_mm=rng.uniform(1.5, 3.0),
                                               t_outer=t_o, core_scale=rng.uniform(0.86, 0.93), t_core=t_c,
                                               crazy=None, rng=rng, tex_hu=15.0)
                counts = canvas.paint(lo, hi, fn)
                if counts is None:
                    continue
                # air bronchograms: a small airway tree grown from the supplying bronchus into the consolidation
                sel = near[np.linalg.norm((lp.p[near] - c) @ Rm / np.asarray(axes), axis=1) < 0.8]
                br = []
                if len(sel) >= 6:
                    br = _tree(rng, sg["p1"], dvec, lp.p[sel], max(1.2, sg["r"] * 0.9),
                               r_min=max(0.7, 0.3 * geom.ps), g0=sg["gen"] + 1, g_max=sg["gen"] + 4, frac=0.45)
                for b in br:
                    extra_airways.append((b["p0"], b["p1"], 0.8 * b["r"], 0.8 * b["r"]))
                record("consolidation", side, c, float(np.prod(axes)) ** (1 / 3),
                       "lobar_consolidation_air_bronchogram" if br else "lobar_consolidation", counts,
                       semi_axes_mm=[round(x, 1) for x in axes], target_hu=round(t_c), peripheral=False,
                       air_bronchogram_branches=len(br))
                break
        return lesions, extra_airways

    if label == "other_viral":
        n_pbv = int(rng.integers(2, 7))
        n_pbv = max(1, int(round(n_pbv * (1 - 0.4 * d))))
        pbv_centres = []
        for k in range(n_pbv):
            side = LUNG_RIGHT if k % 2 == 0 else LUNG_LEFT
            if k >= 2:
                side = int(rng.choice([LUNG_RIGHT, LUNG_LEFT]))
            segs = airway_segs[side]
            cand = [i for i, sg in enumerate(segs) if 2 <= sg["gen"] <= 5 and sg["r"] >= trees["r_air_min"]]
            if not cand:
                continue
            for _ in range(10):
                zr = np.array([an.zrel(segs[i]["p1"][0]) for i in cand])
                w = 0.4 + np.clip(zr, 0, 1.1)
                i = cand[int(rng.choice(len(cand), p=w / w.sum()))]
                path = [segs[i]["p0"], segs[i]["p1"]]
                cur = i
                for _ in range(int(rng.integers(1, 4))):
                    ch = segs[cur]["children"]
                    if not ch:
                        break
                    cur = int(rng.choice(ch))
                    path.append(segs[cur]["p1"])
                r_b = segs[i]["r"]
                r_core = (r_b * 1.3 + rng.uniform(2.5, 5.0)) * scale
                r_out = r_core + rng.uniform(3.0, 7.0) * scale
                t_c = toward(rng.uniform(-160.0, 10.0), contrast_c)
                t_o = toward(rng.uniform(-600.0, -420.0), contrast)
                lo, hi, fn = _tube_lesion(path, r_core, r_out, amp=rng.uniform(0.1, 0.25),
                                          edge_mm=rng.uniform(1.5, 3.0), t_outer=t_o, t_core=t_c, rng=rng)
                counts = canvas.paint(lo, hi, fn)
                if counts is None:
                    continue
                mid = np.mean(np.stack(path), axis=0)
                pbv_centres.append((side, mid))
                length = sum(float(np.linalg.norm(path[q + 1] - path[q])) for q in range(len(path) - 1))
                record("mixed", side, mid, r_out, "peribronchovascular_consolidation", counts,
                       length_mm=round(length, 1), target_hu=round(t_c), peripheral=False)
                break
        # centrilobular nodules near terminal arterial branches, clustered around the bundles
        n_nod = int(rng.integers(6, 19))
        n_nod = max(4, int(round(n_nod * (1 - 0.4 * d))))
        leaves = trees["artery_leaves"]
        placed = 0
        tries = 0
        while placed < n_nod and tries < 10 * n_nod and any(len(v) for v in leaves.values()):
            tries += 1
            if pbv_centres and rng.random() < 0.65:
                side, ctr = pbv_centres[int(rng.integers(len(pbv_centres)))]
                L = leaves[side]
                if len(L) == 0:
                    continue
                dist = np.linalg.norm(L - ctr, axis=1)
                w = np.exp(-dist / 35.0)
            else:
                side = int(rng.choice([LUNG_RIGHT, LUNG_LEFT]))
                L = leaves[side]
                if len(L) == 0:
                    continue
                w = 0.3 + np.clip(an.zrel(L[:, 0]), 0, 1.1)
            p = L[int(rng.choice(len(L), p=w / w.sum()))] + rng.normal(0, 2.0, 3)
            near = lp.of(side)
            if len(near) == 0:
                continue
            j = near[np.argmin(np.linalg.norm(lp.p[near] - p, axis=1))]
            if not (3.0 <= lp.depth[j] <= 30.0) or np.linalg.norm(lp.p[j] - p) > 8.0:
                continue
            r = max(1.5, rng.uniform(1.8, 4.0) * scale ** 0.5)
            solid = rng.random() < 0.35
            t = toward(rng.uniform(-80.0, 30.0), contrast_c) if solid else toward(rng.uniform(-450.0, -250.0), contrast)
            lo, hi, fn = _sphere_lesion(p, r, t, solid, geom.ps)
            counts = canvas.paint(lo, hi, fn, force_peak=True)
            if counts is None:
                continue
            record("nodule", side, p, r, "centrilobular_nodule", counts, solid=bool(solid), target_hu=round(t))
            placed += 1
        return lesions, extra_airways

    raise ValueError(label)


# ---------------------------------------------------------------------------------------------- slice painting
def _paint_slice(i: int, an: _Anatomy, gr: _Grids, geom: _Geom, vols: dict, rng_noise: np.random.Generator,
                 noise_hu: float, kern_norm: float, granulomas: list) -> np.ndarray:
    zz = float(geom.zz(i))
    ps, dz = geom.ps, geom.dz
    X, Y, absX = gr.X, gr.Y, gr.absX
    M = geom.M
    img = np.full((M, M), -1000.0, np.float32)

    # scanner table (image frame): two carbon shells around a foam core, curved up at the edges
    tt = np.float32(geom.ty + max(an.Y_back(z) for z in (0.0, an.L * 0.5, an.L)) + an.table_gap + 2.0)
    dtab = gr.Yi - (tt - np.float32(an.table_curve) * gr.Xi ** 2)
    inside = np.abs(gr.Xi) < 215.0
    shell = (_soft(-dtab, ps) * _soft(dtab - 3.0, ps) + _soft(-(dtab - 15.0), ps) * _soft(dtab - 18.0, ps)) * inside
    core = _soft(-(dtab - 3.0), ps) * _soft(dtab - 15.0, ps) * inside
    _mix(img, np.float32(220.0), shell)
    _mix(img, np.float32(-880.0), core)

    # body wall layers
    bf = _body_fields(an, gr, zz)
    sd = bf["sd"]
    _mix(img, np.float32(20.0), _soft(sd, ps))
    _mix(img, np.float32(an.hu_fat), _soft(sd + an.skin, ps))
    _mix(img, np.float32(an.hu_muscle), _soft(sd + bf["d2"], ps))
    depth = -sd
    # scapulae (upper posterolateral chest wall)
    if an.zz_apex - 20.0 < zz < an.zz_apex + 0.42 * an.H:
        zt = (zz - (an.zz_apex - 20.0)) / (0.42 * an.H + 20.0)
        lo_psi, hi_psi = 0.45 + 0.4 * zt, 1.3 - 0.35 * zt
        dpl = bf["d2"] + 0.35 * (bf["d3"] - bf["d2"])
        f_sc = _soft(dpl - depth, ps) * _soft(depth - dpl - 3.5, ps)
        f_sc *= ((gr.psi > lo_psi) & (gr.psi < hi_psi))
        _mix(img, np.float32(550.0), f_sc)
    # thoracic cavity: mediastinal fat (neck soft tissue above the lung apices)
    f_cav = _soft(sd + bf["d4"], ps)
    fill = an.hu_fat + (35.0 - an.hu_fat) * float(np.clip((an.zz_apex + 5.0 - zz) / 25.0, 0, 1))
    _mix(img, np.float32(fill), f_cav)
    # paraspinal muscles (behind the ribs' posterior ends, so drawn first)
    rx, ry, yvb, ycan, rc = an.rx_vb(zz), an.ry_vb(zz), an.Y_vb(zz), an.Y_can(zz), an.r_can
    bb = gr.bbox(-rx - 60 * an.s, rx + 60 * an.s, yvb - ry - 5, ycan + 60)
    if bb is not None:
        sub = img[bb]
        xp, yp, axp, ayp = an.paraspinal(zz)
        for sgn in (-1.0, 1.0):
            sdp = _ellipse_sd(X[bb] - np.float32(sgn * xp), Y[bb] - np.float32(yp), axp, ayp)
            _mix(sub, np.float32(an.hu_muscle), _soft(sdp, ps) * _soft(bf["sd"][bb] + an.skin + 1.0, ps))
    # ribs, costal cartilage, sternum: inside the chest-wall band between the muscle layer and the cavity
    band = (depth > bf["d3"] - ps) & (depth < bf["d4"] + ps) & (gr.psi > 0.2)
    if band.any():
        bi = np.nonzero(band)
        uu = (depth[bi] - bf["d3"][bi]) / an.wall
        psi = gr.psi[bi]
        left = X[bi] > 0
        val = img[bi]
        psi0 = 0.28
        phi = np.clip((psi - psi0) / (math.pi - psi0), 0, 1)
        for k in range(1, 13):
            zk0 = an.zz_T1 + (k - 0.3) * an.vh
            drop = an.vh * (3.2 + 1.8 * math.sin(math.pi * k / 13.0))
            end = {11: 0.55, 12: 0.4}.get(k, 0.93 if k <= 7 else 0.80)
            cart = end - (0.14 if k <= 7 else 0.18) if k <= 10 else 2.0
            zk = zk0 + drop * phi ** 1.3
            if np.min(np.abs(zz - zk)) > 12.0:
                continue
            hh = (3.5 + 2.5 * math.sin(math.pi * k / 13.0)) * an.s ** 0.5
            th = 0.42 * an.wall
            for side_left in (False, True):
                m = (left == side_left) & (phi <= end) & (phi > 0)
                if not m.any():
                    continue
                qz = (zz - zk[m]) / hh
                qu = (uu[m] - 0.5) * an.wall / th
                q = np.sqrt(qz * qz + qu * qu)
                f = np.clip((1 - q) * min(hh, th) / ps + 0.5, 0, 1)
                hu = np.where(phi[m] > cart, 120.0, np.where(q > 0.62, an.hu_cortical, an.hu_cancellous))
                v = val[m]
                val[m] = v + f * (hu - v)
        img[bi] = val
    if an.zz_apex - 10.0 < zz < an.zz_domeR + 5.0:
        w_st = 13.0 + 10.0 * float(np.clip((an.zz_carina - zz) / 40.0, 0, 1))
        bb = gr.bbox(-w_st - 5, w_st + 5, -an.b_ant(zz) - 5, -an.b_ant(zz) + 50)
        if bb is not None:
            dd = depth[bb]
            uu = (dd - bf["d3"][bb]) / an.wall
            q = np.sqrt((X[bb] / w_st) ** 2 + ((uu - 0.5) / 0.45) ** 2)
            f = np.clip((1 - q) * 4.0 / ps + 0.5, 0, 1) * gr.ant[bb]
            hu = np.where(q > 0.75, 0.8 * an.hu_cortical, an.hu_cancellous)
            _mix(img[bb], hu.astype(np.float32), f.astype(np.float32))

    # below the diaphragm: liver, stomach (air-fluid level), spleen, fat
    below = an.zz_domeR - zz < 0.5 * max(dz, ps)
    zd = _diaphragm_z(an, gr, zz) if below else None
    f_abd = f_cav * np.clip(0.5 + (zz - zd) / np.float32(max(dz, ps)), 0.0, 1.0) if below else None
    if below and f_abd.max() > 0:
        a_c = an.a_cav(zz)
        liv = _soft(X - np.float32(0.2 * a_c) + 0.3 * Y, 3.0 * ps)
        _mix(img, np.float32(an.hu_liver), f_abd * liv)
        for (cz, cx, cy, az, axx, ayy, kind) in (
                (an.zz_domeL + 50.0, 0.42 * a_c, -0.1 * an.b_cav_ant(zz), 55.0, 40.0, 40.0, "stomach"),
                (an.zz_domeL + 62.0, 0.72 * a_c, 0.45 * an.Y_cav_post(zz), 55.0, 24.0, 45.0, "spleen")):
            v = 1 - ((zz - cz) / (az * an.s)) ** 2
            if v <= 0:
                continue
            sx, sy = axx * an.s * math.sqrt(v), ayy * an.s * math.sqrt(v)
            sdo = _ellipse_sd(X - np.float32(cx), Y - np.float32(cy), sx, sy)
            fo = _soft(sdo, ps) * f_abd
            if kind == "spleen":
                _mix(img, np.float32(46.0), fo)
            else:
                _mix(img, np.float32(40.0), fo)  # wall
                fi = _soft(sdo + 3.0, ps) * f_abd
                gas = _soft(Y - np.float32(cy - 0.25 * sy), ps)
                _mix(img, np.float32(12.0), fi * (1 - gas))
                # the gas sits under the diaphragm muscle and stomach wall (~6 mm), never against the lung
                deep = np.clip(0.5 + (zz - zd - 6.0) / np.float32(max(dz, ps)), 0.0, 1.0)
                _mix(img, np.float32(-1000.0), fi * gas * deep)

    # spine: vertebral body (cortex + cancellous bone, discs), canal, posterior elements; paraspinal muscles
    bb = gr.bbox(-rx - 40 * an.s, rx + 40 * an.s, yvb - ry - 5, ycan + 60)
    if bb is not None:
        Xb, Yb = X[bb], Y[bb]
        sub = img[bb]
        ps_ = np.float32(ps)
        lev = (zz - an.zz_T1) / an.vh
        frac = lev - math.floor(lev)
        disc_t = 0.2
        ov = max(0.0, min(zz + dz / 2, (math.floor(lev) + disc_t / 2) * an.vh + an.zz_T1)
                 - max(zz - dz / 2, (math.floor(lev) - disc_t / 2) * an.vh + an.zz_T1))
        ov += max(0.0, min(zz + dz / 2, (math.floor(lev) + 1 + disc_t / 2) * an.vh + an.zz_T1)
                  - max(zz - dz / 2, (math.floor(lev) + 1 - disc_t / 2) * an.vh + an.zz_T1))
        wd = min(1.0, ov / dz)
        sdv = _ellipse_sd(Xb, Yb - np.float32(yvb), rx, ry)
        hu_ring = an.hu_cortical + wd * (90.0 - an.hu_cortical)
        hu_in = an.hu_cancellous + wd * (90.0 - an.hu_cancellous)
        _mix(sub, np.float32(hu_ring), _soft(sdv, ps))
        _mix(sub, np.float32(hu_in), _soft(sdv + 1.8, ps))
        rr = np.sqrt(Xb * Xb + (Yb - np.float32(ycan)) ** 2)
        if frac < 0.75:  # pedicles + laminae
            ring = _soft(rr - (rc + 5.0), ps_) * _soft(rc - rr, ps_) * (Yb > ycan - 0.6 * rc)
            _mix(sub, np.float32(0.7 * an.hu_cortical), ring)
        if 0.1 < frac < 0.55:  # transverse processes toward the rib heads
            ytp = np.float32(ycan - 1.0) + 0.35 * (np.abs(Xb) - rc)  # angled posterolaterally
            tp = _soft(np.abs(Yb - ytp) - 3.0, ps_) * _soft(np.abs(Xb) - (rx + 16.0 * an.s), ps_) \
                * (np.abs(Xb) > rc + 2.0)
            _mix(sub, np.float32(0.6 * an.hu_cortical), tp)
        if 0.3 < frac < 0.95:  # spinous process
            sp = _soft(np.abs(Xb) - 3.2, ps_) * _soft(Yb - np.float32(ycan + rc + 30.0 * an.s), ps_) * \
                (Yb > ycan + rc) * _soft(bf["sd"][bb] + an.skin + 2.0, ps)
            _mix(sub, np.float32(0.7 * an.hu_cortical), sp)
        _mix(sub, np.float32(15.0), _soft(rr - rc, ps_))

    # heart
    hs = an.heart_section(zz)
    if hs is not None:
        A, B = hs
        e = max(A, B) + 5.0
        bb = gr.bbox(an.hX - e, an.hX + e, an.hY - e, an.hY + e)
        if bb is not None:
            c, s_ = math.cos(an.h_ang), math.sin(an.h_ang)
            dx, dy = X[bb] - np.float32(an.hX), Y[bb] - np.float32(an.hY)
            sdh = _ellipse_sd(dx * c - dy * s_, dx * s_ + dy * c, A, B)
            fh = _soft(sdh, ps)
            if zd is not None:
                fh = fh * _soft(np.float32(zz) - zd[bb], max(dz, ps))
            _mix(img[bb], np.float32(42.0), fh)

    # mediastinal tubes (aorta, great vessels, SVC, oesophagus, pulmonary arteries/veins, central airway walls)
    mt = vols["medtube"][i].astype(np.float32) * np.float32(1 / 255.0)
    _mix(img, np.float32(40.0), mt)

    # lungs: parenchyma with an anterior->posterior gradient and dependent density at the posterior bases
    fl = vols["lung_soft"][i].astype(np.float32) * np.float32(1 / 255.0)
    if fl.max() > 0:
        bca, ycp = an.b_cav_ant(zz), an.Y_cav_post(zz)
        P = np.float32(an.lung_base) + np.float32(an.lung_grad) * np.clip((Y + bca) / (bca + ycp), 0, 1)
        lm = vols["lung"][i] > 0
        cols = lm.any(axis=0)
        if cols.any():
            last = (M - 1 - np.argmax(lm[::-1, :], axis=0)).astype(np.float32)
            dist = (last[None, :] - gr.rows[:, None].astype(np.float32)) * np.float32(ps)
            amp = an.dep_amp * float(_sstep((an.zrel(zz) - 0.4) / 0.45))
            if amp > 0:
                P = P + np.float32(amp) * np.exp(-np.maximum(dist, 0) / np.float32(an.dep_len)) * cols[None, :]
        _mix(img, P, fl)
        # major fissures: thin oblique sheets, a faint band on thick slices
        for sgn, side_top, dome in ((-1.0, an.fis_top[0], an.zz_domeR), (1.0, an.fis_top[1], an.zz_domeL)):
            if not side_top < zz < dome + 10.0:
                continue
            y_top, y_bot = ycp, -0.55 * bca
            slope = (y_bot - y_top) / (dome + 10.0 - side_top)
            yf = y_top + (zz - side_top) * slope - 0.55 * (absX - 0.45 * an.a_cav(zz))
            wf = max(ps, dz * abs(slope))
            amp_f = min(600.0, 600.0 * 0.7 / wf)
            ff = np.clip(1 - np.abs(Y - yf) / np.float32(wf), 0, 1) * ((X > 0) if sgn > 0 else (X < 0))
            img += np.float32(amp_f) * ff * fl
        # vessels
        _mix(img, np.float32(40.0), vols["vessel"][i].astype(np.float32) * np.float32(1 / 255.0) * fl)
        # calcified granulomas (normal finding, not a lesion)
        for (gz, gx, gy, gr_r, ghu) in granulomas:
            if abs(zz - gz) < gr_r + dz / 2:
                bbg = gr.bbox(gx - gr_r - 3, gx + gr_r + 3, gy - gr_r - 3, gy + gr_r + 3)
                if bbg is None:
                    continue
                rz = max(0.0, gr_r * gr_r - (zz - gz) ** 2) ** 0.5
                dd = np.sqrt((X[bbg] - gx) ** 2 + (Y[bbg] - gy) ** 2)
                thin = min(1.0, (rz / ps) ** 2 * math.pi) if rz < ps else 1.0
                _mix(img[bbg], np.float32(ghu), np.clip(0.5 + (rz - dd) / ps, 0, 1) * thin * fl[bbg])
        # lesions: raise toward the lesion density (vessels stay visible inside ground-glass)
        if vols["les_alpha"] is not None:
            la = vols["les_alpha"][i]
            if la.any():
                al = la.astype(np.float32) * np.float32(1 / 255.0) * fl
                tg = vols["les_target"][i].astype(np.float32)
                img += al * np.maximum(tg - img, 0)
    # airways (walls then lumen), only in the lungs and the mediastinal airway tubes
    ao = vols["air_outer"][i]
    if ao.any():
        gate = np.clip(fl + mt, 0, 1)
        _mix(img, np.float32(35.0), ao.astype(np.float32) * np.float32(1 / 255.0) * gate)
        _mix(img, np.float32(-995.0), vols["air_lumen"][i].astype(np.float32) * np.float32(1 / 255.0) * gate)

    # reconstruction: kernel blur with correlated noise, clip, pad outside the circle
    if noise_hu > 0:
        img += rng_noise.standard_normal((M, M), dtype=np.float32) * np.float32(noise_hu / kern_norm)
    img = ndi.gaussian_filter(img, an.blur_px, mode="nearest")
    np.clip(img, HU_MIN, HU_MAX, out=img)
    img[gr.circle] = geom.pad
    return img


def _kernel_noise_norm(sigma: float) -> float:
    """Std of white unit noise after scipy's 2D gaussian_filter(sigma): the 2D variance factor is (sum w^2)^2
    for the separable 1D weights w, so the std factor is sum w^2."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float((w ** 2).sum())


# ------------------------------------------------------------------------------------------------------ driver
def generate_phantom(cfg: PhantomConfig) -> Phantom:
    """Generate one phantom. Same config -> identical arrays. The anatomy and noise depend on ``seed`` only
    (not on the label), so phantoms that share a seed differ only by their lesions."""
    geom, ginfo = _resolve_geometry(cfg)
    label_idx = CLASS_NAMES.index(cfg.label)
    an = _Anatomy(_rng(cfg.seed, 2), geom, ginfo["chest_length_mm"])
    rng_tree = _rng(cfg.seed, 3)
    rng_noise = _rng(cfg.seed, 4)
    rng_les = _rng(cfg.seed, 5, label_idx)
    shape = (geom.n, geom.M, geom.M)
    gr = _Grids(geom)

    # 1) mediastinal tubes and central airways
    cen = _central_structures(an, geom, _rng(cfg.seed, 6))
    medtube = np.zeros(shape, np.uint8)
    wall = cen["airway_wall"]
    _raster_tubes(medtube, cen["tubes"], geom)
    _raster_tubes(medtube, [(p0, p1, r0 + wall(r0), r1 + wall(r1)) for p0, p1, r0, r1 in cen["airway_central"]], geom)
    air_outer = np.zeros(shape, np.uint8)
    air_lumen = np.zeros(shape, np.uint8)
    _raster_tubes(air_outer, [(p0, p1, r0 + wall(r0), r1 + wall(r1)) for p0, p1, r0, r1 in cen["airway_central"]],
                  geom)
    _raster_tubes(air_lumen, cen["airway_central"], geom)

    # 2) lungs, slice by slice
    lung_soft = np.zeros(shape, np.uint8)
    lung = np.zeros(shape, np.uint8)
    right = gr.X < 1.0
    for i in range(geom.n):
        f = _lung_slice(an, gr, geom, float(geom.zz(i)), medtube[i])
        lung_soft[i] = np.rint(f * 255.0).astype(np.uint8)
        hard = f >= 0.5
        lung[i][hard & right] = LUNG_RIGHT
        lung[i][hard & ~right] = LUNG_LEFT
    lung_ml = float((lung > 0).sum()) * geom.dz * geom.ps * geom.ps / 1000.0

    # 3) airway and vessel trees inside each lung
    lp = _LungPoints(lung, geom, an)
    r_air_min = max(1.1, 0.45 * geom.ps)
    r_ves_min = max(0.5, 0.3 * geom.ps)
    vessel = np.zeros(shape, np.uint8)
    airway_segs: dict[int, list[dict]] = {}
    artery_leaves: dict[int, np.ndarray] = {}
    n_segments = 0
    for side in (LUNG_RIGHT, LUNG_LEFT):
        pts = lp.p[lp.of(side)]
        root, direction, r0 = cen["bronchus_root"][side]
        tree = _tree(rng_tree, root, direction, pts, r0, r_min=r_ves_min, g0=2, g_max=16)
        air = [sg for sg in tree if sg["r"] >= r_air_min and sg["gen"] <= 8]
        airway_segs[side] = tree  # full tree (children index into it); airways are its segments with r >= r_air_min
        _raster_tubes(air_outer, [(sg["p0"], sg["p1"], sg["r"] + wall(sg["r"]), sg["r"] + wall(sg["r"])) for sg in air],
                      geom)
        _raster_tubes(air_lumen, [(sg["p0"], sg["p1"], sg["r"], sg["r"]) for sg in air], geom)
        art_root_off = cen["art_root"][side] - root
        arteries = _offset_tree(tree, art_root_off, 0.8, lambda sg: 0.95 * sg["r"])
        _raster_tubes(vessel, arteries, geom)
        artery_leaves[side] = np.array([a[1] for a, sg in zip(arteries, tree) if not sg["children"]]).reshape(-1, 3)
        vroot = cen["vein_root"][side]
        veins = _tree(rng_tree, vroot, _unit(vroot - cen["carina"]), pts, 5.5 * an.s, r_min=r_ves_min, g0=2,
                      g_max=16, frac=0.5, split="minor")
        _raster_tubes(vessel, [(sg["p0"], sg["p1"], sg["r"], sg["r"]) for sg in veins], geom)
        n_segments += len(tree) + len(veins)

    # 4) lesions
    canvas = _LesionCanvas(shape, lung, geom)
    lesions, extra = _place_lesions(cfg.label, rng_les, canvas, lp, an, geom,
                                    {"airway_segs": airway_segs, "artery_leaves": artery_leaves,
                                     "r_air_min": r_air_min}, cfg.difficulty)
    if extra:
        _raster_tubes(air_outer, [(p0, p1, r0 + 0.3, r1 + 0.3) for p0, p1, r0, r1 in extra], geom, weight=0.6)
        _raster_tubes(air_lumen, extra, geom)
    lesion_mask = canvas.label
    lesion_mask[lung == 0] = 0

    # confounders that are not lesions: calcified granulomas (anatomy stream, so shared across labels)
    rng_conf = _rng(cfg.seed, 7)
    granulomas = []
    for _ in range(int(rng_conf.integers(0, 3)) if rng_conf.random() < 0.35 else 0):
        j = int(rng_conf.integers(len(lp.p))) if len(lp.p) else None
        if j is None or lp.depth[j] < 6.0:
            continue
        zg, xg, yg = lp.p[j]
        granulomas.append((float(zg), float(xg), float(yg), float(rng_conf.uniform(1.5, 3.0)),
                           float(rng_conf.uniform(300.0, 800.0))))

    # 5) paint the image slice by slice
    has_les = bool(canvas.alpha.any())
    vols = {"medtube": medtube, "lung_soft": lung_soft, "lung": lung, "vessel": vessel, "air_outer": air_outer,
            "air_lumen": air_lumen, "les_alpha": canvas.alpha if has_les else None,
            "les_target": canvas.target if has_les else None}
    kn = _kernel_noise_norm(an.blur_px)
    hu = np.empty(shape, np.int16)
    for i in range(geom.n):
        img = _paint_slice(i, an, gr, geom, vols, rng_noise, float(cfg.noise_hu), kn, granulomas)
        hu[i] = np.rint(img).astype(np.int16)
    del vols, medtube, lung_soft, vessel, air_outer, air_lumen, canvas

    # 6) study volume + truth
    resolved = dataclasses.replace(cfg, n_slices=geom.n, slice_spacing_mm=geom.dz, pixel_spacing_mm=geom.ps,
                                   pad_hu=geom.pad)
    uid_base = [GENERATOR_VERSION, str(cfg.seed), cfg.label, repr(sorted(resolved.to_dict().items()))]
    study_uid = generate_uid(entropy_srcs=uid_base + ["study"])
    series_uid = generate_uid(entropy_srcs=uid_base + ["series"])
    for_uid = generate_uid(entropy_srcs=uid_base + ["frame-of-reference"])
    ox, oy, oz = geom.origin
    slices = [SliceInfo(index=i, position_mm=round(oz - i * geom.dz, 4),
                        sop_instance_uid=generate_uid(entropy_srcs=uid_base + ["sop", str(i)])) for i in range(geom.n)]
    study = StudyVolume(
        hu=hu, spacing=(geom.dz, geom.ps, geom.ps), origin=(ox, oy, oz), direction=np.diag([1.0, 1.0, -1.0]),
        slices=slices, source_format="synthetic",
        metadata={"modality": "CT", "manufacturer": "pneumoct-synth", "synthetic": True,
                  "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                  "frame_of_reference_uid": for_uid, "generator": GENERATOR_VERSION, "pad_hu": geom.pad,
                  "convolution_kernel": "SYNTH-SOFT", "slice_thickness_mm": geom.dz},
    )
    lung_vox = int((lung > 0).sum())
    les_vox = int((lesion_mask > 0).sum())
    slice_idx = lambda z: int(round((z - geom.zz0) / geom.dz))  # noqa: E731
    anatomy = {
        "lung_volume_ml": round(lung_ml, 1),
        "patient_scale": round(an.s, 3),
        "rotation_deg": ginfo["rotation_deg"],
        "slice_of": {"lung_apex": slice_idx(an.zz_apex), "carina": slice_idx(an.zz_carina),
                     "right_dome": slice_idx(an.zz_domeR), "left_dome": slice_idx(an.zz_domeL),
                     "costophrenic_recess": slice_idx(an.zz_rec)},
        "lung_base_hu": round(an.lung_base, 1),
        "n_tree_segments": n_segments,
        "n_granulomas": len(granulomas),
        "blur_px": round(an.blur_px, 3),
    }
    return Phantom(
        study=study, lung_mask=lung, lesion_mask=lesion_mask, label=cfg.label,
        slice_lesion_labels=(lesion_mask > 0).any(axis=(1, 2)),
        lesion_volume_ratio=float(les_vox / lung_vox) if lung_vox else 0.0,
        lesions=lesions, config=resolved, anatomy=anatomy,
    )
