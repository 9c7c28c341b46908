"""Check explanation maps against lesion masks.

All scorers take one map and one lesion mask of the **same shape** (register low-resolution maps with
``resize_map_to`` first; ``score_explanations`` does that for you). ``pointing_game``, ``energy_inside``,
``threshold_map`` and ``threshold_iou_dice`` also take n-D arrays (a 3D map of a volume and its voxel lesion mask),
a ``region`` (e.g. the lungs: the map is read only there and the mask is cut to it) and, for the pointing game, the
voxel ``spacing`` (the tolerance is then in its units, e.g. mm). ``box_hit_rate``, ``score_image`` and
``score_explanations`` stay 2D (boxes are 2D).

Conventions (also in ``docs/explanations.md``):

* **Empty mask** (no lesion pixel): every per-image score is ``None`` (undefined: there is nothing to point at),
  and ``score_explanations`` leaves the image out of the means and counts it in ``n_empty_mask``.
* **All-zero or constant map** (no point, no energy, no foreground): pointing game = miss (``False``),
  energy inside = 0.0, thresholded map = empty so IoU = Dice = 0.0, and no boxes. An explanation that shows
  nothing earns nothing.
* NaN / inf in a map are treated as 0.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_isodata

from .boxes import Box, _as_2d_float, boxes_from_saliency, resize_map_to

__all__ = [
    "pointing_game",
    "energy_inside",
    "threshold_map",
    "threshold_iou_dice",
    "box_hit_rate",
    "score_image",
    "score_explanations",
    "METRICS",
]

#: per-image metrics reported by ``score_image`` / ``score_explanations``
METRICS = ("pointing_game", "energy_inside", "iou", "dice", "box_precision", "lesion_recall")


def _as_nd_float(m, name: str = "map") -> np.ndarray:
    """A 2D (H, W) or n-D (e.g. 3D (Z, Y, X)) map as float64, NaN/inf set to 0."""
    a = np.asarray(m, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"{name} must be 2D (H, W) or n-D (e.g. Z, Y, X), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def _region(region, shape: tuple[int, ...]) -> np.ndarray | None:
    if region is None:
        return None
    r = np.asarray(region) > 0
    if r.shape != shape:
        raise ValueError(f"region shape {r.shape} != map shape {shape}")
    return r


def _check_pair(m, mask, region=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(map, mask cut to the region, region or None); shapes must agree."""
    a = _as_nd_float(m)
    k = np.asarray(mask)
    if k.ndim != a.ndim:
        raise ValueError(f"mask must have the map's {a.ndim} dimensions, got shape {k.shape}")
    if a.shape != k.shape:
        raise ValueError(f"map shape {a.shape} != mask shape {k.shape}; register the map with resize_map_to")
    r = _region(region, a.shape)
    k = k > 0
    return a, (k if r is None else k & r), r


def _is_constant(a: np.ndarray) -> bool:
    return a.size == 0 or float(a.max() - a.min()) <= 0.0


def pointing_game(m, mask, tolerance_px: float = 15.0, *, spacing=None, region=None) -> bool | None:
    """Pointing game (Zhang et al., 2016): hit when the map's maximum lies within ``tolerance_px`` (Euclidean) of a
    lesion pixel / voxel. The tolerance is in pixels, or in the units of ``spacing`` (one value per axis, e.g. the
    (z, y, x) voxel size in mm) when given. ``region``: the maximum is taken inside it only and the mask is cut to
    it. ``None`` for an empty mask; ``False`` for a map constant (inside the region) — no maximum to point with.
    Ties at the maximum: the first in raster order is used. Works for 2D and n-D arrays alike."""
    a, k, r = _check_pair(m, mask, region)
    if not k.any():
        return None
    vals = a if r is None else a[r]
    if _is_constant(vals):
        return False
    flat = int(np.argmax(vals)) if r is None else int(np.flatnonzero(r)[int(np.argmax(vals))])
    p = np.array(np.unravel_index(flat, a.shape))
    if k[tuple(p)]:
        return True
    sp = np.ones(a.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sp.shape != (a.ndim,):
        raise ValueError(f"spacing needs one value per axis ({a.ndim}), got {spacing!r}")
    # distance from the maximum to the nearest lesion pixel (the exact Euclidean distance a distance transform gives)
    d2 = (((np.argwhere(k) - p) * sp) ** 2).sum(axis=1)
    return bool(np.sqrt(float(d2.min())) <= float(tolerance_px))


def energy_inside(m, mask, *, region=None) -> float | None:
    """Fraction of the map's positive energy inside the mask: ``sum(max(m,0) * mask) / sum(max(m,0))``; with a
    ``region``, both sums run over the region only (and the mask is cut to it).

    Only the positive part counts (evidence *for* the class; for signed attributions take ``abs`` first if both
    signs matter). ``None`` for an empty mask, 0.0 for a map without positive energy. A uniform map scores the
    mask's share of the area (of the region), which is the chance level. 2D or n-D."""
    a, k, r = _check_pair(m, mask, region)
    if not k.any():
        return None
    pos = np.clip(a, 0.0, None)
    total = float(pos.sum() if r is None else pos[r].sum())
    if total <= 0.0:
        return 0.0
    return float(pos[k].sum() / total)


def threshold_map(m, threshold: str | float = "isodata", *, region=None) -> np.ndarray:
    """Binary foreground of a map: ``"isodata"`` thresholds the raw map (``map > t``); a float thresholds the map
    scaled to [0, 1] (``normalise_map(map) > t``). With a ``region`` the threshold (and the scaling) comes from the
    map's values inside it and the foreground lies inside it. A constant map (inside the region) has no foreground.
    2D or n-D."""
    a = _as_nd_float(m)
    r = _region(region, a.shape)
    vals = a if r is None else a[r]
    if _is_constant(vals):
        return np.zeros(a.shape, dtype=bool)
    if isinstance(threshold, str):
        if threshold.lower() != "isodata":
            raise ValueError(f"threshold must be 'isodata' or a float, got {threshold!r}")
        fg = a > threshold_isodata(vals)
    else:
        lo, hi = float(vals.min()), float(vals.max())
        fg = (a - lo) / (hi - lo) > float(threshold)
    return fg if r is None else fg & r


def threshold_iou_dice(m, mask, threshold: str | float = "isodata", *,
                       region=None) -> tuple[float, float] | tuple[None, None]:
    """IoU and Dice between the thresholded map (``threshold_map``, same ``region``) and the mask (cut to the
    region). ``(None, None)`` for an empty mask; ``(0.0, 0.0)`` for a constant map (empty prediction). 2D or n-D."""
    a, k, r = _check_pair(m, mask, region)
    if not k.any():
        return None, None
    pred = threshold_map(a, threshold, region=r)
    inter = float(np.logical_and(pred, k).sum())
    ps, ks = float(pred.sum()), float(k.sum())
    union = ps + ks - inter
    iou = inter / union if union > 0 else 0.0
    dice = 2.0 * inter / (ps + ks) if (ps + ks) > 0 else 0.0
    return iou, dice


def _box_iou(b: Box, r0: int, r1: int, c0: int, c1: int) -> float:
    ir = max(0, min(b.r1, r1) - max(b.r0, r0))
    ic = max(0, min(b.c1, c1) - max(b.c0, c0))
    inter = ir * ic
    union = b.box_area + (r1 - r0) * (c1 - c0) - inter
    return inter / union if union > 0 else 0.0


def box_hit_rate(boxes: Sequence[Box], mask, iou_threshold: float | None = 0.1) -> dict:
    """Match boxes to lesion components (8-connected components of the mask).

    A box and a lesion match when the IoU of the box with the lesion's bounding box is ``>= iou_threshold``; with
    ``iou_threshold=None`` (or 0) any overlap of the box with a lesion *pixel* is a match.

    Returns ``{"box_precision": fraction of boxes matching >= 1 lesion (None if there are no boxes or no lesion),
    "lesion_recall": fraction of lesions matched by >= 1 box (None for an empty mask; 0.0 when there are no
    boxes), "n_boxes", "n_lesions"}``.
    """
    k = np.asarray(mask) > 0
    if k.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {k.shape}")
    boxes = list(boxes)
    labels, n_les = ndi.label(k, structure=np.ones((3, 3), dtype=bool))
    out = {"box_precision": None, "lesion_recall": None, "n_boxes": len(boxes), "n_lesions": int(n_les)}
    if n_les == 0:
        return out
    objs = ndi.find_objects(labels)
    hit = np.zeros((len(boxes), n_les), dtype=bool)
    for i, b in enumerate(boxes):
        if iou_threshold is None or iou_threshold <= 0:
            sub = labels[max(0, b.r0):max(0, b.r1), max(0, b.c0):max(0, b.c1)]
            ids = np.unique(sub[sub > 0])
            hit[i, ids - 1] = True
        else:
            for j, (rs, cs) in enumerate(objs):
                hit[i, j] = _box_iou(b, rs.start, rs.stop, cs.start, cs.stop) >= iou_threshold
    out["lesion_recall"] = float(hit.any(axis=0).mean())
    if boxes:
        out["box_precision"] = float(hit.any(axis=1).mean())
    return out


def score_image(
    m,
    mask,
    *,
    tolerance_px: float = 15.0,
    threshold: str | float = "isodata",
    with_boxes: bool = True,
    box_iou_threshold: float | None = 0.1,
    box_kwargs: Mapping | None = None,
) -> dict:
    """All scores of one map against one mask (the map is resized onto the mask when shapes differ).

    Keys: ``METRICS``; all ``None`` for an empty mask. ``pointing_game`` is reported as 1.0 / 0.0 so it averages
    into a hit rate. Boxes come from ``boxes_from_saliency(map, **box_kwargs)``.
    """
    k = np.asarray(mask) > 0
    a = _as_2d_float(m)
    if a.shape != k.shape:
        a = resize_map_to(a, k.shape)
    pg = pointing_game(a, k, tolerance_px)
    iou, dice = threshold_iou_dice(a, k, threshold)
    res = {
        "pointing_game": None if pg is None else float(pg),
        "energy_inside": energy_inside(a, k),
        "iou": iou,
        "dice": dice,
        "box_precision": None,
        "lesion_recall": None,
    }
    if with_boxes and k.any():
        bh = box_hit_rate(boxes_from_saliency(a, **dict(box_kwargs or {})), k, box_iou_threshold)
        res["box_precision"] = bh["box_precision"]
        res["lesion_recall"] = bh["lesion_recall"]
    return res


def score_explanations(
    maps: Mapping[str, Sequence],
    masks: Sequence,
    **score_kwargs,
) -> dict:
    """Score several explanation methods on the same images and aggregate.

    ``maps[name][i]`` is method ``name``'s map for image i, ``masks[i]`` its lesion mask (every list as long as
    ``masks``). Images with an empty mask are left out (counted in ``n_empty_mask``). For each method and metric:
    ``{"mean", "std" (population, ddof=0), "n"}`` over the images where the metric is defined (``n`` can be lower
    than ``n_scored`` for ``box_precision``, which is undefined when a map yields no box); ``mean``/``std`` are
    ``None`` when ``n == 0``. ``score_kwargs`` go to ``score_image``.

    Returns ``{name: {metric: {"mean", "std", "n"}, ..., "n_images", "n_scored", "n_empty_mask"}}``.
    """
    masks = list(masks)
    out: dict = {}
    for name, mlist in maps.items():
        mlist = list(mlist)
        if len(mlist) != len(masks):
            raise ValueError(f"method {name!r}: {len(mlist)} maps for {len(masks)} masks")
        vals: dict[str, list[float]] = {k: [] for k in METRICS}
        n_empty = 0
        for m, k in zip(mlist, masks):
            if not np.any(np.asarray(k) > 0):
                n_empty += 1
                continue
            s = score_image(m, k, **score_kwargs)
            for key in METRICS:
                if s[key] is not None:
                    vals[key].append(float(s[key]))
        agg: dict = {}
        for key in METRICS:
            v = np.asarray(vals[key], dtype=np.float64)
            agg[key] = {
                "mean": float(v.mean()) if v.size else None,
                "std": float(v.std()) if v.size else None,
                "n": int(v.size),
            }
        agg["n_images"] = len(masks)
        agg["n_scored"] = len(masks) - n_empty
        agg["n_empty_mask"] = n_empty
        out[name] = agg
    return out
