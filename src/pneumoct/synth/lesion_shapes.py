"""Lesion models: the global lesion canvas (:class:`_LesionCanvas`), smooth random fields, and the ellipsoid, tube
and sphere lesion shapes it composites."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..types import LESION_CONSOLIDATION, LESION_GGO
from .geometry import _Geom, _unit


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
