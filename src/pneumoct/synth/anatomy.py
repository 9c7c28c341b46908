"""Patient anatomy: drawn body parameters (:class:`_Anatomy`), the mediastinal tubes and central airways, and the
per-slice trunk fields and soft lung fraction."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..types import LUNG_LEFT, LUNG_RIGHT
from .geometry import _ellipse_sd, _Geom, _soft, _sstep, _unit
from .trees import _polyline


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
        # reconstruction-kernel blur is a property of the kernel in mm, not of the matrix: sigma 0.40-0.72 mm
        # (soft to standard kernels); in pixels it shrinks on a coarse matrix, where the pixel box already blurs
        self.blur_px = u(0.55, 1.0) * 0.72 / geom.ps

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
    _close_toward_midline(f, medtube, X, ps)
    return f


def _close_toward_midline(f: np.ndarray, medtube: np.ndarray, X: np.ndarray, ps: float, fillet_mm: float = 12.0) -> None:
    """Mediastinal tubes (SVC, great vessels, pulmonary artery and vein roots, main bronchi) lie in mediastinal and
    hilar fat: the lung borders them laterally and never wraps round their medial side. Without this a tube that
    leaves the mediastinal ellipses (the SVC on a narrow mediastinum) sat in an island of lung, which no real chest
    shows and which a lung mask rightly fills. Per image row, lung between the midline and the most lateral tube
    pixel is removed, with a 45° fat fillet of up to ``fillet_mm`` above and below the tube (the mediastinal contour
    is smooth; a vessel bulging from a thin strip would leave a notch that a lung mask's closing fills)."""
    mt = medtube >= 128
    if not mt.any():
        return
    K = int(fillet_mm / ps)
    off = np.abs(np.arange(-K, K + 1)) * np.float32(ps)
    for sel, sign in ((mt & (X < 1.0), 1.0), (mt & (X >= 1.0), -1.0)):
        if not sel.any():
            continue
        # distance of the tube's lateral edge from the midline, per row (-inf where the row holds no tube)
        reach = np.where(sel, sign * (1.0 - X), -np.inf).max(axis=1)
        pad = np.concatenate([np.full(K, -np.inf), reach, np.full(K, -np.inf)])
        win = np.lib.stride_tricks.sliding_window_view(pad, 2 * K + 1)
        reach = (win - off[None, :]).max(axis=1)
        rows = np.flatnonzero(reach > 0)
        d = sign * (1.0 - X[rows])  # distance from the midline toward this side
        cut = (d >= 0) & (d <= reach[rows, None])
        f[rows] = np.where(cut, np.float32(0.0), f[rows])
