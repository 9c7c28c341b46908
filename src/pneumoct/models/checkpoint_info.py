"""What a checkpoint folder declares (``model.json``), read without PyTorch: the format constants, the JSON reader
that validates it, file hashing and atomic JSON writes. :mod:`pneumoct.models.checkpoint` (weights, PyTorch) and
:mod:`pneumoct.models.onnx_runtime` (the ONNX Runtime path, which never imports PyTorch) both build on it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PneumoctInputError

__all__ = ["FORMAT_VERSION", "WEIGHTS", "INFO", "read_checkpoint_info", "sha256_file"]

FORMAT_VERSION = 1
WEIGHTS, INFO = "model.safetensors", "model.json"


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
