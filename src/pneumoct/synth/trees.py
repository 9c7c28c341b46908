"""Tubes and trees: the soft-capsule rasteriser and the space-filling airway/vessel tree builders."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .geometry import _Geom, _unit


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
