"""DeepSC-COVID as a 3D system of ``diagnose --model deepsc`` (:mod:`pneumoct.volumetric`).

    out = analyse(study, lung_labels)              # bundled weights/deepsc (or $PNEUMOCT_WEIGHTS/deepsc)
    out.probabilities, out.maps["segmentation"], out.maps["evidence"], out.lesion_mask

Steps: the recorded input chain (:mod:`pneumoct.preprocess.volume_deepsc`, sizes from the checkpoint's
``input_spec``) -> one forward pass of the whole study (its patches + its N sampled slices) -> maps back on the study
grid, zero outside the lungs:

* ``segmentation``: the lesion probability S^ of Eq. (3);
* ``evidence``: the multi-layer lesion evidence masks V_1..V_3 of Eq. (5) for the predicted class, each ReLU-ed
  and scaled to [0, 1], brought to the classification input's grid, averaged, and spread from the N sampled slices
  over all slices (linear in z). The paper computes them in training only (for the task-aware loss); shown here as
  the classification subnet's explanation.

``lesion_mask``: S^ >= 0.5 inside the lungs (0 / 1).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PneumoctInputError
from ..volumetric import VolumetricOutput

__all__ = ["analyse", "weights_path", "load", "KEY", "infer"]

KEY = "deepsc"
_CACHE: dict[tuple[str, str], tuple[Any, dict]] = {}
_LOCK = threading.Lock()


def weights_path(weights_dir: str | Path | None = None) -> Path:
    """``weights_dir`` itself when it holds a checkpoint, else ``weights_dir/deepsc``; default the bundled weights
    (``$PNEUMOCT_WEIGHTS`` when set)."""
    from ..learned import bundled_weights_dir

    base = Path(weights_dir) if weights_dir else bundled_weights_dir()
    return base if (base / "model.json").is_file() else base / KEY


def load(weights_dir: str | Path | None = None) -> tuple[Any, dict]:
    """(model in eval mode, checkpoint info), verified by :func:`~pneumoct.models.checkpoint.load_checkpoint` and
    cached per folder and weights hash."""
    from .checkpoint import load_checkpoint, read_checkpoint_info

    path = weights_path(weights_dir)
    if not (path / "model.json").is_file():
        raise PneumoctInputError("not_found", f"no DeepSC-COVID weights in {path} (train configs/deepsc_cpu.yaml "
                                 "and install the run: python -m pneumoct.train.bundle RUN --as deepsc)")
    key = (str(path.resolve()), str(read_checkpoint_info(path).get("sha256")))
    with _LOCK:
        if key not in _CACHE:
            model, info = load_checkpoint(path)
            if (info.get("meta") or {}).get("family") != "deepsc":
                raise PneumoctInputError("bad_checkpoint", f"{path}: not a DeepSC-COVID checkpoint")
            _CACHE[key] = (model, info)
        return _CACHE[key]


def infer(model: Any, pv: Any) -> dict[str, np.ndarray]:
    """One forward pass on a :class:`~pneumoct.preprocess.volume_deepsc.PreparedVolume`: ``probs`` (K,),
    ``segmentation`` (n_real, H, W) and ``evidence`` (n_real, H, W) on the model grid, both in [0, 1]."""
    import torch
    import torch.nn.functional as F

    from .losses import normalise_evidence

    with torch.no_grad():
        patches = torch.from_numpy(np.ascontiguousarray(pv.patches()))[:, None]
        x_cls = torch.from_numpy(np.ascontiguousarray(pv.cls_input()))[None, None]
        idx = torch.from_numpy(pv.cls_index)
        out = model(patches, x_cls, idx)
        probs = torch.softmax(out["logits"].float(), 1)[0]
        seg = torch.sigmoid(out["seg_logits"][:, 0]).reshape(-1, *patches.shape[-2:])[: pv.n_real]
        size = x_cls.shape[2:]
        ev = model.evidence(out, probs.argmax()[None])  # Eq. (5) of the predicted class
        ev = torch.stack([F.interpolate(normalise_evidence(v), size=size, mode="trilinear", align_corners=False)
                          for v in ev]).mean(0)[0, 0]
    return {"probs": probs.numpy().astype(np.float64), "segmentation": seg.numpy(),
            "evidence": pv.cls_to_model_grid(ev.clamp(0, 1).numpy())}


def analyse(study: Any, lung_labels: np.ndarray, weights_dir: str | None = None) -> VolumetricOutput:
    """The DeepSC-COVID reading of a study (module docstring); maps and mask on the study grid."""
    from ..preprocess.volume_deepsc import DeepSCInputSpec, prepare

    timing: dict[str, float] = {}
    t = time.perf_counter()
    model, info = load(weights_dir)
    timing["load"] = time.perf_counter() - t
    meta = dict(info.get("meta") or {})
    names = tuple(meta.get("classes") or [])
    if len(names) != model.num_classes:
        raise PneumoctInputError("bad_checkpoint", f"{weights_path(weights_dir)}: {len(names)} class names for "
                                 f"{model.num_classes} outputs")
    t = time.perf_counter()
    lung = np.asarray(lung_labels) > 0
    pv = prepare(study.hu, lung, study.spacing, DeepSCInputSpec.from_dict(meta.get("input_spec") or {}))
    timing["prepare"] = time.perf_counter() - t
    t = time.perf_counter()
    res = infer(model, pv)
    timing["network"] = time.perf_counter() - t
    t = time.perf_counter()
    maps = {}
    for name in ("segmentation", "evidence"):
        m = pv.to_study_grid(res[name])
        m *= lung  # the inputs were lung-masked: nothing outside the lung is a finding
        maps[name] = np.clip(m, 0.0, 1.0, out=m)
    lesion = (maps["segmentation"] >= 0.5).astype(np.uint8)
    timing["to_study_grid"] = time.perf_counter() - t
    probs = {n: float(p) for n, p in zip(names, res["probs"])}
    data = meta.get("data") or {}
    return VolumetricOutput(
        system=KEY, class_names=names, probabilities=probs, maps=maps, lesion_mask=lesion,
        info={"architecture": f"DeepSC-COVID (Wang et al., IEEE TMI 2022), {info.get('model_name')}, "
                              f"{info.get('parameters')} parameters",
              "weights_sha256": info.get("sha256"),
              "trained_on": meta.get("trained_on") or ", ".join(data.get("sources") or []) or "unknown",
              "data_kind": meta.get("data_kind") or data.get("training_data"),
              "validation": meta.get("validation_summary") or meta.get("val"),
              "target": meta.get("target"), "input_chain": pv.record(),
              "maps": {"segmentation": "lesion probability S^ (Eq. 3)",
                       "evidence": "multi-layer lesion evidence V1-V3 of the predicted class (Eq. 5), mean of the "
                                   "three, each scaled to [0, 1]"},
              "timing_s": {k: round(v, 3) for k, v in timing.items()}})
