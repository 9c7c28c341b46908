"""Slice painting: HU image of one slice from the anatomy, the rasterised volumes and the lesion canvas, with
kernel blur and correlated noise."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .anatomy import _Anatomy, _body_fields, _diaphragm_z, _Grids
from .geometry import _ellipse_sd, _Geom, _mix, _soft, _sstep

HU_MIN, HU_MAX = -1024, 3071


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

