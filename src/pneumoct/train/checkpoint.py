"""Training state for ``--resume`` without pickle: :func:`save_training_state` / :func:`load_training_state` keep
tensors (optimizer moments, torch RNG state) in ``state.safetensors`` and the rest in ``state.json``, JSON last.
Nothing here calls ``torch.load`` or unpickles anything.

Model checkpoints (``model.safetensors`` + ``model.json``) live with the models, in
:mod:`pneumoct.models.checkpoint` (inference never imports training code); they are re-exported here.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import PneumoctInputError
from ..models.checkpoint import (FORMAT_VERSION, INFO, WEIGHTS, _jsonable, _write_json_atomic, load_checkpoint,
                                 read_checkpoint_info, save_checkpoint, sha256_file)

__all__ = ["FORMAT_VERSION", "WEIGHTS", "INFO", "save_checkpoint", "load_checkpoint", "read_checkpoint_info",
           "sha256_file", "save_training_state", "load_training_state", "rng_state", "set_rng_state"]

STATE_T, STATE_J = "state.safetensors", "state.json"


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
