"""Class-specific lesion placement: lung sample points (:class:`_LungPoints`) and :func:`_place_lesions`."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ..types import LUNG_LEFT, LUNG_RIGHT
from .anatomy import _Anatomy
from .geometry import _Geom, _native, _unit
from .lesion_shapes import _ellipsoid_lesion, _frame_from_normal, _LesionCanvas, _sphere_lesion, _tube_lesion
from .trees import _tree


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
