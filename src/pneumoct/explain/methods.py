"""Explanation methods for the pneumoct networks, behind one call.

    from pneumoct.explain import explain
    res = explain(model, x, "integrated_gradients", class_idx=1)   # x: (B, C, H, W) float tensor
    res.primary            # (B, H, W) float32 in [0, 1]: the map to show (here the joint saliency)
    res.maps["conv4"]      # every map the method produced, same shape

Methods (``method=``):

``"cam"``  (MultiScaleCAMNet)
    Class activation maps of Conv3/4/5 and their pixel-wise product (Hu et al., Fig. 4; ``MultiScaleCAMNet.cam``).
``"integrated_gradients"``  (MultiScaleCAMNet; any model as a fallback)
    Hu et al. (``shared/seeds/weakly-supervised-multiscale.txt``), Methods, "A. Category-Specific Saliency":
    integrated gradients (Sundararajan et al.) of the class score, zero-image baseline, straight-line path,
    Riemann sum with m = 25 steps (Eq. 3), computed *at each of Conv3, Conv4 and Conv5*: for a multi-scale net the
    attributed score is the GMP score of one scale's head (``out["scores"][scale][:, c]``); the joint saliency is
    the pixel-wise product of the per-scale maps (Fig. 2e, ``joint_saliency``). Per-pixel saliency =
    |attribution| summed over input channels. Other models: one map ``"ig"`` of the class logit.
``"gradcam"``  (JCSClassifier, M3LungSliceNet, MultiScaleCAMNet, any CNN given ``target_layer``)
    Grad-CAM (Selvaraju et al.). For JCS: ``JCSClassifier.activation_map``, JCS Sec. III-A-2 Eqs. (1)-(2)
    (``w_k`` = spatial mean of ``dy/dX^k``; ``AM = sum_k ReLU(w_k X^k)``). For other models a hook-based
    implementation on a target layer (default: M3Lung ResBlock4 ``trunk.stages[3]``, MultiScaleCAMNet's last
    block, otherwise the last ``Conv2d``) with the usual ``ReLU(sum_k w_k A^k)``.
``"prototype"``  (M3LungSliceNet)
    M3Lung-Sys (``shared/seeds/m3lung-sys.txt``) Sec. III-B: distance between the ResBlock3 features and the
    selected lesion-head prototype, turned into a [0, 1] map (``location_map_full``). ``class_idx`` picks the
    prototype (0 = without lesion, 1 = with lesion); ``None`` keeps the model's own choice (the predicted one).

Every map is brought to the input resolution and min-max normalised to [0, 1] per image (a constant map becomes
all zeros). No randomness, no global state; the model's training mode is left as the caller set it (call
``model.eval()`` first: with batch norm in training mode, attributions mix the images of a batch). Research use
only, not a medical device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .boxes import joint_saliency, normalise_map

__all__ = [
    "ExplanationResult",
    "METHODS",
    "IG_STEPS",
    "explain",
    "explain_slices",
    "evaluate_explanations",
    "applicable_methods",
    "default_method",
    "model_family",
    "gradcam",
    "default_target_layer",
    "to_slice_grid",
    "as_model_input",
]

#: all method names
METHODS = ("cam", "integrated_gradients", "gradcam", "prototype")
#: Hu et al., Experiments: "20 to 30 steps were good enough ... we fix m = 25 in Eq. 3"
IG_STEPS = 25

_FAMILIES = ("multiscale_cam", "jcs", "m3lung", "generic")


@dataclass
class ExplanationResult:
    """Maps of one method for a batch. ``maps[name]`` (B, H, W) float32 in [0, 1] at input resolution;
    ``primary`` the one to show (``maps[primary_name]``); ``class_idx`` (B,) the explained class (for
    ``"prototype"``: the prototype used); ``params`` the settings (steps, layer, ...)."""

    method: str
    maps: dict[str, np.ndarray]
    primary_name: str
    class_idx: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def primary(self) -> np.ndarray:
        return self.maps[self.primary_name]

    def __getitem__(self, i: int) -> "ExplanationResult":
        """The result for image ``i`` of the batch (maps keep a batch axis of 1)."""
        return ExplanationResult(self.method, {k: v[i:i + 1] for k, v in self.maps.items()}, self.primary_name,
                                 self.class_idx[i:i + 1], dict(self.params))


# ------------------------------------------------------------------------------------------------ helpers
def model_family(model_or_name: Any) -> str:
    """``"multiscale_cam"``, ``"jcs"``, ``"m3lung"`` or ``"generic"`` for a model instance or a family / registry
    name (e.g. ``"m3lung_slice_cpu"``, ``"jcs_classifier"``)."""
    if isinstance(model_or_name, str):
        s = model_or_name.lower()
        for key, fam in (("multiscale", "multiscale_cam"), ("hu", "multiscale_cam"), ("jcs", "jcs"),
                         ("m3lung", "m3lung")):
            if s == key or s.startswith(key):
                return fam
        return "generic"
    from pneumoct.models.jcs import JCSClassifier
    from pneumoct.models.m3lung import M3LungSliceNet
    from pneumoct.models.multiscale_cam import MultiScaleCAMNet

    if isinstance(model_or_name, MultiScaleCAMNet):
        return "multiscale_cam"
    if isinstance(model_or_name, JCSClassifier):
        return "jcs"
    if isinstance(model_or_name, M3LungSliceNet):
        return "m3lung"
    return "generic"


def applicable_methods(model_or_family: Any) -> tuple[str, ...]:
    """Methods that make sense for a family, the paper's own first."""
    fam = model_family(model_or_family)
    return {
        "multiscale_cam": ("integrated_gradients", "cam", "gradcam"),
        "jcs": ("gradcam", "integrated_gradients"),
        "m3lung": ("prototype", "gradcam", "integrated_gradients"),
        "generic": ("gradcam", "integrated_gradients"),
    }[fam]


def default_method(model_or_family: Any) -> str:
    """The paper's method for the family: Hu et al. -> integrated gradients (joint saliency), JCS -> Grad-CAM
    activation map, M3Lung-Sys -> prototype location map; other CNNs -> Grad-CAM."""
    return applicable_methods(model_or_family)[0]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, Mapping):
        for k in ("logits", "class_logits"):
            if k in out and out[k] is not None:
                return out[k]
        raise KeyError("model output has neither 'logits' nor 'class_logits'")
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_input(model: nn.Module, x: Any) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    return x.detach().to(_model_device(model), torch.float32)


def _resolve_class(model: nn.Module, x: torch.Tensor, class_idx: Any) -> torch.Tensor:
    """(B,) long: ``None`` -> each image's predicted class; int -> broadcast; sequence -> as given."""
    b = x.shape[0]
    if class_idx is None:
        with torch.no_grad():
            return _logits(model(x)).argmax(1).long()
    idx = torch.as_tensor(np.array(class_idx), device=x.device).long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(b).clone()
    if idx.numel() != b:
        raise ValueError(f"class_idx has {idx.numel()} entries for a batch of {b}")
    return idx


def _to_input_res(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) bilinear, pixel centres aligned (``align_corners=False``)."""
    if tuple(m.shape[-2:]) == tuple(hw):
        return m
    return F.interpolate(m[:, None].float(), size=hw, mode="bilinear", align_corners=False)[:, 0]


def _norm_batch(m: Any) -> np.ndarray:
    """(B, H, W) -> float32, each image min-max scaled to [0, 1] (constant -> zeros, NaN/inf -> 0)."""
    a = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
    return np.stack([normalise_map(a[i]) for i in range(a.shape[0])]).astype(np.float32)


def _joint(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image pixel-wise product (Hu et al., Fig. 2e) of (B, H, W) maps, renormalised to [0, 1]."""
    b = maps[0].shape[0]
    return np.stack([normalise_map(joint_saliency([m[i] for m in maps])) for i in range(b)]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- Grad-CAM
def default_target_layer(model: nn.Module) -> nn.Module:
    """Grad-CAM layer: M3Lung ResBlock4 (``trunk.stages[3]``), MultiScaleCAMNet last block, JCS ``layer4``,
    else the last ``Conv2d`` of the model."""
    fam = model_family(model)
    if fam == "m3lung":
        return model.trunk.stages[3]
    if fam == "multiscale_cam":
        return model.blocks[-1]
    if fam == "jcs":
        return model.backbone.layer4
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ValueError("no Conv2d in the model: pass target_layer=")
    return last


def gradcam(model: nn.Module, x: torch.Tensor, target_layer: nn.Module | None = None, class_idx: Any = None, *,
            score_fn: Callable[[Any], torch.Tensor] | None = None, relu_inside: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Generic Grad-CAM on ``target_layer`` (hooks; no external package).

    ``w_k = mean_ij d y_c / d A^k_ij`` (JCS Eq. (1)); map = ``ReLU(sum_k w_k A^k)`` (Selvaraju et al.), or
    ``sum_k ReLU(w_k A^k)`` with ``relu_inside`` (JCS Eq. (2) as written). ``y_c`` is the class logit
    (``score_fn(output) -> (B, K)`` to pick another head). Returns ``(maps (B, H, W) float32 in [0, 1] at input
    resolution, class_idx (B,))``. Images are independent as long as the model is in eval mode.
    """
    x = _check_input(model, x)
    layer = target_layer if target_layer is not None else default_target_layer(model)
    idx = _resolve_class(model, x, class_idx)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        store["a"] = out[0] if isinstance(out, (tuple, list)) else out

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xi = x.clone().requires_grad_(True)  # so the activation needs a gradient even with frozen weights
            out = model(xi)
            logits = score_fn(out) if score_fn is not None else _logits(out)
            y = logits.gather(1, idx[:, None]).sum()
            a = store.get("a")
            if a is None:
                raise RuntimeError("target layer was not called in the forward pass")
            g = torch.autograd.grad(y, a)[0]
    finally:
        h.remove()
    a, g = a.detach(), g.detach()
    w = g.mean(dim=(2, 3), keepdim=True)                              # JCS Eq. (1) / Grad-CAM weights
    cam = F.relu(w * a).sum(1) if relu_inside else F.relu((w * a).sum(1))
    return _norm_batch(_to_input_res(cam, tuple(x.shape[-2:]))), idx.cpu().numpy()


# --------------------------------------------------------------------------------------- the methods
def _cam(model, x, class_idx, **_):
    idx = _resolve_class(model, x, class_idx)
    res = model.cam(x, class_idx=idx)
    maps = {k: _norm_batch(v) for k, v in res.items() if k != "joint"}
    # MultiScaleCAMNet.cam's joint is the product of the normalised maps; renormalise to [0, 1] per image
    maps["joint"] = _norm_batch(res["joint"])
    return maps, "joint", idx, {"scales": list(model.use_scales)}


def _ig_attr(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, idx: torch.Tensor, n_steps: int,
             internal_batch_size: int | None, method: str) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        # Hu et al., Eq. 2-3: baseline x' = zero image, straight-line path, m-step Riemann sum
        attr = ig.attribute(x, baselines=torch.zeros_like(x), target=idx, n_steps=int(n_steps), method=method,
                            internal_batch_size=internal_batch_size)
    return attr.detach().abs().sum(1)  # |attribution| summed over input channels -> (B, H, W)


def _integrated_gradients(model, x, class_idx, *, n_steps: int = IG_STEPS, internal_batch_size: int | None = None,
                          ig_method: str = "riemann_right", scales: Sequence[str] | None = None, **_):
    idx = _resolve_class(model, x, class_idx)
    params = {"n_steps": int(n_steps), "baseline": "zeros", "ig_method": ig_method,
              "internal_batch_size": internal_batch_size}
    if model_family(model) == "multiscale_cam":
        use = tuple(scales) if scales is not None else tuple(model.use_scales)
        maps = {}
        for s in use:
            # Hu et al., "A. Category-Specific Saliency": integrated gradients computed at each of Conv3/4/5, i.e.
            # of the class score of that scale's 1x1-conv + GMP head
            fwd = (lambda inp, _s=s: model(inp)["scores"][_s])
            maps[s] = _norm_batch(_ig_attr(fwd, x, idx, n_steps, internal_batch_size, ig_method))
        # Hu et al.: "a joint saliency can be obtained ... by pixel-wise multiplication between the multi-scale
        # integrated gradients" (Fig. 2e)
        maps["joint"] = _joint([maps[s] for s in use])
        params["scales"] = list(use)
        return maps, "joint", idx, params
    fwd = (lambda inp: _logits(model(inp)))
    return {"ig": _norm_batch(_ig_attr(fwd, x, idx, n_steps, internal_batch_size, ig_method))}, "ig", idx, params


def _gradcam(model, x, class_idx, *, target_layer: nn.Module | None = None, score: str = "prob",
             relu_inside: bool | None = None, **_):
    fam = model_family(model)
    if fam == "jcs" and target_layer is None:
        # JCS Sec. III-A-2, Eqs. (1)-(2), the model's own implementation (y_p = softmax probability by default)
        idx = _resolve_class(model, x, class_idx)
        maps = []
        for c in torch.unique(idx).tolist():
            sel = idx == c
            maps.append((sel, model.activation_map(x[sel], int(c), score=score, create_graph=False)))
        am = torch.zeros(x.shape[0], *x.shape[-2:], device=x.device)
        for sel, m in maps:
            am[sel] = m.detach().float()
        return {"gradcam": _norm_batch(am)}, "gradcam", idx, {"layer": "backbone.layer4", "score": score,
                                                              "formula": "JCS Eq. (1)-(2)"}
    layer = target_layer if target_layer is not None else default_target_layer(model)
    name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    m, idx = gradcam(model, x, layer, class_idx, relu_inside=bool(relu_inside))
    return {"gradcam": m}, "gradcam", torch.as_tensor(idx), {"layer": name, "score": "logit",
                                                             "relu_inside": bool(relu_inside)}


def _prototype(model, x, class_idx, **_):
    if model_family(model) != "m3lung":
        raise ValueError("'prototype' needs an M3LungSliceNet")
    if not model.multitask:
        raise ValueError("'prototype' needs an M3LungSliceNet with multitask=True (the lesion head)")
    store: dict[str, torch.Tensor] = {}
    h = model.trunk.stages[2].register_forward_hook(lambda _m, _i, o: store.__setitem__("f3", o))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        h.remove()
    if class_idx is None:
        # the model's own map: prototype of the predicted lesion class (M3Lung-Sys Sec. III-B)
        full = out["location_map_full"]
        if model.map_prototype == "predicted":
            idx = out["lesion_logits"].argmax(1)
        else:
            idx = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        lowres = out["location_map"]
    else:
        idx = _resolve_class(model, x, class_idx)
        if bool((idx < 0).any()) or bool((idx > 1).any()):
            raise ValueError("prototype class_idx must be 0 (without lesion) or 1 (with lesion)")
        with torch.no_grad():
            # location_map picks the argmax of the logits it is given: a one-hot of the wanted prototype
            lowres = model.location_map(store["f3"], F.one_hot(idx, 2).float())
        full = _to_input_res(lowres, tuple(x.shape[-2:])).clamp(0, 1)
    return ({"prototype": _norm_batch(full)}, "prototype", idx,
            {"layer": "trunk.stages[2] (ResBlock3)", "feature_grid": list(lowres.shape[-2:]),
             "prototype": "predicted" if class_idx is None else "given"})


_IMPL = {"cam": _cam, "integrated_gradients": _integrated_gradients, "gradcam": _gradcam, "prototype": _prototype}
_ALIASES = {"ig": "integrated_gradients", "grad_cam": "gradcam", "grad-cam": "gradcam", "activation_map": "gradcam",
            "location_map": "prototype"}


def explain(model: nn.Module, x: Any, method: str | None = None, *, class_idx: Any = None, **opts) -> ExplanationResult:
    """Explain ``model``'s decision on ``x`` (B, C, H, W) with ``method`` (``default_method(model)`` when None).

    ``class_idx``: None (each image's predicted class), an int or a (B,) sequence. ``opts`` per method:
    ``integrated_gradients``: ``n_steps`` (25), ``internal_batch_size`` (None = all steps at once),
    ``ig_method`` ("riemann_right" = Hu et al. Eq. 3), ``scales``; ``gradcam``: ``target_layer``, ``score``
    (JCS: "prob" | "logit"), ``relu_inside``.
    """
    method = default_method(model) if method is None else _ALIASES.get(method.lower(), method.lower())
    if method not in _IMPL:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    fam = model_family(model)
    if method == "cam" and fam != "multiscale_cam":
        raise ValueError("'cam' needs a MultiScaleCAMNet")
    x = _check_input(model, x)
    maps, primary, idx, params = _IMPL[method](model, x, class_idx, **opts)
    idx = np.asarray(idx.detach().cpu().numpy() if torch.is_tensor(idx) else idx, dtype=np.int64).reshape(-1)
    return ExplanationResult(method=method, maps=maps, primary_name=primary, class_idx=idx,
                             params={"family": fam, **params})


# -------------------------------------------------------------------------------------- slices helpers
def _in_channels(model: nn.Module) -> int:
    c = getattr(model, "in_channels", None)
    if isinstance(c, int):
        return c
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 1


def as_model_input(model: nn.Module, images01: Any) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, C, H, W) images in [0, 1] -> (B, C, H, W) float tensor on the model's device; a
    single channel is repeated when the model wants C > 1 channels."""
    x = images01 if torch.is_tensor(images01) else torch.as_tensor(np.asarray(images01, dtype=np.float32))
    x = x.float()
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3:
        x = x[:, None]
    c = _in_channels(model)
    if x.shape[1] != c:
        if x.shape[1] != 1:
            raise ValueError(f"model wants {c} channels, input has {x.shape[1]}")
        x = x.expand(-1, c, -1, -1)
    return x.contiguous().to(_model_device(model))


def explain_slices(model: nn.Module, family: str | None, x: Any, methods: Sequence[str] | None = None, *,
                   class_idx: Any = None, batch_size: int = 16, **opts) -> dict[str, ExplanationResult]:
    """Run several methods (default: ``applicable_methods(family or model)``) on slices ``x`` (see
    ``as_model_input``), in batches of ``batch_size``. Returns ``{method: ExplanationResult}`` over all slices.
    Options not known to a method are ignored by it."""
    fam = model_family(family) if family else model_family(model)
    if fam == "generic":
        fam = model_family(model)
    methods = list(methods) if methods is not None else list(applicable_methods(fam))
    x = as_model_input(model, x)
    b = x.shape[0]
    cls = None if class_idx is None else np.broadcast_to(np.asarray(class_idx).reshape(-1), (b,))
    out: dict[str, ExplanationResult] = {}
    for meth in methods:
        parts = []
        for s in range(0, b, max(1, int(batch_size))):
            parts.append(explain(model, x[s:s + batch_size], meth,
                                 class_idx=None if cls is None else cls[s:s + batch_size], **opts))
        first = parts[0]
        out[first.method] = ExplanationResult(
            first.method, {k: np.concatenate([p.maps[k] for p in parts]) for k in first.maps}, first.primary_name,
            np.concatenate([p.class_idx for p in parts]), first.params)
    return out


def to_slice_grid(crop_map: np.ndarray, crop, *, fill: float = 0.0) -> np.ndarray:
    """A map on the model-input (crop) grid, (H, W) or (..., H, W), registered onto the original slice grid
    (``map_back_to_slice``: bilinear resize to the lung box, pasted into the slice, ``fill`` outside the box)."""
    from pneumoct.preprocess.slice_input import map_back_to_slice

    return map_back_to_slice(np.asarray(crop_map, dtype=np.float32), crop, order=1, fill=fill)


# ------------------------------------------------------------------------------------------ evaluation
def _random_maps(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def evaluate_explanations(model: nn.Module, family: str | None, images01: Any, masks: Any,
                          methods: Sequence[str] | None = None, *, class_idx: Any = None, batch_size: int = 16,
                          all_maps: bool = True, random_seed: int = 0, score_kwargs: Mapping | None = None,
                          **opts) -> dict:
    """Score every method's maps against lesion masks.

    ``images01`` (N, H, W) or (N, C, H, W) in [0, 1]; ``masks`` (N, H, W) lesion masks (> 0 = lesion; images with
    an empty mask are counted but not scored). Each method's ``primary`` map is scored under the method's name;
    with ``all_maps`` its other maps too, as ``"method/map"`` (e.g. ``"integrated_gradients/conv4"``).
    ``"random"`` is a uniform-noise control map (seeded, so repeatable); ``"chance_energy"`` is the mean
    lesion-area fraction, the energy-inside score of a uniform map.

    Returns ``{"methods": {name: {"pointing_game", "energy_inside", "iou", "dice", "box_precision",
    "lesion_recall", "n"} (means) }, "detail": score_explanations output, "n_images", "n_scored",
    "chance_energy", "class_idx_counts", "params"}``.
    """
    from .scores import METRICS, score_explanations

    masks = np.asarray(masks) > 0
    x = as_model_input(model, images01)
    if masks.ndim != 3 or masks.shape[0] != x.shape[0]:
        raise ValueError(f"masks must be (N, H, W) with N = {x.shape[0]}, got {masks.shape}")
    res = explain_slices(model, family, x, methods, class_idx=class_idx, batch_size=batch_size, **opts)
    maps: dict[str, Any] = {}
    params: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    for meth, r in res.items():
        maps[meth] = list(r.primary)
        if all_maps:
            for k, v in r.maps.items():
                if k != r.primary_name:
                    maps[f"{meth}/{k}"] = list(v)
        params[meth] = {**r.params, "primary": r.primary_name}
        u, c = np.unique(r.class_idx, return_counts=True)
        counts[meth] = {str(int(a)): int(b) for a, b in zip(u, c)}
    maps["random"] = list(_random_maps((x.shape[0],) + tuple(x.shape[-2:]), random_seed))
    detail = score_explanations(maps, list(masks), **dict(score_kwargs or {}))
    summary = {}
    for name, agg in detail.items():
        summary[name] = {k: agg[k]["mean"] for k in METRICS}
        summary[name]["n"] = agg["n_scored"]
    nonempty = masks.reshape(len(masks), -1).any(1)
    return {
        "methods": summary,
        "detail": detail,
        "n_images": int(len(masks)),
        "n_scored": int(nonempty.sum()),
        "chance_energy": float(masks[nonempty].reshape(int(nonempty.sum()), -1).mean(1).mean()) if nonempty.any()
        else None,
        "class_idx_counts": counts,
        "params": params,
    }
