"""Networks, one paper family per file, built by name from a small registry.

    from pneumoct.models import build_model, list_models
    net = build_model("multiscale_cam", num_classes=3)

Each family file registers its builders with :func:`register`. Importing this package imports the family files
that exist, so ``list_models()`` shows everything shipped.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register("m3lung_slice")`` on a builder function returning an ``nn.Module``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def build_model(name: str, **kwargs: Any) -> Any:
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def family_of(model_name: str) -> str:
    """The model family a registry name belongs to (checkpoints record it as ``meta.family``)."""
    from ..errors import PneumoctInputError

    if model_name.startswith("dual_sampling"):
        return "dual_sampling"
    if model_name.startswith("jcs_seg") or model_name.startswith("unet"):
        return "segmentation"
    if model_name.startswith("deepsc"):
        return "deepsc"
    if model_name.startswith("multiscale_cam"):
        return "multiscale_cam"
    if model_name.startswith("m3lung_slice"):
        return "m3lung_slice"
    if model_name.startswith("m3lung_patient"):
        return "m3lung_patient"
    if model_name.startswith("jcs"):
        return "jcs"
    raise PneumoctInputError("bad_config", f"cannot tell the family of model {model_name!r}; set 'family'")


_FAMILIES = ("multiscale_cam", "m3lung", "jcs", "jcs_seg", "unet", "deepsc", "dual_sampling")


def _load_families() -> None:
    for fam in _FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as exc:  # a family file not written yet
            if exc.name != f"{__name__}.{fam}":
                raise
