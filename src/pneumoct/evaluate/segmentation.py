"""Segmentation metrics for lesion masks: overlap, soft-map, structure (E-/S-measure) and surface metrics in mm.

All functions take ``pred`` and ``truth`` as binary masks of the same shape: a 2D image ``(Y, X)`` or a 3D volume
``(Z, Y, X)`` (any non-zero value counts as foreground). Distances are in millimetres given ``spacing`` (mm per axis,
same order as the array axes, e.g. ``(z, y, x)``); without ``spacing`` one unit per voxel is used.

Empty-mask convention (the same everywhere, see ``docs/segmentation_metrics.md``):

* both ``pred`` and ``truth`` empty: Dice = IoU = NSD = 1, ASSD = RMSD = HD95 = 0 (perfect agreement);
* exactly one empty: Dice = IoU = NSD = 0 and ASSD = RMSD = HD95 = ``inf`` (no surface to measure to). In
  :func:`segmentation_report` ``inf`` is written as ``None``, counted in ``n_empty_pred`` / ``n_empty_truth`` and
  left out of the distance aggregates;
* sensitivity is ``None`` when ``truth`` is empty, precision is ``None`` when ``pred`` is empty, specificity is
  ``None`` when ``truth`` fills the whole array.

Every undefined value is ``None``, never NaN, so reports go through ``json.dumps(..., allow_nan=False)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

_EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps, used by the reference E-/S-measure code

OVERLAP_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision")
STRUCTURE_METRICS = ("e_measure", "s_measure")
DISTANCE_METRICS = ("assd", "rmsd", "hd95")
REPORT_METRICS = OVERLAP_METRICS + STRUCTURE_METRICS + ("nsd",) + DISTANCE_METRICS + ("mae",)


# ------------------------------------------------------------------------------------------------------------ helpers
def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape, got {p.shape} and {t.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (Y, X) or 3D (Z, Y, X), got ndim={p.ndim}")
    if p.size == 0:
        raise ValueError("masks must not be empty arrays")
    return p.astype(bool), t.astype(bool)


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim:
        raise ValueError(f"spacing must have {ndim} values (one per axis), got {len(s)}")
    if not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be finite and > 0, got {s}")
    return s


def _counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


# ---------------------------------------------------------------------------------------------------- overlap metrics
def dice(pred: Any, truth: Any) -> float:
    """Dice = 2|P∩T| / (|P| + |T|); 1.0 when both masks are empty, 0.0 when exactly one is."""
    p, t = _pair(pred, truth)
    tp, fp, fn, _ = _counts(p, t)
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2.0 * tp / den


def iou(pred: Any, truth: Any) -> float:
    """IoU (Jaccard) = |P∩T| / |P∪T|; 1.0 when both masks are empty, 0.0 when exactly one is."""
    p, t = _pair(pred, truth)
    tp, fp, fn, _ = _counts(p, t)
    den = tp + fp + fn
    return 1.0 if den == 0 else tp / den


def sensitivity(pred: Any, truth: Any) -> float | None:
    """Sensitivity = recall = TP / (TP + FN); ``None`` when ``truth`` is empty."""
    p, t = _pair(pred, truth)
    tp, _, fn, _ = _counts(p, t)
    return None if tp + fn == 0 else tp / (tp + fn)


recall = sensitivity


def specificity(pred: Any, truth: Any) -> float | None:
    """Specificity = TN / (TN + FP); ``None`` when ``truth`` is foreground everywhere."""
    p, t = _pair(pred, truth)
    _, fp, _, tn = _counts(p, t)
    return None if tn + fp == 0 else tn / (tn + fp)


def precision(pred: Any, truth: Any) -> float | None:
    """Precision = TP / (TP + FP); ``None`` when ``pred`` is empty."""
    p, t = _pair(pred, truth)
    tp, fp, _, _ = _counts(p, t)
    return None if tp + fp == 0 else tp / (tp + fp)


def mae(prob_map: Any, truth: Any) -> float:
    """Mean absolute error between a soft map in [0, 1] and the binary truth, over all pixels/voxels."""
    m = np.asarray(prob_map, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    if m.shape != t.shape:
        raise ValueError(f"prob_map and truth must have the same shape, got {m.shape} and {t.shape}")
    if m.size == 0:
        raise ValueError("prob_map must not be empty")
    if not np.all(np.isfinite(m)) or m.min() < 0.0 or m.max() > 1.0:
        raise ValueError("prob_map values must be finite and in [0, 1]")
    return float(np.mean(np.abs(m - t)))


# ------------------------------------------------------------------------------------------------------- E-measure
def e_measure(pred: Any, truth: Any) -> float:
    """Enhanced-alignment measure E_φ of a binary foreground map (Fan et al., IJCAI 2018), as used by JCS.

    With bias matrices ``a_T = T - mean(T)`` and ``a_P = P - mean(P)`` the alignment matrix is
    ``φ = 2 a_T∘a_P / (a_T² + a_P² + eps)`` and the enhanced alignment ``(1 + φ)² / 4``; the score is its mean over
    all pixels (voxels for a 3D volume, the formula has no 2D-specific term). Special cases of the reference code:
    ``truth`` all zeros → enhanced matrix ``1 - P`` (score = fraction of background predicted as background);
    ``truth`` all ones → enhanced matrix ``P``. Identical non-trivial masks give 1, complementary masks give 0.

    The reference MATLAB code divides the sum by ``N - 1 + eps`` instead of ``N``; we use the plain mean so that a
    perfect map scores exactly 1 (the difference is below 1e-4 for any image larger than 100 × 100).
    For a binary map the "mean E-measure over thresholds" that saliency papers report equals this value.
    """
    p, t = _pair(pred, truth)
    fm = p.astype(np.float64)
    gt = t.astype(np.float64)
    n_fg = int(np.count_nonzero(t))
    if n_fg == 0:
        enhanced = 1.0 - fm
    elif n_fg == t.size:
        enhanced = fm
    else:
        a_fm = fm - fm.mean()
        a_gt = gt - gt.mean()
        align = 2.0 * (a_gt * a_fm) / (a_gt * a_gt + a_fm * a_fm + _EPS)
        enhanced = (align + 1.0) ** 2 / 4.0
    return float(np.mean(enhanced))


# ------------------------------------------------------------------------------------------------------- S-measure
def _s_object(x_map: np.ndarray, region: np.ndarray) -> float:
    vals = x_map[region]
    if vals.size == 0:
        return 0.0
    x = float(vals.mean())
    sigma = float(vals.std(ddof=1)) if vals.size > 1 else 0.0  # MATLAB std (N-1); std of one value is 0
    return 2.0 * x / (x * x + 1.0 + sigma + _EPS)


def _ssim(x_map: np.ndarray, gt: np.ndarray) -> float:
    n = x_map.size
    x = float(x_map.mean())
    y = float(gt.mean())
    sx2 = float(np.sum((x_map - x) ** 2)) / (n - 1 + _EPS)
    sy2 = float(np.sum((gt - y) ** 2)) / (n - 1 + _EPS)
    sxy = float(np.sum((x_map - x) * (gt - y))) / (n - 1 + _EPS)
    alpha = 4.0 * x * y * sxy
    beta = (x * x + y * y) * (sx2 + sy2)
    if alpha != 0:
        return alpha / (beta + _EPS)
    if beta == 0:
        return 1.0
    return 0.0


def _matlab_round(v: float) -> int:
    return int(math.floor(v + 0.5))  # v >= 0: round half away from zero


def _s_region(fm: np.ndarray, gt: np.ndarray) -> float:
    rows, cols = gt.shape
    total = float(gt.sum())
    if total == 0:  # not reached from s_measure (empty truth is a special case), kept as in the reference
        cx, cy = _matlab_round(cols / 2), _matlab_round(rows / 2)
    else:  # 1-based centroid, as in the reference
        cx = _matlab_round(float(np.sum(gt.sum(axis=0) * np.arange(1, cols + 1))) / total)
        cy = _matlab_round(float(np.sum(gt.sum(axis=1) * np.arange(1, rows + 1))) / total)
    area = float(rows * cols)
    quads = [
        (slice(0, cy), slice(0, cx), cx * cy / area),
        (slice(0, cy), slice(cx, cols), (cols - cx) * cy / area),
        (slice(cy, rows), slice(0, cx), cx * (rows - cy) / area),
        (slice(cy, rows), slice(cx, cols), (cols - cx) * (rows - cy) / area),
    ]
    q = 0.0
    for sy, sx, w in quads:
        if w == 0:  # empty quadrant (centroid on the last row/column): zero weight
            continue
        q += w * _ssim(fm[sy, sx], gt[sy, sx])
    return q


def _s_measure_2d(fm: np.ndarray, gt_b: np.ndarray, alpha: float) -> float:
    gt = gt_b.astype(np.float64)
    y = float(gt.mean())
    if y == 0:
        return 1.0 - float(fm.mean())
    if y == 1:
        return float(fm.mean())
    fg = np.where(gt_b, fm, 0.0)
    bg = np.where(gt_b, 0.0, 1.0 - fm)
    s_obj = y * _s_object(fg, gt_b) + (1.0 - y) * _s_object(bg, ~gt_b)
    s_reg = _s_region(fm, gt)
    return max(0.0, alpha * s_obj + (1.0 - alpha) * s_reg)


def s_measure(pred: Any, truth: Any, alpha: float = 0.5) -> float:
    """Structure measure S_α = α·S_object + (1 − α)·S_region (Fan et al., ICCV 2017), α = 0.5 by default.

    ``pred`` may be binary or a soft map in [0, 1]; ``truth`` is binary. Special cases of the reference code:
    ``truth`` empty → ``1 - mean(pred)``; ``truth`` full → ``mean(pred)``; otherwise the score is clipped at 0.
    S-measure is a 2D measure (region term splits the image into four quadrants at the truth centroid); for a 3D
    volume ``(Z, Y, X)`` it is the mean over the axial slices (axis 0), each slice scored with the same rules.
    """
    fm = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    if fm.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape, got {fm.shape} and {t.shape}")
    if fm.ndim not in (2, 3) or fm.size == 0:
        raise ValueError(f"masks must be non-empty 2D (Y, X) or 3D (Z, Y, X), got shape {fm.shape}")
    if not np.all(np.isfinite(fm)) or fm.min() < 0.0 or fm.max() > 1.0:
        raise ValueError("pred values must be in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    if fm.ndim == 2:
        return _s_measure_2d(fm, t, alpha)
    return float(np.mean([_s_measure_2d(fm[k], t[k], alpha) for k in range(fm.shape[0])]))


# ------------------------------------------------------------------------------------------------- surface metrics
def surface(mask: Any) -> np.ndarray:
    """Boundary voxels: ``mask & ~binary_erosion(mask)`` (face connectivity; outside the array counts as background,
    so foreground on the array border is surface)."""
    from scipy import ndimage  # lazy: keeps ``import pneumoct.evaluate`` light

    m = np.asarray(mask).astype(bool)
    return m & ~ndimage.binary_erosion(m)


def surface_distances(pred: Any, truth: Any, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d_pred_to_truth, d_truth_to_pred)``.

    ``d_pred_to_truth[i]`` is the Euclidean distance from the i-th surface voxel of ``pred`` to the nearest surface
    voxel of ``truth`` (``distance_transform_edt(~surface(truth), sampling=spacing)`` sampled on
    ``surface(pred)``), and vice versa. Voxel centres are used (no sub-voxel surfels). If one surface is empty the
    distances from the other are ``inf``; if both are empty both arrays are empty.
    """
    from scipy import ndimage

    p, t = _pair(pred, truth)
    sp = _spacing(spacing, p.ndim)
    sp_, st_ = surface(p), surface(t)
    if not sp_.any() or not st_.any():
        return np.full(int(sp_.sum()), np.inf), np.full(int(st_.sum()), np.inf)
    dt_t = ndimage.distance_transform_edt(~st_, sampling=sp)
    dt_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return np.asarray(dt_t[sp_], dtype=np.float64), np.asarray(dt_p[st_], dtype=np.float64)


def _both_empty(p: np.ndarray, t: np.ndarray) -> bool:
    return not p.any() and not t.any()


def _one_empty(p: np.ndarray, t: np.ndarray) -> bool:
    return bool(p.any()) != bool(t.any())


def assd(pred: Any, truth: Any, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance (mm): mean of all distances of both directions pooled,
    ``(Σ d(P→T) + Σ d(T→P)) / (|∂P| + |∂T|)``. 0 if both masks are empty, ``inf`` if exactly one is."""
    p, t = _pair(pred, truth)
    if _both_empty(p, t):
        return 0.0
    if _one_empty(p, t):
        return math.inf
    a, b = surface_distances(p, t, spacing)
    return float(np.concatenate([a, b]).mean())


def rmsd(pred: Any, truth: Any, spacing: Sequence[float] | None = None) -> float:
    """RMS symmetric surface distance (mm): ``sqrt((Σ d(P→T)² + Σ d(T→P)²) / (|∂P| + |∂T|))``.
    0 if both masks are empty, ``inf`` if exactly one is."""
    p, t = _pair(pred, truth)
    if _both_empty(p, t):
        return 0.0
    if _one_empty(p, t):
        return math.inf
    a, b = surface_distances(p, t, spacing)
    d = np.concatenate([a, b])
    return float(np.sqrt(np.mean(d * d)))


def hd95(pred: Any, truth: Any, spacing: Sequence[float] | None = None, mode: str = "pooled") -> float:
    """95th-percentile Hausdorff distance (mm). 0 if both masks are empty, ``inf`` if exactly one is.

    ``mode="pooled"`` (default, as medpy): 95th percentile of the symmetric surface distances, i.e. of both
    directions pooled. ``mode="max"`` (as MONAI / DeepMind ``surface-distance``): the larger of the two directed
    95th percentiles. Percentiles use numpy's default linear interpolation.
    """
    if mode not in ("pooled", "max"):
        raise ValueError("mode must be 'pooled' or 'max'")
    p, t = _pair(pred, truth)
    if _both_empty(p, t):
        return 0.0
    if _one_empty(p, t):
        return math.inf
    a, b = surface_distances(p, t, spacing)
    if mode == "pooled":
        return float(np.percentile(np.concatenate([a, b]), 95))
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def normalized_surface_dice(pred: Any, truth: Any, tolerance_mm: float = 1.0,
                            spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at tolerance τ mm (Nikolov et al. 2021), voxel-count version:
    ``(|{p ∈ ∂P : d(p, ∂T) ≤ τ}| + |{t ∈ ∂T : d(t, ∂P) ≤ τ}|) / (|∂P| + |∂T|)``.
    1 if both masks are empty, 0 if exactly one is. Surface voxels are counted, not surfel areas."""
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError("tolerance_mm must be finite and >= 0")
    p, t = _pair(pred, truth)
    if _both_empty(p, t):
        return 1.0
    if _one_empty(p, t):
        return 0.0
    a, b = surface_distances(p, t, spacing)
    return float((np.count_nonzero(a <= tolerance_mm) + np.count_nonzero(b <= tolerance_mm)) / (a.size + b.size))


nsd = normalized_surface_dice


# ---------------------------------------------------------------------------------------------------------- per case
def _finite_or_none(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def case_metrics(pred: Any, truth: Any, spacing: Sequence[float] | None = None, prob_map: Any = None,
                 tolerance_mm: float = 1.0) -> dict[str, Any]:
    """All metrics of one case as a JSON-able dict (``inf`` → ``None``), plus ``empty_pred`` / ``empty_truth``
    flags and the voxel counts ``n_pred`` / ``n_truth``. ``mae`` is ``None`` without ``prob_map``."""
    p, t = _pair(pred, truth)
    sp = _spacing(spacing, p.ndim)
    out: dict[str, Any] = {
        "dice": dice(p, t),
        "iou": iou(p, t),
        "sensitivity": sensitivity(p, t),
        "specificity": specificity(p, t),
        "precision": precision(p, t),
        "e_measure": e_measure(p, t),
        "s_measure": s_measure(p, t),
        "nsd": normalized_surface_dice(p, t, tolerance_mm, sp),
    }
    if _both_empty(p, t):
        out.update(assd=0.0, rmsd=0.0, hd95=0.0)
    elif _one_empty(p, t):
        out.update(assd=None, rmsd=None, hd95=None)
    else:
        a, b = surface_distances(p, t, sp)
        d = np.concatenate([a, b])
        out.update(assd=float(d.mean()), rmsd=float(np.sqrt(np.mean(d * d))), hd95=float(np.percentile(d, 95)))
    out["mae"] = None if prob_map is None else mae(prob_map, t)
    out = {k: _finite_or_none(v) for k, v in out.items()}
    out.update(empty_pred=not p.any(), empty_truth=not t.any(), n_pred=int(p.sum()), n_truth=int(t.sum()))
    return out


# --------------------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_stat_ci(values: np.ndarray, stat: str, n_boot: int, alpha: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    samples = values[idx]
    boot = samples.mean(axis=1) if stat == "mean" else np.median(samples, axis=1)
    return float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))


def aggregate(values: Sequence[float | None], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Mean and median over the cases where the value is defined (``None`` dropped), each with a percentile
    bootstrap interval over cases: ``n_boot`` resamples with replacement from ``np.random.default_rng(seed)``,
    ``alpha/2`` and ``1 - alpha/2`` quantiles (numpy linear interpolation), as
    :func:`pneumoct.evaluate.classification.bootstrap_ci`. Returns
    ``{"n", "mean", "mean_low", "mean_high", "median", "median_low", "median_high"}`` (all ``None`` when n = 0)."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    out: dict[str, Any] = {"n": int(v.size), "mean": None, "mean_low": None, "mean_high": None,
                           "median": None, "median_low": None, "median_high": None}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    out["median"] = float(np.median(v))
    out["mean_low"], out["mean_high"] = _bootstrap_stat_ci(v, "mean", n_boot, alpha, seed)
    out["median_low"], out["median_high"] = _bootstrap_stat_ci(v, "median", n_boot, alpha, seed)
    return out


# ------------------------------------------------------------------------------------------------------------ report
def _class_prob(prob: np.ndarray | None, shape: tuple[int, ...], labels: Sequence[int] | None,
                label: int | None) -> np.ndarray | None:
    """Pick the soft map for one class: a map of mask shape serves the binary / "any" case; a map with a leading
    class axis ``(len(labels), *shape)`` gives one map per label, and "any" = clip(sum over classes, 0, 1)."""
    if prob is None:
        return None
    if prob.shape == shape:
        return prob if label is None else None
    if labels is not None and prob.shape == (len(labels),) + shape:
        if label is None:
            return np.clip(prob.sum(axis=0), 0.0, 1.0)
        return prob[list(labels).index(label)]
    raise ValueError(f"prob_map shape {prob.shape} fits neither the mask shape {shape} nor (n_labels, *shape)")


def segmentation_report(
    preds: Sequence[Any],
    truths: Sequence[Any],
    spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
    prob_maps: Sequence[Any] | None = None,
    tolerance_mm: float = 1.0,
    labels: Sequence[int] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-case segmentation metrics and aggregates with bootstrap intervals, JSON-able (no NaN / inf).

    ``preds`` / ``truths``: sequences of masks (2D or 3D; each pair the same shape). ``spacing``: one tuple for all
    cases, one tuple per case, or ``None`` (1 mm per voxel). ``prob_maps``: optional soft maps for MAE (mask shape,
    or ``(len(labels), *shape)`` per class). ``labels``: ``None`` treats the masks as binary (non-zero =
    foreground) and reports the class ``"any"`` only; e.g. ``labels=(1, 2)`` evaluates integer label maps per class
    (``mask == 1``, ``mask == 2``, keys ``"1"``, ``"2"``) plus ``"any"`` (``mask ∈ labels``).

    Returns ``{"n_cases", "tolerance_mm", "labels", "alpha", "n_boot", "seed", "classes": {key: {"per_case": [...],
    "aggregate": {metric: aggregate(...)}, "n_empty_pred", "n_empty_truth", "n_both_empty"}}}``. Cases with
    exactly one empty mask have distance metrics ``None`` (infinite) and are left out of the distance aggregates;
    ``n_empty_pred`` / ``n_empty_truth`` count the cases with an empty prediction / truth (both-empty cases count
    in both and in ``n_both_empty``). See :func:`case_metrics` and :func:`aggregate`.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    preds = list(preds)
    truths = list(truths)
    if len(preds) != len(truths):
        raise ValueError(f"got {len(preds)} predictions and {len(truths)} truths")
    n = len(preds)
    if n == 0:
        raise ValueError("no cases")
    if prob_maps is not None:
        prob_maps = list(prob_maps)
        if len(prob_maps) != n:
            raise ValueError(f"got {len(prob_maps)} prob_maps for {n} cases")
    if spacing is None:
        spacings: list[Any] = [None] * n
    elif len(spacing) > 0 and np.ndim(spacing[0]) == 1:
        spacings = [tuple(s) for s in spacing]  # type: ignore[arg-type]
        if len(spacings) != n:
            raise ValueError(f"got {len(spacings)} spacings for {n} cases")
    else:
        spacings = [tuple(spacing)] * n  # type: ignore[arg-type]
    if labels is not None:
        labels = [int(x) for x in labels]
        if not labels or len(set(labels)) != len(labels) or 0 in labels:
            raise ValueError("labels must be distinct, non-empty and non-zero")

    keys: list[tuple[str, int | None]] = [(str(lab), lab) for lab in labels] if labels is not None else []
    keys.append(("any", None))
    classes: dict[str, Any] = {}
    for key, lab in keys:
        per_case = []
        for i in range(n):
            pr = np.asarray(preds[i])
            tr = np.asarray(truths[i])
            if pr.shape != tr.shape:
                raise ValueError(f"case {i}: pred shape {pr.shape} != truth shape {tr.shape}")
            if lab is not None:
                pm, tm = pr == lab, tr == lab
            elif labels is not None:
                pm, tm = np.isin(pr, labels), np.isin(tr, labels)
            else:
                pm, tm = pr.astype(bool), tr.astype(bool)
            prob = None
            if prob_maps is not None and prob_maps[i] is not None:
                prob = _class_prob(np.asarray(prob_maps[i], dtype=np.float64), tr.shape, labels, lab)
            per_case.append(case_metrics(pm, tm, spacings[i], prob, tolerance_mm))
        agg = {m: aggregate([c[m] for c in per_case], n_boot=n_boot, alpha=alpha, seed=seed) for m in REPORT_METRICS}
        classes[key] = {
            "per_case": per_case,
            "aggregate": agg,
            "n_empty_pred": sum(c["empty_pred"] for c in per_case),
            "n_empty_truth": sum(c["empty_truth"] for c in per_case),
            "n_both_empty": sum(c["empty_pred"] and c["empty_truth"] for c in per_case),
        }
    return {
        "n_cases": n,
        "tolerance_mm": float(tolerance_mm),
        "labels": None if labels is None else list(labels),
        "alpha": float(alpha),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "classes": classes,
    }


__all__ = [
    "aggregate",
    "assd",
    "case_metrics",
    "dice",
    "e_measure",
    "hd95",
    "iou",
    "mae",
    "normalized_surface_dice",
    "nsd",
    "precision",
    "recall",
    "rmsd",
    "s_measure",
    "segmentation_report",
    "sensitivity",
    "specificity",
    "surface",
    "surface_distances",
]
