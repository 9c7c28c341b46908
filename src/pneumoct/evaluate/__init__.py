"""Evaluation of patient-level classification (metrics, bootstrap CIs / p-values, group-wise results, ROC plots)."""
from __future__ import annotations

from .classification import (
    accuracy_metric,
    bootstrap_ci,
    bootstrap_p_value,
    classification_report,
    confusion_matrix,
    format_table,
    groupwise_report,
    lvr_groups,
    plot_roc_png,
    roc_auc,
    roc_curve,
)

__all__ = [
    "accuracy_metric",
    "bootstrap_ci",
    "bootstrap_p_value",
    "classification_report",
    "confusion_matrix",
    "format_table",
    "groupwise_report",
    "lvr_groups",
    "plot_roc_png",
    "roc_auc",
    "roc_curve",
]
