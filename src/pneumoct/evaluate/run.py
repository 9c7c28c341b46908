"""``pneumoct evaluate``: predictions in, every metric of the issue out (JSON + readable table + ROC PNG).

Predictions file (CSV): one row per case (slice or patient) with columns ``case_id``, ``y_true`` (class name or
index), ``prob_<class>`` for every class (order = column order), and optionally ``lesion_volume_ratio`` (in
[0, 1]; enables the group-wise table of the dual-sampling paper, Table III). ``--checkpoint`` runs a trained model
on a data spec and writes this file first (``predictions.csv`` in the output folder).

Outputs in ``OUT``: ``metrics.json`` (classification report, 95 % bootstrap CIs of accuracy / macro AUC /
abnormal AUC, group-wise results, and with ``--compare`` the paired bootstrap p-values), ``metrics.txt`` (the
same as tables), ``roc.png``. JSON is written last.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..io.writers import write_json, write_text
from .classification import (
    accuracy_metric,
    bootstrap_ci,
    bootstrap_p_value,
    classification_report,
    format_table,
    groupwise_report,
    lvr_groups,
    plot_roc_png,
    roc_auc,
)

__all__ = ["Predictions", "read_predictions_csv", "write_predictions_csv", "evaluate_predictions",
           "macro_auc", "abnormal_auc"]


class Predictions:
    """case_ids (N,), y_true (N,) int, probs (N, K), class_names (K,), lesion_volume_ratio (N,) or None."""

    def __init__(self, case_ids: Sequence[str], y_true, probs, class_names: Sequence[str], lesion_volume_ratio=None):
        self.case_ids = [str(c) for c in case_ids]
        self.y_true = np.asarray(y_true, dtype=np.int64)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.class_names = [str(c) for c in class_names]
        self.lesion_volume_ratio = None if lesion_volume_ratio is None else np.asarray(lesion_volume_ratio, float)
        if self.probs.ndim != 2 or self.probs.shape != (len(self.case_ids), len(self.class_names)):
            raise ValueError("probs must be (cases, classes)")
        if len(self.y_true) != len(self.case_ids):
            raise ValueError("y_true and case_ids differ in length")


def read_predictions_csv(path: str | Path) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise PneumoctInputError("not_found", f"predictions file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PneumoctInputError("bad_predictions", f"cannot read predictions CSV {path.name}: {exc}") from None
    prob_cols = [f for f in fields if f.startswith("prob_")]
    if "y_true" not in fields or len(prob_cols) < 2:
        raise PneumoctInputError("bad_predictions", f"{path.name}: need columns y_true and at least two prob_<class>")
    names = [c[len("prob_"):] for c in prob_cols]
    if not rows:
        raise PneumoctInputError("bad_predictions", f"{path.name}: no rows")
    y, p, ids, lvr = [], [], [], []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        t = (r.get("y_true") or "").strip()
        if t in names:
            y.append(names.index(t))
        else:
            try:
                y.append(int(t))
            except ValueError:
                raise PneumoctInputError("bad_predictions", f"{path.name} line {i}: unknown class {t!r}") from None
            if not 0 <= y[-1] < len(names):
                raise PneumoctInputError("bad_predictions", f"{path.name} line {i}: class index {t} out of range")
        try:
            p.append([float(r[c]) for c in prob_cols])
        except (TypeError, ValueError):
            raise PneumoctInputError("bad_predictions", f"{path.name} line {i}: a probability is not a number") from None
        ids.append(r.get("case_id") or str(i - 2))
        if "lesion_volume_ratio" in fields and (r.get("lesion_volume_ratio") or "").strip():
            lvr.append(float(r["lesion_volume_ratio"]))
    probs = np.asarray(p)
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise PneumoctInputError("bad_predictions", f"{path.name}: probabilities must be finite and non-negative")
    return Predictions(ids, y, probs, names, lvr if len(lvr) == len(rows) else None)


def write_predictions_csv(path: str | Path, pred: Predictions) -> Path:
    from ..io.writers import atomic_path

    path = Path(path)
    cols = ["case_id", "y_true"] + [f"prob_{c}" for c in pred.class_names]
    if pred.lesion_volume_ratio is not None:
        cols.append("lesion_volume_ratio")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for i, cid in enumerate(pred.case_ids):
                row = [cid, pred.class_names[int(pred.y_true[i])]] + [f"{v:.6f}" for v in pred.probs[i]]
                if pred.lesion_volume_ratio is not None:
                    row.append(f"{pred.lesion_volume_ratio[i]:.6f}")
                w.writerow(row)
    return path


def macro_auc(y_true, probs) -> float | None:
    """Mean one-vs-rest AUC over the classes where it is defined."""
    p = np.asarray(probs)
    vals = [roc_auc(np.asarray(y_true) == k, p[:, k]) for k in range(p.shape[1])]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def abnormal_auc(y_true, probs) -> float | None:
    """AUC of healthy (class 0) vs any disease, score = 1 - p(healthy)."""
    p = np.asarray(probs)
    return roc_auc(np.asarray(y_true) != 0, 1.0 - p[:, 0])


def evaluate_predictions(pred: Predictions, out_dir: str | Path | None = None, *, compare: Predictions | None = None,
                         n_boot: int = 1000, seed: int = 0, data_note: str = "") -> dict[str, Any]:
    """All metrics for one prediction set (and the paired comparison with another on the same cases)."""
    k = len(pred.class_names)
    healthy_first = pred.class_names[0] in ("healthy", "no_lesion", "negative")
    report = classification_report(pred.y_true, pred.probs, pred.class_names, positive_is_abnormal=healthy_first)
    metrics: dict[str, Any] = {"data": data_note, "n": int(len(pred.y_true)), "report": report}
    ci = {"accuracy": bootstrap_ci(accuracy_metric, pred.y_true, pred.probs, n_boot=n_boot, seed=seed),
          "macro_auc": bootstrap_ci(macro_auc, pred.y_true, pred.probs, n_boot=n_boot, seed=seed)}
    if healthy_first:
        ci["abnormal_auc"] = bootstrap_ci(abnormal_auc, pred.y_true, pred.probs, n_boot=n_boot, seed=seed)
    metrics["bootstrap_95ci"] = ci
    if pred.lesion_volume_ratio is not None:
        groups = lvr_groups(np.clip(pred.lesion_volume_ratio, 0.0, 1.0))
        metrics["groupwise_by_lesion_volume_ratio"] = groupwise_report(pred.y_true, pred.probs, groups,
                                                                       pred.class_names)
    if compare is not None:
        if compare.case_ids != pred.case_ids or not np.array_equal(compare.y_true, pred.y_true):
            raise PneumoctInputError("bad_predictions", "the two prediction files must list the same cases "
                                     "with the same labels, in the same order")
        if compare.probs.shape[1] != k:
            raise PneumoctInputError("bad_predictions", "the two prediction files have different classes")
        pv = {"accuracy": bootstrap_p_value(accuracy_metric, pred.y_true, pred.probs, compare.probs,
                                            n_boot=n_boot, seed=seed),
              "macro_auc": bootstrap_p_value(macro_auc, pred.y_true, pred.probs, compare.probs,
                                             n_boot=n_boot, seed=seed)}
        metrics["comparison"] = {"p_values": pv,
                                 "other_accuracy": accuracy_metric(compare.y_true, compare.probs),
                                 "other_macro_auc": macro_auc(compare.y_true, compare.probs)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stale = out / "metrics.json"
        if stale.exists():
            stale.unlink()
        plot_roc_png(pred.y_true, pred.probs, pred.class_names, out / "roc.png")
        write_text(out / "metrics.txt", metrics_text(metrics))
        write_json(out / "metrics.json", metrics)
    return metrics


def metrics_text(metrics: dict[str, Any]) -> str:
    lines = []
    if metrics.get("data"):
        lines += [f"data: {metrics['data']}", ""]
    lines.append(format_table(metrics["report"]))
    for name, c in metrics["bootstrap_95ci"].items():
        est, lo, hi = c.get("estimate"), c.get("low"), c.get("high")
        f = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"{name}: {f(est)} (95% CI {f(lo)}-{f(hi)}, {c.get('n_valid')}/{c.get('n_boot')} resamples)")
    if "groupwise_by_lesion_volume_ratio" in metrics:
        lines += ["", "by lesion volume ratio:", format_table(metrics["groupwise_by_lesion_volume_ratio"])]
    if "comparison" in metrics:
        lines.append("")
        for name, pv in metrics["comparison"]["p_values"].items():
            lines.append(f"paired bootstrap p-value ({name}): {pv.get('p_value')}")
    return "\n".join(lines) + "\n"
