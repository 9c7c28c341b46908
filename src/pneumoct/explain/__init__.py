"""Model-agnostic explanation-map utilities: saliency -> lesion boxes (Hu et al.), drawing, and scores against
lesion masks. Research use only, not a medical device. See docs/explanations.md."""
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
]
