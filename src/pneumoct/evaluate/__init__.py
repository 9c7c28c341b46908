"""Evaluation of patient-level classification (metrics, bootstrap CIs / p-values, group-wise results, ROC plots)
and of lesion segmentation (overlap, E-/S-measure and surface metrics, see ``segmentation``)."""
from __future__ import annotations

from .classification import (
    accuracy_metric,
    binary_metric_fn,
    binary_metrics,
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
from .segmentation import (
    assd,
    dice,
    e_measure,
    hd95,
    iou,
    normalized_surface_dice,
    rmsd,
    s_measure,
    segmentation_report,
)

__all__ = [
    "accuracy_metric",
    "binary_metric_fn",
    "binary_metrics",
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
    "assd",
    "dice",
    "e_measure",
    "hd95",
    "iou",
    "normalized_surface_dice",
    "rmsd",
    "s_measure",
    "segmentation_report",
]
