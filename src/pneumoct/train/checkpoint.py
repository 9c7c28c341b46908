"""Checkpoints without pickle: weights in ``model.safetensors``, everything else in ``model.json``.

    save_checkpoint(out_dir, model, "multiscale_cam_cpu", {"num_classes": 4}, meta={...})
    model, info = load_checkpoint(out_dir, expected_name="multiscale_cam_cpu")

``model.json`` holds ``format_version``, ``model_name`` and ``model_kwargs`` (the registry call that rebuilds the
network), the parameter count, the SHA-256 of the safetensors file, every tensor's name and shape, and ``meta``
(classes, input size, channels, windows, data provenance, whether the training data were synthetic ...).
The JSON is written last (after an atomic rename of the weights), so a folder without ``model.json`` is never a
usable checkpoint. Loading verifies the hash, the exact key set and every shape before ``load_state_dict``.

Training state for ``--resume`` (:func:`save_training_state` / :func:`load_training_state`) follows the same rule:
tensors (optimizer moments, torch RNG state) in ``state.safetensors``, the rest in ``state.json``.
Nothing here calls ``torch.load`` or unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import PneumoctInputError

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint_info", "sha256_file",
           "save_training_state", "load_training_state", "rng_state", "set_rng_state"]

FORMAT_VERSION = 1
WEIGHTS, INFO = "model.safetensors", "model.json"
STATE_T, STATE_J = "state.safetensors", "state.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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


def read_checkpoint_info(ckpt_dir: str | Path) -> dict:
    d = Path(ckpt_dir)
    if not (d / INFO).is_file():
        raise PneumoctInputError("bad_checkpoint", f"{d}: no {INFO} (not a finished checkpoint)")
    try:
        info = json.loads((d / INFO).read_text())
    except (OSError, ValueError) as exc:
        raise PneumoctInputError("bad_checkpoint", f"{d / INFO}: unreadable JSON ({exc})") from None
    for key in ("format_version", "model_name", "model_kwargs", "sha256", "tensors"):
        if key not in info:
            raise PneumoctInputError("bad_checkpoint", f"{d / INFO}: missing field {key!r}")
    if int(info["format_version"]) > FORMAT_VERSION:
        raise PneumoctInputError("bad_checkpoint", f"{d}: checkpoint format {info['format_version']} is newer "
                                 f"than this pneumoct ({FORMAT_VERSION})")
    return info


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
    from ..models import build_model, list_models

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


# ------------------------------------------------------------------------------------------------ training state
def rng_state() -> dict:
    """torch / numpy / python RNG states: (tensors, json-able dict)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _jsonable(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    n = state.get("numpy")
    if n:
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = state.get("python")
    if p:
        random.setstate((p[0], tuple(p[1]), p[2]))


def save_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                        best: dict | None, rng: dict | None = None, extra: dict | None = None) -> Path:
    """Resume state in folder ``path``: optimizer tensors + torch RNG in ``state.safetensors``; param groups,
    scalar optimizer entries, scheduler state, epoch, best, numpy/python RNG in ``state.json`` (written last)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    rng = rng if rng is not None else rng_state()
    if rng.get("torch") is not None:
        tensors["rng.torch"] = rng["torch"].contiguous().clone()
    (out / STATE_J).unlink(missing_ok=True)
    tmp = out / (STATE_T + ".tmp")
    save_file(tensors, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, out / STATE_T)
    info = {
        "format_version": FORMAT_VERSION,
        "sha256": digest,
        "epoch": int(epoch),
        "best": best,
        "param_groups": sd["param_groups"],
        "optimizer_scalars": scalars,
        "optimizer_class": optimizer.__class__.__name__,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"numpy": rng.get("numpy"), "python": rng.get("python")},
        "extra": extra or {},
    }
    _write_json_atomic(out / STATE_J, info)
    return out


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                        restore_rng: bool = True) -> dict:
    """Restore optimizer (and scheduler, RNG) from :func:`save_training_state`; returns the JSON dict
    (``epoch``, ``best``, ``extra``)."""
    d = Path(path)
    if not (d / STATE_J).is_file() or not (d / STATE_T).is_file():
        raise PneumoctInputError("bad_checkpoint", f"{d}: no complete training state to resume from")
    info = json.loads((d / STATE_J).read_text())
    if sha256_file(d / STATE_T) != info.get("sha256"):
        raise PneumoctInputError("bad_checkpoint", f"{d / STATE_T}: SHA-256 mismatch (file changed or corrupt)")
    if info.get("optimizer_class") != optimizer.__class__.__name__:
        raise PneumoctInputError("bad_checkpoint", f"{d}: saved optimizer {info.get('optimizer_class')} but the "
                                 f"config builds {optimizer.__class__.__name__}")
    tensors = load_file(str(d / STATE_T))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in info.get("optimizer_scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    if restore_rng:
        set_rng_state({"torch": tensors.get("rng.torch"), **(info.get("rng") or {})})
    return info
