"""Model checkpoints without pickle: weights in ``model.safetensors``, everything else in ``model.json``.

    save_checkpoint(out_dir, model, "multiscale_cam_cpu", {"num_classes": 4}, meta={...})
    model, info = load_checkpoint(out_dir, expected_name="multiscale_cam_cpu")

``model.json`` holds ``format_version``, ``model_name`` and ``model_kwargs`` (the registry call that rebuilds the
network), the parameter count, the SHA-256 of the safetensors file, every tensor's name and shape, and ``meta``
(classes, input size, channels, windows, data provenance, whether the training data were synthetic ...).
The JSON is written last (after an atomic rename of the weights), so a folder without ``model.json`` is never a
usable checkpoint. Loading verifies the hash, the exact key set and every shape before ``load_state_dict``.
Nothing here calls ``torch.load`` or unpickles anything.

This lives with the models (not with training) so that inference never imports training code; training state
for ``--resume`` is in :mod:`pneumoct.train.checkpoint`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import PneumoctInputError
from .checkpoint_info import (FORMAT_VERSION, INFO, WEIGHTS, _jsonable, _write_json_atomic, read_checkpoint_info,
                              sha256_file)

__all__ = ["FORMAT_VERSION", "WEIGHTS", "INFO", "save_checkpoint", "load_checkpoint", "read_checkpoint_info",
           "sha256_file", "for_cpu_inference", "channels_last_input"]


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(out_dir: str | Path, model: torch.nn.Module, model_name: str, model_kwargs: dict,
                    meta: dict | None = None) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``out_dir`` (atomically, JSON last). Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _state_tensors(model)
    (out / INFO).unlink(missing_ok=True)  # a half-replaced checkpoint must not look complete
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "model_name": model_name})
    digest = sha256_file(tmp)
    os.replace(tmp, out / WEIGHTS)
    info = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": _jsonable(dict(model_kwargs)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "weights_file": WEIGHTS,
        "sha256": digest,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "meta": _jsonable(dict(meta or {})),
    }
    _write_json_atomic(out / INFO, info)
    return out


def _mismatch_message(where: Path, expected: dict[str, tuple], got: dict[str, tuple]) -> str | None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shape = [f"{k} {list(got[k])} vs model {list(expected[k])}" for k in expected
             if k in got and tuple(got[k]) != tuple(expected[k])]
    if not (missing or unexpected or shape):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shape:
        parts.append(f"{len(shape)} with another shape (e.g. {'; '.join(shape[:3])})")
    return f"{where}: weights do not fit the architecture: " + ", ".join(parts)


def load_checkpoint(ckpt_dir: str | Path, expected_name: str | None = None, *, map_location: str = "cpu"):
    """Rebuild the model from ``model.json`` via the registry, verify and load the weights. Returns
    ``(model in eval mode, info dict)``. Every problem is a :class:`PneumoctInputError` with one clear line."""
    from . import build_model, list_models

    d = Path(ckpt_dir)
    info = read_checkpoint_info(d)
    name = info["model_name"]
    if expected_name is not None and name != expected_name:
        raise PneumoctInputError("bad_checkpoint", f"{d}: checkpoint holds {name!r}, expected {expected_name!r}")
    if name not in list_models():
        raise PneumoctInputError("bad_checkpoint", f"{d}: unknown model {name!r}")
    wpath = d / info.get("weights_file", WEIGHTS)
    if not wpath.is_file():
        raise PneumoctInputError("bad_checkpoint", f"{d}: weights file {wpath.name} missing")
    digest = sha256_file(wpath)
    if digest != info["sha256"]:
        raise PneumoctInputError("bad_checkpoint", f"{wpath}: SHA-256 mismatch (file changed or corrupt): "
                                 f"{digest[:12]}... != {str(info['sha256'])[:12]}...")
    try:
        model = build_model(name, **info["model_kwargs"])
    except (TypeError, ValueError) as exc:
        raise PneumoctInputError("bad_checkpoint", f"{d}: cannot build {name!r} from model_kwargs: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    declared = {k: tuple(v) for k, v in info["tensors"].items()}
    msg = _mismatch_message(d / INFO, expected, declared)
    if msg:
        raise PneumoctInputError("bad_checkpoint", msg)
    try:
        tensors = load_file(str(wpath), device=map_location)
    except Exception as exc:  # noqa: BLE001 - corrupt file: one line
        raise PneumoctInputError("bad_checkpoint", f"{wpath}: unreadable safetensors ({exc})") from None
    msg = _mismatch_message(wpath, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if msg:
        raise PneumoctInputError("bad_checkpoint", msg)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, info


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that takes only one Conv2d's output into that convolution (the BN becomes
    an Identity): one pass over the activations less per pair; outputs equal up to float rounding. Inference only
    (the running statistics are baked in). The pairs: consecutive children of an ``nn.Sequential``, and the
    attribute pairs a block declares in ``conv_bn_pairs`` (:mod:`pneumoct.models.blocks`). Returns the count."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def foldable(conv: object, bn: object) -> bool:
        return (type(conv) is torch.nn.Conv2d and type(bn) is torch.nn.BatchNorm2d and not bn.training
                and not conv.training and bn.track_running_stats and bn.running_mean is not None)

    n = 0
    for module in list(model.modules()):
        names = list(module._modules)
        pairs = list(zip(names, names[1:])) if isinstance(module, torch.nn.Sequential) else []
        pairs += [p for p in getattr(module, "conv_bn_pairs", ()) if p[0] in names and p[1] in names]
        for a, b in pairs:
            conv, bn = module._modules[a], module._modules[b]
            if foldable(conv, bn):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = torch.nn.Identity()
                n += 1
    return n


def for_cpu_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, batch norms folded into their convolutions (:func:`fold_batch_norms`), and channels-last memory
    for a network with 2D convolutions: on this project's CPUs the bundled 2D networks run ~1.4x faster that way
    (benchmarks/RESULTS.md); outputs equal up to float rounding."""
    model.eval()
    with torch.no_grad():
        model._pneumoct_folded_bn = fold_batch_norms(model)  # type: ignore[attr-defined]
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
        model._pneumoct_channels_last = True  # type: ignore[attr-defined]
    return model


def channels_last_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) laid out as the model prefers (see :func:`for_cpu_inference`)."""
    if getattr(model, "_pneumoct_channels_last", False) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()

