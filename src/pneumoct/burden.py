"""The validated headline: abnormal probability from the measured lesion burden, calibrated on real studies.

Why this and not a four-class network: on real studies never seen in training, the phantom-trained M3Lung-Sys
patient network got 3 of 3 headlines wrong, while the lesion burden separated them. With three real labelled DICOM
studies, a patient-level calibration would rest on three points; so the unit of calibration is the **slab**: the
lungs cut into consecutive ``SLAB_MM`` (40 mm) craniocaudal slabs, each labelled positive when the radiologists
marked at least ``MIN_POSITIVE_SLICES`` of its slices as showing infection (COVID-CT-MD slice labels; every slab of
the normal study is negative). Negative labels are weaker than positive ones: an unmarked slab next to a marked one
(or with a single marked slice) is left out of the fit. A logistic regression on ``log(1 + lesion mL in the slab)`` gives each slab's
probability of holding radiologist-visible infection; the study's abnormal probability is that of its most
involved slab (a study is abnormal when any part of its lungs is). Its uncertainty is the 5-95 % range over
bootstrap refits (slabs resampled by study-stratified bootstrap).

The per-slice ``lesion_probability`` is the same idea one level down: logistic on ``log(1 + lesion area mm2)``
fitted on the radiologist slice labels.

Both are fitted by ``experiments/real_validation.py`` on the lesion masks of the mask method ``diagnose`` uses,
validated leave-one-study-out there (fitted on two studies, measured on the third), then refitted on all three and
shipped as ``weights/lesion_burden/calibration.json``. Functions here only apply (and fit) the calibration; they
never look at data themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["SLAB_MM", "MIN_POSITIVE_SLICES", "slab_table", "fit_logistic_1d", "fit_calibration",
           "apply_calibration", "slice_probability", "load_calibration", "CALIBRATION_FILE"]

SLAB_MM = 40.0
#: a slab counts as radiologist-positive from this many positive slices (one label at a slab edge is fuzzy)
MIN_POSITIVE_SLICES = 2
CALIBRATION_FILE = "calibration.json"
BUNDLED_KEY = "lesion_burden"


def slab_table(lesion_area_mm2: Sequence[float], slice_mm: float, lung_area_mm2: Sequence[float],
               slice_labels: Sequence[int] | None = None, slab_mm: float = SLAB_MM) -> list[dict[str, Any]]:
    """Cut the slices that hold lung into consecutive slabs of ``slab_mm``; per slab: slice range [z0, z1), lesion
    and lung volume (mL) and, with ``slice_labels``, the number of radiologist-positive slices and the slab label."""
    area = np.asarray(lesion_area_mm2, np.float64)
    lung = np.asarray(lung_area_mm2, np.float64)
    zs = np.flatnonzero(lung > 0)
    if zs.size == 0:
        return []
    n = max(1, int(round(float(slab_mm) / max(float(slice_mm), 1e-3))))
    out = []
    for z0 in range(int(zs[0]), int(zs[-1]) + 1, n):
        z1 = min(z0 + n, int(zs[-1]) + 1)
        row = {"z0": z0, "z1": z1,
               "lesion_ml": float(area[z0:z1].sum() * slice_mm / 1000.0),
               "lung_ml": float(lung[z0:z1].sum() * slice_mm / 1000.0)}
        if slice_labels is not None:
            pos = int(np.asarray(slice_labels)[z0:z1].sum())
            row["positive_slices"] = pos
            row["label"] = int(pos >= MIN_POSITIVE_SLICES) if pos == 0 or pos >= MIN_POSITIVE_SLICES else -1
        out.append(row)
    if slice_labels is not None:
        # weak labels: a radiologist-positive slab is reliable; an unmarked slab right beside marked disease is not
        # (in cap-cap001 the slabs just below the marked ones show unmarked consolidation), so it is not used (-1)
        pos_slab = [r["label"] == 1 for r in out]
        for i, r in enumerate(out):
            if r["label"] == 0 and ((i > 0 and pos_slab[i - 1]) or (i + 1 < len(out) and pos_slab[i + 1])):
                r["label"] = -1
    return out


def _feature(ml_or_mm2: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(ml_or_mm2, np.float64), 0.0))


def fit_logistic_1d(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[float, float]:
    """(w, b) of sigmoid(w x + b) by Newton's method with a small ridge on w (keeps separable data finite)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.zeros(2)
    xa = np.stack([x, np.ones_like(x)], 1)
    reg = np.diag([l2, 0.0])
    for _ in range(200):
        q = 1.0 / (1.0 + np.exp(-(xa @ w)))
        g = xa.T @ (q - y) + reg @ w
        h = (xa * (q * (1 - q))[:, None]).T @ xa + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def fit_calibration(studies: Sequence[dict[str, Any]], *, n_boot: int = 200, seed: int = 0,
                    l2: float = 1e-2) -> dict[str, Any]:
    """Fit the slab and slice calibrations. ``studies``: dicts with ``lesion_area_mm2`` (Z,), ``lung_area_mm2``
    (Z,), ``slice_mm`` and ``slice_labels`` (Z,) 0/1. Bootstrap: studies' slabs resampled within each study."""
    rng = np.random.default_rng(int(seed))
    slabs = [slab_table(s["lesion_area_mm2"], s["slice_mm"], s["lung_area_mm2"], s["slice_labels"]) for s in studies]
    slabs = [[r for r in t if r["label"] >= 0] for t in slabs]  # -1: too close to marked disease to be a negative
    xs = [np.array([_feature(r["lesion_ml"]) for r in t]) for t in slabs]
    ys = [np.array([r["label"] for r in t], np.float64) for t in slabs]
    x, y = np.concatenate(xs), np.concatenate(ys)
    w, b = fit_logistic_1d(x, y, l2)
    boot = []
    for _ in range(int(n_boot)):
        bx, by = [], []
        for xi, yi in zip(xs, ys):
            if not len(xi):
                continue
            k = rng.integers(0, len(xi), len(xi))
            bx.append(xi[k])
            by.append(yi[k])
        bx, by = np.concatenate(bx), np.concatenate(by)
        if by.min() == by.max():
            continue
        boot.append(fit_logistic_1d(bx, by, l2))
    # slices: only those with lung
    sx, sy = [], []
    for s in studies:
        lung = np.asarray(s["lung_area_mm2"]) > 0
        sx.append(_feature(np.asarray(s["lesion_area_mm2"])[lung]))
        sy.append(np.asarray(s["slice_labels"])[lung])
    sw, sb = fit_logistic_1d(np.concatenate(sx), np.concatenate(sy).astype(np.float64), l2)
    return {
        "slab_mm": SLAB_MM, "min_positive_slices": MIN_POSITIVE_SLICES,
        "slab": {"w_log1p_lesion_ml": w, "bias": b, "bootstrap": [list(p) for p in boot]},
        "slice": {"w_log1p_area_mm2": sw, "bias": sb},
        "n_slabs": int(len(y)), "n_positive_slabs": int(y.sum()),
        "n_slices": int(sum(len(v) for v in sy)),
    }


def _sig(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def slice_probability(cal: dict[str, Any], lesion_area_mm2: Sequence[float]) -> np.ndarray:
    """(Z,) per-slice probability of radiologist-visible infection from the slice's lesion area."""
    c = cal["slice"]
    return _sig(float(c["w_log1p_area_mm2"]) * _feature(lesion_area_mm2) + float(c["bias"])).astype(np.float32)


def apply_calibration(cal: dict[str, Any], lesion_area_mm2: Sequence[float], lung_area_mm2: Sequence[float],
                      slice_mm: float) -> dict[str, Any]:
    """The study's abnormal probability (its most involved slab), the 5-95 % bootstrap range, and the slabs."""
    slabs = slab_table(lesion_area_mm2, slice_mm, lung_area_mm2, slab_mm=float(cal.get("slab_mm", SLAB_MM)))
    if not slabs:
        return {"abnormal_probability": 0.0, "interval_90": [0.0, 0.0], "max_slab": None, "slabs": []}
    c = cal["slab"]
    feats = np.array([_feature(r["lesion_ml"]) for r in slabs])
    p = _sig(float(c["w_log1p_lesion_ml"]) * feats + float(c["bias"]))
    k = int(np.argmax(feats))
    for r, pv in zip(slabs, p):
        r["probability"] = round(float(pv), 4)
        r["lesion_ml"] = round(r["lesion_ml"], 3)
        r["lung_ml"] = round(r["lung_ml"], 3)
    boot = np.array(c.get("bootstrap") or [], np.float64).reshape(-1, 2)
    if len(boot):
        bp = _sig(boot[:, 0] * feats[k] + boot[:, 1])
        lo, hi = (float(v) for v in np.percentile(bp, [5, 95]))
    else:
        lo = hi = float(p[k])
    return {"abnormal_probability": round(float(p[k]), 4), "interval_90": [round(lo, 4), round(hi, 4)],
            "max_slab": slabs[k], "slabs": slabs,
            # the lesion volume in one slab at which the calibration says 0.5
            "slab_ml_at_half": round(float(np.expm1(-float(c["bias"]) / float(c["w_log1p_lesion_ml"]))), 3)
            if float(c["w_log1p_lesion_ml"]) > 0 else None}


def load_calibration(weights_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The shipped calibration (``weights/lesion_burden/calibration.json``; ``$PNEUMOCT_WEIGHTS`` honoured), or
    None when absent."""
    if weights_dir is None:
        from .learned import bundled_weights_dir

        weights_dir = bundled_weights_dir()
    path = Path(weights_dir) / BUNDLED_KEY / CALIBRATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
