"""Patient-level classification metrics (numpy only): confusion matrix, one-vs-rest sensitivity / specificity /
precision / F1 / exact AUC, the M3Lung-Sys error rates FPE / FNE / FDPE, percentile bootstrap confidence intervals,
a paired bootstrap p-value, group-wise (lesion-volume-ratio) results, a text table and a ROC plot.

Conventions (see ``docs/evaluation.md``):

* ``y_true`` is an integer array of class indices ``0 .. K-1``; ``y_prob`` is an ``(N, K)`` array of per-class scores.
  Rows need not sum to 1 (they are accepted as scores); the predicted class is the row ``argmax`` (ties go to the
  lowest index, as ``np.argmax`` does).
* Confusion matrix rows are the true class, columns the predicted class.
* A quantity whose denominator is zero is ``None`` (never NaN), so every report is JSON-serialisable.
* Class index 0 is "healthy" (``pneumoct.types.CLASS_NAMES``) when ``positive_is_abnormal=True``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "confusion_matrix",
    "roc_auc",
    "roc_curve",
    "classification_report",
    "accuracy_metric",
    "bootstrap_ci",
    "bootstrap_p_value",
    "lvr_groups",
    "groupwise_report",
    "format_table",
    "plot_roc_png",
]

MetricFn = Callable[[np.ndarray, np.ndarray], "float | None"]


# ----------------------------------------------------------------------------------------------------------- inputs
def _as_labels(y_true: Any, n_classes: int | None = None, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty: at least one case is needed to evaluate")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must hold integer class indices")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or (n_classes is not None and y.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{(n_classes or 1) - 1}")
    return y


def _as_probs(y_prob: Any, n_cases: int, n_classes: int | None = None, name: str = "y_prob") -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (cases, classes) array, got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one case is needed to evaluate")
    if p.shape[0] != n_cases:
        raise ValueError(f"{name} has {p.shape[0]} rows but y_true has {n_cases} cases")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"{name} has {p.shape[1]} columns but there are {n_classes} classes")
    if p.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 class columns")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return p


def _binary_inputs(y_true_binary: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true_binary)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError("y_true_binary and score must be 1-D arrays")
    if y.size == 0:
        raise ValueError("empty input: at least one case is needed to compute a ROC/AUC")
    if y.shape != s.shape:
        raise ValueError(f"y_true_binary has {y.size} cases but score has {s.size}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true_binary must hold only 0/1 (or False/True)")
    if not np.all(np.isfinite(s)):
        raise ValueError("score contains NaN or infinite values")
    return y.astype(bool), s


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


# ------------------------------------------------------------------------------------------------------ basic metrics
def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts; ``cm[i, j]`` = cases of true class ``i`` predicted as ``j``."""
    if n_classes < 1:
        raise ValueError("n_classes must be >= 1")
    t = _as_labels(y_true, n_classes, "y_true")
    p = _as_labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} cases but y_pred has {p.size}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values all get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    avg = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(y_true_binary: Any, score: Any) -> float | None:
    """Exact AUC = P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg) (Mann–Whitney U / (n_pos * n_neg)).

    Computed from mid-ranks, so ties count one half. Returns ``None`` when the cases hold no positive or no
    negative (AUC undefined). Constant scores give exactly 0.5.
    """
    y, s = _binary_inputs(y_true_binary, score)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true_binary: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, a case being called positive when ``score >= threshold``.

    ``thresholds`` are ``+inf`` followed by the distinct scores in decreasing order, so the curve starts at (0, 0)
    and ends at (1, 1); every distinct score is a vertex (no points dropped). The trapezoidal area under it equals
    :func:`roc_auc`. Raises ``ValueError`` when there is no positive or no negative case (rates undefined).
    """
    y, s = _binary_inputs(y_true_binary, score)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs at least one positive and one negative case")
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last_of_run = np.r_[ss[1:] != ss[:-1], True]  # last index of each run of equal scores
    tps = np.cumsum(ys)[last_of_run]
    fps = np.cumsum(~ys)[last_of_run]
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, ss[last_of_run]]
    return fpr, tpr, thresholds


def accuracy_metric(y_true: Any, y_prob: Any) -> float:
    """Fraction of cases whose argmax prediction equals the truth (a ``metric_fn`` for the bootstrap helpers)."""
    p = np.asarray(y_prob, dtype=np.float64)
    t = np.asarray(y_true)
    return float(np.mean(np.argmax(p, axis=1) == t))


def binary_metrics(y_true: Any, score: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Two-class results in the dual-sampling paper's terms (Sec. IV-C): AUC, and accuracy, sensitivity,
    specificity and F1 at ``threshold`` on the positive-class score. ``y_true`` 0/1. Undefined values are None."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {"n": int(y.size), "n_pos": int(tp + fn), "n_neg": int(tn + fp), "threshold": float(threshold),
            "auc": roc_auc(y, s) if 0 < tp + fn < y.size else None,
            "accuracy": _ratio(tp + tn, y.size), "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def binary_metric_fn(name: str, threshold: float = 0.5) -> MetricFn:
    """A ``metric_fn`` for :func:`bootstrap_ci` / :func:`bootstrap_p_value` computing ``binary_metrics[name]``
    from (N, 2) probabilities (column 1 = positive class)."""
    def fn(y: np.ndarray, p: np.ndarray) -> float | None:
        return binary_metrics(y, np.asarray(p)[:, 1], threshold)[name]

    fn.__name__ = f"binary_{name}"
    return fn


def _abnormal_score(p: np.ndarray) -> np.ndarray:
    """Probability of "not healthy" = 1 - p_healthy after normalising each row to sum 1.

    Rows whose sum is not positive are treated as uniform (score (K-1)/K).
    """
    rs = p.sum(axis=1)
    k = p.shape[1]
    out = np.full(p.shape[0], (k - 1) / k)
    ok = rs > 0
    out[ok] = 1.0 - p[ok, 0] / rs[ok]
    return out


def _one_vs_rest(cm: np.ndarray, k: int) -> dict[str, Any]:
    tp = int(cm[k, k])
    fn = int(cm[k, :].sum() - tp)
    fp = int(cm[:, k].sum() - tp)
    tn = int(cm.sum() - tp - fn - fp)
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    prec = _ratio(tp, tp + fp)
    if sens is None or prec is None:
        f1 = None
    elif sens + prec == 0:
        f1 = 0.0
    else:
        f1 = 2 * prec * sens / (prec + sens)
    return {"n": tp + fn, "tp": tp, "fn": fn, "fp": fp, "tn": tn, "sensitivity": sens, "recall": sens,
            "specificity": spec, "precision": prec, "f1": f1}


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def classification_report(
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str],
    *,
    positive_is_abnormal: bool = True,
) -> dict[str, Any]:
    """All patient-level metrics in one JSON-serialisable dict.

    Keys: ``n``, ``class_names``, ``accuracy``, ``per_class`` (name -> one-vs-rest counts, sensitivity/recall,
    specificity, precision, f1, auc), ``macro`` (unweighted mean over the classes where each is defined, and how many
    classes entered it), ``confusion_matrix`` (rows = truth), and ``abnormal`` (healthy-vs-abnormal block with
    ``fpe``, ``fne``, ``fdpe``, binary sensitivity/specificity/auc) when ``positive_is_abnormal`` is true, else
    ``None``.

    Edge cases: a class absent from ``y_true`` has sensitivity/recall, f1 and auc ``None`` (its specificity is still
    defined); a class never predicted has precision (and f1) ``None``; any zero denominator gives ``None``.
    """
    names = [str(c) for c in class_names]
    k = len(names)
    if k < 2:
        raise ValueError("class_names must name at least 2 classes")
    y = _as_labels(y_true, k)
    p = _as_probs(y_prob, y.size, k)
    pred = np.argmax(p, axis=1)
    cm = confusion_matrix(y, pred, k)
    n = int(y.size)

    per_class: dict[str, Any] = {}
    for c, name in enumerate(names):
        row = _one_vs_rest(cm, c)
        row["auc"] = roc_auc(y == c, p[:, c])
        per_class[name] = row
    macro: dict[str, Any] = {}
    for key in ("sensitivity", "specificity", "precision", "f1", "auc"):
        vals = [per_class[nm][key] for nm in names]
        macro[key] = _mean_defined(vals)
        macro[f"n_classes_{key}"] = sum(v is not None for v in vals)

    report: dict[str, Any] = {
        "n": n,
        "class_names": names,
        "accuracy": float(np.trace(cm) / n),
        "per_class": per_class,
        "macro": macro,
        "confusion_matrix": cm.tolist(),
        "abnormal": None,
    }
    if positive_is_abnormal:
        # M3Lung-Sys Sec. IV-B ("Statistical Analysis"), with healthy = class 0 the only negative class:
        #   FPE  = "percentage of negative persons who are misclassified as positive"
        #        = #(true healthy, predicted any disease) / #(true healthy)
        #   FNE  = "percentage of positive persons who are misclassified as negative"
        #        = #(true disease, predicted healthy) / #(true disease)
        #   FDPE = "percentage of positive persons whose disease types are predicted incorrectly"
        #        = #(true disease d, predicted another disease d' != d, d' != healthy) / #(true disease)
        # FNE and FDPE count disjoint errors, so 1 - accuracy = (n_neg*FPE + n_pos*(FNE + FDPE)) / n.  (This reading
        # reproduces the paper's Table II: 102 healthy + 190 diseased, accuracy 95.21 % = 14 errors ~ 3 FP + 8 FN + 3 FD.)
        neg = int(cm[0, :].sum())
        pos = int(n - neg)
        fp = int(cm[0, 1:].sum())
        fn = int(cm[1:, 0].sum())
        fd = int(cm[1:, 1:].sum() - np.trace(cm[1:, 1:]))
        ab_true = y != 0
        report["abnormal"] = {
            "negative_class": names[0],
            "n_negative": neg,
            "n_positive": pos,
            "false_positives": fp,
            "false_negatives": fn,
            "false_disease_predictions": fd,
            "fpe": _ratio(fp, neg),
            "fne": _ratio(fn, pos),
            "fdpe": _ratio(fd, pos),
            "sensitivity": _ratio(pos - fn, pos),
            "specificity": _ratio(neg - fp, neg),
            "auc": roc_auc(ab_true, _abnormal_score(p)),
        }
    return report


# ---------------------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))


def _call_metric(metric_fn: MetricFn, y: np.ndarray, p: np.ndarray) -> float | None:
    v = metric_fn(y, p)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: Any,
    y_prob: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap CI of ``metric_fn(y_true, y_prob)``.

    Draws ``n_boot`` resamples of the cases (size N, with replacement) from ``np.random.default_rng(seed)``,
    evaluates the metric on each and returns the ``alpha/2`` and ``1 - alpha/2`` quantiles (numpy "linear"
    interpolation). Resamples where the metric is undefined (``None``/NaN, e.g. an AUC on a resample without
    positives) are dropped and counted in ``n_valid``; if none is valid, ``low``/``high`` are ``None``.
    Returns ``{"estimate", "low", "high", "alpha", "n_boot", "n_valid", "seed"}``.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    y = _as_labels(y_true)
    p = _as_probs(y_prob, y.size)
    est = _call_metric(metric_fn, y, p)
    rng = np.random.default_rng(seed)
    vals = []
    for idx in _bootstrap_indices(rng, y.size, n_boot):
        v = _call_metric(metric_fn, y[idx], p[idx])
        if v is not None:
            vals.append(v)
    low = high = None
    if vals:
        arr = np.asarray(vals)
        low = float(np.quantile(arr, alpha / 2))
        high = float(np.quantile(arr, 1 - alpha / 2))
    return {"estimate": est, "low": low, "high": high, "alpha": float(alpha), "n_boot": int(n_boot),
            "n_valid": len(vals), "seed": int(seed)}


def bootstrap_p_value(
    metric_fn: MetricFn,
    y_true: Any,
    prob_a: Any,
    prob_b: Any,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Two-sided paired bootstrap p-value for "model A and model B have the same ``metric_fn`` on these cases".

    M3Lung-Sys footnote 3 draws m (e.g. 1000) bootstrap test sets with replacement, evaluates both models on each
    (2 x m results) and derives the p-value from them, without giving the formula. What is implemented here:

    1. the same ``n_boot`` resampled index sets (``np.random.default_rng(seed)``) are used for both models
       (paired: both models are scored on identical cases);
    2. on resample b, ``d_b = metric(A) - metric(B)``; resamples where either metric is undefined are dropped;
    3. ``p = min(1, 2 * min(#{d_b <= 0} + 1, #{d_b >= 0} + 1) / (n_valid + 1))`` — the two-sided percentile p-value
       of the bootstrap distribution of the difference with the usual +1 correction, so p is never 0 (smallest
       possible value ``2 / (n_valid + 1)``). Identical models give ``d_b = 0`` for all b, hence ``p = 1``.

    Returns ``{"p_value", "difference" (on the full data, A - B), "mean_boot_difference", "n_boot", "n_valid",
    "seed"}``; ``p_value`` is ``None`` when no resample is valid.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    y = _as_labels(y_true)
    pa = _as_probs(prob_a, y.size, name="prob_a")
    pb = _as_probs(prob_b, y.size, pa.shape[1], name="prob_b")
    ea, eb = _call_metric(metric_fn, y, pa), _call_metric(metric_fn, y, pb)
    rng = np.random.default_rng(seed)
    diffs = []
    for idx in _bootstrap_indices(rng, y.size, n_boot):
        va = _call_metric(metric_fn, y[idx], pa[idx])
        vb = _call_metric(metric_fn, y[idx], pb[idx])
        if va is not None and vb is not None:
            diffs.append(va - vb)
    p_value = None
    mean_d = None
    if diffs:
        d = np.asarray(diffs)
        m = d.size
        lo = (np.count_nonzero(d <= 0) + 1) / (m + 1)
        hi = (np.count_nonzero(d >= 0) + 1) / (m + 1)
        p_value = float(min(1.0, 2.0 * min(lo, hi)))
        mean_d = float(d.mean())
    return {"p_value": p_value, "difference": None if ea is None or eb is None else ea - eb,
            "mean_boot_difference": mean_d, "n_boot": int(n_boot), "n_valid": len(diffs), "seed": int(seed)}


# ---------------------------------------------------------------------------------------------------------- group-wise
def lvr_groups(lvr: Any, edges: Sequence[float] = (0.0, 0.05, 0.10, 0.20, 0.30, 1.0)) -> np.ndarray:
    """Bin lesion-volume ratios (lesion volume / lung volume, in [0, 1]) into labels like ``"[0.05,0.1)"``.

    Bins are half-open ``[e_i, e_{i+1})`` except the last, which is closed ``[e_{n-1}, e_n]``. A value outside
    ``[edges[0], edges[-1]]`` or NaN raises ``ValueError``. Returns an object array of str labels.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError("edges must be at least 2 strictly increasing numbers")
    v = np.asarray(lvr, dtype=np.float64).ravel()
    if v.size and (not np.all(np.isfinite(v)) or v.min() < e[0] or v.max() > e[-1]):
        raise ValueError(f"lesion-volume ratios must be finite and within [{e[0]:g}, {e[-1]:g}]")
    labels = [f"[{e[i]:g},{e[i + 1]:g})" for i in range(e.size - 2)] + [f"[{e[-2]:g},{e[-1]:g}]"]
    idx = np.clip(np.searchsorted(e, v, side="right") - 1, 0, e.size - 2)
    return np.asarray([labels[i] for i in idx], dtype=object)


def _group_sort_key(label: str) -> tuple[int, float, str]:
    m = re.match(r"^[\[(]\s*([-+0-9.eE]+)\s*,", label)
    if m:
        try:
            return (0, float(m.group(1)), label)
        except ValueError:
            pass
    return (1, 0.0, label)


def groupwise_report(
    y_true: Any,
    y_prob: Any,
    groups: Any,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-group results in the style of the dual-sampling paper's Table III (results by lesion-size group).

    ``groups`` holds one label per case (e.g. from :func:`lvr_groups`); groups are reported sorted by the numeric
    lower edge of ``"[a,b)"`` labels, other labels after them in string order. For each group: ``n``, ``n_per_class``, ``accuracy``, per-class
    ``sensitivity`` (recall; ``None`` for a class absent from the group), ``macro_sensitivity`` and, when class 0 is
    healthy (the default class names), the abnormal-vs-healthy ``sensitivity_abnormal``/``specificity_healthy``.
    """
    y = _as_labels(y_true)
    p = _as_probs(y_prob, y.size)
    k = p.shape[1]
    if y.max() >= k:
        raise ValueError(f"y_true holds class indices outside 0..{k - 1}")
    if class_names is None:
        from ..types import CLASS_NAMES

        class_names = CLASS_NAMES if len(CLASS_NAMES) == k else [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns")
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != y.size:
        raise ValueError(f"groups has {g.size} labels but there are {y.size} cases")
    pred = np.argmax(p, axis=1)
    out: dict[str, Any] = {"class_names": names, "n": int(y.size), "groups": {}}
    for label in sorted({str(x) for x in g}, key=_group_sort_key):
        m = np.asarray([str(x) == label for x in g])
        cm = confusion_matrix(y[m], pred[m], k)
        sens = {names[c]: _ratio(cm[c, c], cm[c].sum()) for c in range(k)}
        neg = int(cm[0].sum())
        pos = int(cm.sum() - neg)
        out["groups"][label] = {
            "n": int(m.sum()),
            "n_per_class": {names[c]: int(cm[c].sum()) for c in range(k)},
            "accuracy": float(np.trace(cm) / cm.sum()),
            "sensitivity": sens,
            "macro_sensitivity": _mean_defined(list(sens.values())),
            "sensitivity_abnormal": _ratio(pos - int(cm[1:, 0].sum()), pos),
            "specificity_healthy": _ratio(neg - int(cm[0, 1:].sum()), neg),
        }
    return out


# ------------------------------------------------------------------------------------------------------------- output
def _fmt(v: Any, width: int = 8) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:.4f}".rjust(width)
    return str(v).rjust(width)


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width text table of a :func:`classification_report` or a :func:`groupwise_report` (``-`` = undefined)."""
    lines: list[str] = []
    if "groups" in report:
        names = report["class_names"]
        w = max([5] + [len(x) for x in report["groups"]])
        head = f"{'group':<{w}} {'n':>5} {'accuracy':>8} " + " ".join(f"{('sens_' + c)[:14]:>14}" for c in names)
        lines += [head, "-" * len(head)]
        for label, row in report["groups"].items():
            lines.append(f"{label:<{w}} {row['n']:>5} {_fmt(row['accuracy'])} "
                         + " ".join(_fmt(row["sensitivity"][c], 14) for c in names))
        return "\n".join(lines) + "\n"
    names = report["class_names"]
    w = max([5] + [len(x) for x in names])
    lines.append(f"n = {report['n']}   accuracy = {report['accuracy']:.4f}")
    ab = report.get("abnormal")
    if ab:
        lines.append(f"abnormal vs {ab['negative_class']}: FPE = {_fmt(ab['fpe'], 0).strip()}   "
                     f"FNE = {_fmt(ab['fne'], 0).strip()}   FDPE = {_fmt(ab['fdpe'], 0).strip()}   "
                     f"sens = {_fmt(ab['sensitivity'], 0).strip()}   spec = {_fmt(ab['specificity'], 0).strip()}   "
                     f"AUC = {_fmt(ab['auc'], 0).strip()}")
    lines.append("")
    cols = ("sensitivity", "specificity", "precision", "f1", "auc")
    head = f"{'class':<{w}} {'n':>5} " + " ".join(f"{c[:11]:>11}" for c in cols)
    lines += [head, "-" * len(head)]
    for name in names:
        row = report["per_class"][name]
        lines.append(f"{name:<{w}} {row['n']:>5} " + " ".join(_fmt(row[c], 11) for c in cols))
    lines.append(f"{'macro':<{w}} {'':>5} " + " ".join(_fmt(report["macro"][c], 11) for c in cols))
    lines.append("")
    lines.append("confusion matrix (rows = truth, columns = prediction)")
    cw = max(6, w)
    lines.append(f"{'':<{w}} " + " ".join(f"{n[:cw]:>{cw}}" for n in names))
    for name, r in zip(names, report["confusion_matrix"]):
        lines.append(f"{name:<{w}} " + " ".join(f"{v:>{cw}}" for v in r))
    return "\n".join(lines) + "\n"


def plot_roc_png(y_true: Any, y_prob: Any, class_names: Sequence[str], path: str | os.PathLike[str]) -> list[str]:
    """Write a one-vs-rest ROC plot (one curve per class, AUC in the legend) as a PNG, atomically.

    Classes absent from ``y_true`` (or present in every case) have no ROC curve; they are listed in the legend as
    ``AUC n/a`` and returned. Uses matplotlib's Agg canvas directly (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io.writers import atomic_path

    names = [str(c) for c in class_names]
    y = _as_labels(y_true, len(names))
    p = _as_probs(y_prob, y.size, len(names))
    fig = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    skipped: list[str] = []
    for c, name in enumerate(names):
        yb = y == c
        auc = roc_auc(yb, p[:, c])
        if auc is None:
            skipped.append(name)
            ax.plot([], [], label=f"{name} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(yb, p[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, one class vs rest")
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return skipped
