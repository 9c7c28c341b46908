"""Explanation maps for the pneumoct networks (``methods``: CAM, integrated gradients, Grad-CAM, M3Lung prototype
map behind one ``explain`` call) and model-agnostic utilities: saliency -> lesion boxes (Hu et al.), drawing, and
scores against lesion masks. Research use only, not a medical device. See docs/explanations.md."""
from .boxes import (
    GAUSS_5X5_SIGMA,
    Box,
    boxes_from_saliency,
    draw_boxes_rgb,
    heat_colormap,
    joint_saliency,
    normalise_map,
    overlay_map_rgb,
    resize_map_to,
    saliency_foreground,
)
from .scores import (
    METRICS,
    box_hit_rate,
    energy_inside,
    pointing_game,
    score_explanations,
    score_image,
    threshold_iou_dice,
    threshold_map,
)

__all__ = [
    "GAUSS_5X5_SIGMA",
    "Box",
    "boxes_from_saliency",
    "draw_boxes_rgb",
    "heat_colormap",
    "joint_saliency",
    "normalise_map",
    "overlay_map_rgb",
    "resize_map_to",
    "saliency_foreground",
    "METRICS",
    "box_hit_rate",
    "energy_inside",
    "pointing_game",
    "score_explanations",
    "score_image",
    "threshold_iou_dice",
    "threshold_map",
    "IG_STEPS",
    "METHODS",
    "ExplanationResult",
    "applicable_methods",
    "as_model_input",
    "default_method",
    "default_target_layer",
    "evaluate_explanations",
    "explain",
    "explain_slices",
    "gradcam",
    "model_family",
    "to_slice_grid",
]

# the model-facing API (``methods``) needs torch: imported on first use, so the numpy utilities stay light
_METHODS_API = (
    "IG_STEPS", "METHODS", "ExplanationResult", "applicable_methods", "as_model_input", "default_method",
    "default_target_layer", "evaluate_explanations", "explain", "explain_slices", "gradcam", "model_family",
    "to_slice_grid",
)


def __getattr__(name: str):
    if name in _METHODS_API:
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
