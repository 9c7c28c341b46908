"""Hybrid training cases: lesions simulated into REAL lung slices (HU), with voxel-exact masks.

Why: the real 2D sets with lesion masks are 8-bit exports (no HU) and show almost only infected slices, and our
phantoms are simple geometric bodies. The three real DICOM studies have slice labels but no masks. Their
lesion-free slices (the normal study, and the radiologist-negative slices of the others) hold real anatomy, vessels,
fissures, noise and reconstruction kernel. Two kinds of rows come from them:

* **weak negatives**: a radiologist-negative slice must be empty (mask all background) — the slice label used as
  weak supervision;
* **hybrids**: the same slices with lesions drawn into the lung, in HU, so the mask is exact. Lesion models (each a
  smooth random blob, often subpleural): ground-glass (-750 … -450 HU, vessels kept visible), crazy paving
  (ground-glass + reticular lines), consolidation (-80 … +60 HU) with air bronchograms and a ground-glass halo,
  lobar consolidation, diffuse faint ground-glass, small centrilobular nodules. Dependent atelectasis (a thin
  posterior subpleural band) is drawn too and is **not** lesion (mask 0), so the network learns to leave it.

Label convention as everywhere (:mod:`pneumoct.types`): 1 ground-glass, 2 consolidation; a simulated region
with mean HU >= -300 counts as consolidation (the threshold baseline's cut).

Every random draw comes from a ``numpy.random.Generator`` seeded by the caller; the same seed gives the same rows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from ..types import LESION_CONSOLIDATION, LESION_GGO

__all__ = ["simulate_lesions_2d", "table_from_ctmd_hybrid", "LESION_MODELS", "NEGATIVE_BUFFER_SLICES"]

log = logging.getLogger("pneumoct.train")

#: lesion models and their draw probabilities (our choice: mostly ground-glass and consolidation, as in the
#: COVID-19 / CAP studies the product sees; the rarer patterns less often)
LESION_MODELS = {"ggo": 0.30, "crazy_paving": 0.10, "consolidation": 0.25, "lobar": 0.07, "diffuse_ggo": 0.10,
                 "nodules": 0.10, "peribronchial": 0.08}
#: radiologist-negative slices this close to a positive one are not used (slice labels are fuzzy at the edges)
NEGATIVE_BUFFER_SLICES = 2
CONSOLIDATION_HU = -300.0


def _smooth_noise(shape, rng, sigma):
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    s = float(n.std()) or 1.0
    return n / s


def _blob(shape, centre, radius_px, rng, irregular=0.35):
    """A smooth irregular blob (bool) around ``centre`` with mean radius ``radius_px``."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    a = radius_px * rng.uniform(0.7, 1.3)
    b = radius_px * rng.uniform(0.7, 1.3)
    th = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dx * np.cos(th) + dy * np.sin(th)) / a
    v = (-dx * np.sin(th) + dy * np.cos(th)) / b
    d = np.sqrt(u * u + v * v)
    return d + irregular * _smooth_noise(shape, rng, max(2.0, radius_px / 3)) < 1.0


def _pick_centre(lung, rng, peripheral_px=None):
    """A lung pixel; with ``peripheral_px`` one within that distance of the lung border (subpleural)."""
    cand = lung
    if peripheral_px is not None:
        edt = ndi.distance_transform_edt(lung)
        band = lung & (edt <= peripheral_px)
        if band.any():
            cand = band
    ys, xs = np.nonzero(cand)
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def _paint(hu, region, level, rng, noise_hu=25.0, keep_vessels=True, soft_px=1.5):
    """Raise ``region`` to ``level`` HU (+ texture), blending over ``soft_px``; vessels stay where brighter."""
    alpha = np.clip(ndi.gaussian_filter(region.astype(np.float32), soft_px) * 1.6, 0, 1)
    tex = level + noise_hu * _smooth_noise(hu.shape, rng, 1.0)
    target = np.maximum(hu, tex) if keep_vessels else tex
    return hu * (1 - alpha) + target * alpha


def _air_bronchograms(region, rng, n=2):
    """Thin branching air tubes inside a consolidation (random walks)."""
    out = np.zeros_like(region)
    ys, xs = np.nonzero(region)
    if len(ys) < 50:
        return out
    for _ in range(n):
        k = int(rng.integers(len(ys)))
        y, x = float(ys[k]), float(xs[k])
        ang = rng.uniform(0, 2 * np.pi)
        for _step in range(int(rng.integers(15, 45))):
            ang += rng.normal(0, 0.25)
            y += np.sin(ang)
            x += np.cos(ang)
            iy, ix = int(round(y)), int(round(x))
            if not (0 <= iy < region.shape[0] and 0 <= ix < region.shape[1]) or not region[iy, ix]:
                break
            out[max(iy - 1, 0): iy + 1, max(ix - 1, 0): ix + 1] = True
    return out & region


def simulate_lesions_2d(hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator, pixel_mm: float,
                        n_lesions: int | None = None, atelectasis_p: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Draw lesions into one HU slice. ``hu`` (Y, X) HU, ``lung`` (Y, X) bool (filled lung), ``pixel_mm`` the
    in-plane pixel size. Returns ``(hu_new float32, mask uint8 0/1/2)``; the mask is exact and inside the lung."""
    hu = np.asarray(hu, np.float32).copy()
    lung = np.asarray(lung, bool)
    mask = np.zeros(hu.shape, np.uint8)
    if lung.sum() < 200:
        return hu, mask
    mm = 1.0 / float(pixel_mm)
    names = list(LESION_MODELS)
    probs = np.array([LESION_MODELS[k] for k in names])
    n = int(n_lesions if n_lesions is not None else rng.integers(1, 4))
    for _ in range(n):
        kind = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        if kind in ("ggo", "crazy_paving", "diffuse_ggo"):
            r = rng.uniform(6, 25) * mm if kind != "diffuse_ggo" else rng.uniform(25, 60) * mm
            c = _pick_centre(lung, rng, 20 * mm if rng.random() < 0.7 else None)
            region = _blob(hu.shape, c, r, rng) & lung
            level = rng.uniform(-750, -450) if kind != "diffuse_ggo" else rng.uniform(-780, -620)
            hu = _paint(hu, region, level, rng)
            if kind == "crazy_paving":
                lines = np.abs(ndi.gaussian_laplace(rng.standard_normal(hu.shape).astype(np.float32), 2.0 * mm * 2))
                lines = lines > np.percentile(lines, 80)
                hu = np.where(region & lines, hu + rng.uniform(80, 200), hu)
            mask[region & (mask == 0)] = LESION_GGO
        elif kind in ("consolidation", "lobar", "peribronchial"):
            if kind == "lobar":
                # a large part of one lung: the lung side of the chosen point, cut by a random line
                lab, nl = ndi.label(lung)
                c = _pick_centre(lung, rng)
                comp = lab == lab[c]
                ang = rng.uniform(0, 2 * np.pi)
                yy, xx = np.indices(hu.shape)
                region = comp & (((yy - c[0]) * np.sin(ang) + (xx - c[1]) * np.cos(ang)) > rng.uniform(-10, 10) * mm)
                region &= ~_blob(hu.shape, c, rng.uniform(3, 8) * mm, rng)  # never perfectly straight edges
                region = ndi.binary_opening(region, iterations=2)
            elif kind == "peribronchial":
                c = _pick_centre(lung, rng)
                region = _blob(hu.shape, c, rng.uniform(4, 9) * mm, rng, irregular=0.5) & lung
            else:
                c = _pick_centre(lung, rng, 25 * mm if rng.random() < 0.5 else None)
                region = _blob(hu.shape, c, rng.uniform(8, 30) * mm, rng) & lung
            if region.sum() < 10:
                continue
            halo = ndi.binary_dilation(region, iterations=max(1, int(rng.uniform(2, 5) * mm))) & lung & ~region
            if rng.random() < 0.6:
                hu = _paint(hu, halo, rng.uniform(-700, -500), rng)
                mask[halo & (mask == 0)] = LESION_GGO
            hu = _paint(hu, region, rng.uniform(-80, 60), rng, noise_hu=20.0, keep_vessels=False)
            if kind != "peribronchial" and rng.random() < 0.6:
                air = _air_bronchograms(region, rng, n=int(rng.integers(1, 4)))
                hu = np.where(air, rng.uniform(-950, -800), hu).astype(np.float32)
            mask[region] = LESION_CONSOLIDATION
        elif kind == "nodules":
            for _k in range(int(rng.integers(5, 20))):
                c = _pick_centre(lung, rng)
                region = _blob(hu.shape, c, rng.uniform(1.5, 3.5) * mm, rng, irregular=0.2) & lung
                level = rng.uniform(-500, -100)
                hu = _paint(hu, region, level, rng, soft_px=0.8)
                mask[region] = LESION_GGO if level < CONSOLIDATION_HU else LESION_CONSOLIDATION
    if rng.random() < atelectasis_p:
        # dependent (posterior) subpleural atelectasis: a thin dense band along the back of the lung — NOT lesion
        yy = np.indices(hu.shape)[0]
        back = np.zeros_like(lung)
        cols = np.nonzero(lung.any(0))[0]
        last = np.full(hu.shape[1], -1)
        for x in cols:
            last[x] = np.nonzero(lung[:, x])[0].max()
        thick = rng.uniform(2, 6) * mm
        back = lung & (yy >= last[None, :] - thick) & (last[None, :] >= 0)
        back &= mask == 0
        hu = _paint(hu, back, rng.uniform(-500, -150), rng, soft_px=1.0)
    return hu.astype(np.float32), mask


def table_from_ctmd_hybrid(root: str | Path | None = None, size: int = 128, *, studies: Sequence[str] = (
        "covid", "cap", "normal"), seed: int = 0, copies: int = 1, negatives: bool = True):
    """Rows from the lesion-free slices of the COVID-CT-MD studies in ``studies``: each as a weak negative (empty
    mask, when ``negatives``) and ``copies`` hybrids with simulated lesions. Sources ``covid-ct-md-negative`` /
    ``covid-ct-md-hybrid``; patient id ``covid-ct-md/<study>`` (a study never straddles a split)."""
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs
    from ..preprocess.slice_input import crop_slice
    from .ctmd import _CTMD_STUDIES, COVID_CT_MD_ROOT, _ctmd_label_rows
    from .table import _table, class_index

    root = Path(root or COVID_CT_MD_ROOT)
    labels = np.load(root / "Slice-level-labels-updated-1.npy")
    rows = _ctmd_label_rows(root)
    rng = np.random.default_rng(int(seed))
    images, masks, sources, pids, plabs, zs = [], [], [], [], [], []
    for key in studies:
        folder, cls, folder_id = _CTMD_STUDIES[key]
        study = read_study(root / "dicom" / folder)
        lung = segment_lungs(study).labels > 0
        nz = study.shape[0]
        sl = np.zeros(nz, np.int64) if folder_id is None else labels[rows[folder_id], :nz].astype(np.int64)
        near_pos = ndi.binary_dilation(sl > 0, iterations=NEGATIVE_BUFFER_SLICES) if sl.any() else sl > 0
        pixel_mm = float(min(study.spacing[1], study.spacing[2]))
        for z in np.flatnonzero(~near_pos):
            if negatives:
                c = crop_slice(study.hu[z], lung[z], size, mask=np.zeros(lung[z].shape, np.uint8))
                if c is None:
                    continue
                images.append(c.image), masks.append(c.mask), sources.append("covid-ct-md-negative")
                pids.append(f"covid-ct-md/{key}"), plabs.append(cls), zs.append(int(z))
            for _ in range(int(copies)):
                hu2, m2 = simulate_lesions_2d(study.hu[z], lung[z], rng, pixel_mm)
                c = crop_slice(hu2, lung[z], size, mask=m2)
                if c is None or not c.mask.any():
                    continue
                images.append(c.image), masks.append(c.mask), sources.append("covid-ct-md-hybrid")
                pids.append(f"covid-ct-md/{key}"), plabs.append(cls), zs.append(int(z))
        log.info("hybrid cases: %s, %d rows so far", key, len(images))
    n = len(images)
    return _table(images, is_hu=True, class_label=[class_index(p) for p in plabs],
                  lesion_label=[int(m.any()) for m in masks], masks=masks, patient_id=pids,
                  patient_label=[class_index(p) for p in plabs], slice_index=zs, source=sources, size=size)
