"""Learned models inside ``diagnose``: load the bundled checkpoints and run them on a study.

Three bundled models (``src/pneumoct/weights/<name>/model.safetensors + model.json``; see
``docs/models.md`` and the model cards beside them):

- ``lesion_presence``: per-slice lesion / no lesion, Hu et al. multi-scale CAM network (CPU widths, 2 classes),
  trained on **real** data only (the three COVID-CT-MD studies with radiologist slice labels, COVID-19-CT-Seg
  PNG slices, MedSeg slices). Gives each slice's ``lesion_probability`` and a CAM location map.
- ``m3lung_slice`` + ``m3lung_patient``: the M3Lung-Sys pair (4 classes), trained on **synthetic phantoms**
  only. Gives per-slice class probabilities, the prototype location map, and the patient-level class.

Every 2D input goes through :mod:`pneumoct.preprocess.slice_input` (per-slice lung box from our 3D lung mask,
resize to the model's input size, HU window), the same path the training tables were built with.

``PNEUMOCT_WEIGHTS`` (a folder with the same layout) overrides the bundled folder; a missing model is skipped
and the result says so (``diagnose`` then falls back to the threshold baseline and the rule).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .models.onnx_runtime import onnx_backend_wanted
from .preprocess.slice_input import SliceInputs
from .preprocess.windowing import M3LUNG_INFERENCE_CENTERS, M3LUNG_WIDTH
from .types import CLASS_NAMES

log = logging.getLogger("pneumoct.learned")

__all__ = ["BundledModel", "LearnedOutput", "bundled_weights_dir", "load_bundled_models", "run_learned_models",
           "MODEL_KEYS"]

MODEL_KEYS = ("lesion_presence", "m3lung_slice", "m3lung_patient")


def bundled_weights_dir() -> Path:
    env = os.environ.get("PNEUMOCT_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


class BundledModel:
    """One bundled network, ready for inference: :meth:`run` gives its head's named outputs
    (:mod:`pneumoct.models.inference_heads`) with ONNX Runtime when the folder holds a current export (no PyTorch
    imported), else with PyTorch. ``model`` is the PyTorch network (loaded on first access on the ONNX path)."""

    def __init__(self, key: str, info: dict, path: Path, *, model: Any = None, onnx: Any = None):
        self.key, self.info, self.path = key, info, Path(path)
        self._model, self.onnx, self._head = model, onnx, None

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    @property
    def model(self) -> Any:
        if self._model is None:
            from .models.checkpoint import for_cpu_inference, load_checkpoint

            self._model = for_cpu_inference(load_checkpoint(self.path)[0])
        return self._model

    def run(self, inputs: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
        """``{input name: array}`` → ``{output name: float32 array}``; ``threads``: intra-op threads for this
        call (default: the cores pneumoct uses)."""
        if self.onnx is not None:
            return self.onnx.run(inputs, threads=threads)
        import torch

        from .models.inference_heads import build_head, head_for, run_head

        if self._head is None:
            self._head = build_head(head_for(self.info), self.model, self.info)
        prev = torch.get_num_threads()
        if threads is not None and threads != prev:
            torch.set_num_threads(max(1, int(threads)))
        try:
            return run_head(self._head, inputs)
        finally:
            if torch.get_num_threads() != prev:
                torch.set_num_threads(prev)

    @property
    def meta(self) -> dict:
        return dict(self.info.get("meta") or {})

    def provenance(self) -> dict:
        m = self.meta
        return {
            "name": self.key,
            "architecture": self.info.get("model_name"),
            "checkpoint": self.path.name,
            "sha256": self.info.get("sha256"),
            "backend": self.backend,
            "trained_on": m.get("trained_on", "unknown"),
            "data_kind": m.get("data_kind", "unknown"),
            "validation": m.get("validation_summary"),
        }


@lru_cache(maxsize=4)
def _load_cached(weights_dir: str, use_onnx: bool = True) -> tuple[tuple[str, BundledModel], ...]:
    from .models.checkpoint_info import read_checkpoint_info
    from .models.onnx_runtime import load_onnx

    out = []
    for key in MODEL_KEYS:
        d = Path(weights_dir) / key
        if not (d / "model.json").is_file():
            log.info("bundled model %s not found in %s", key, weights_dir)
            continue
        info = read_checkpoint_info(d)
        net = load_onnx(d, info) if use_onnx else None
        if net is not None:
            if net.default_threads > 1:  # diagnose runs the networks on one core less beside the threshold stage
                net.prepare(net.default_threads - 1)
            out.append((key, BundledModel(key, info, d, onnx=net)))
            continue
        from .models.checkpoint import for_cpu_inference, load_checkpoint  # torch only when a model needs it

        model, info = load_checkpoint(d)
        out.append((key, BundledModel(key, info, d, model=for_cpu_inference(model))))
    return tuple(out)


_PREFETCH: dict[str, Any] = {}


def prefetch_bundled_models(weights_dir: str | Path | None = None) -> None:
    """Start loading the bundled models in a background thread (ONNX Runtime sessions, ~0.2 s; or PyTorch and the
    weights, ~1.5 s, where a model has no current ONNX export), overlapping finding the lungs.
    ``load_bundled_models`` waits for it."""
    from .parallel import Background

    key = str(Path(weights_dir) if weights_dir else bundled_weights_dir())
    if key not in _PREFETCH:
        _PREFETCH[key] = Background(_load_cached, key, onnx_backend_wanted(), name="pneumoct-models")


def load_bundled_models(weights_dir: str | Path | None = None) -> dict[str, BundledModel]:
    """The bundled models found (loaded once per process and folder; a prefetch started earlier is waited for)."""
    key = str(Path(weights_dir) if weights_dir else bundled_weights_dir())
    bg = _PREFETCH.pop(key, None)
    if bg is not None:
        return dict(bg.result())
    return dict(_load_cached(key, onnx_backend_wanted()))


@dataclass
class LearnedOutput:
    """What the learned models said about one study. Arrays are per slice of the study (Z,); NaN where the
    slice held too little lung to be offered to a model."""

    lesion_probability: np.ndarray | None = None          # (Z,) real-data lesion-presence model (fused, see below)
    lesion_probability_model: np.ndarray | None = None    # (Z,) the model's own score, before fusion/calibration
    lesion_probability_kind: str = ""                     # "area" (calibrated threshold area) or "model"
    slice_class_probabilities: np.ndarray | None = None   # (Z, 4) M3Lung-Sys slice net (synthetic-trained)
    slice_lesion_probability_m3lung: np.ndarray | None = None  # (Z,) its multi-task lesion head
    patient_probabilities: np.ndarray | None = None       # (4,) M3Lung-Sys patient net (synthetic-trained)
    inputs: SliceInputs | None = None  # the study's shared 2D input chain (crop boxes, resizes, windows)
    cam_maps: dict[int, np.ndarray] = field(default_factory=dict)        # z -> (S, S) crop-grid CAM in [0, 1]
    prototype_maps: dict[int, np.ndarray] = field(default_factory=dict)  # z -> (S, S) crop-grid map in [0, 1]
    provenance: dict[str, dict] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def slice_map(self, kind: str, z: int) -> np.ndarray | None:
        """A location map registered to slice ``z`` of the study (full slice grid), or None."""
        maps = self.cam_maps if kind == "cam" else self.prototype_maps
        if z not in maps or self.inputs is None or self.inputs.crop(z) is None:
            return None
        return self.inputs.invert(maps[z].astype(np.float32), z)


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _normalise_maps(m: np.ndarray) -> np.ndarray:
    lo = m.reshape(len(m), -1).min(1)[:, None, None]
    hi = m.reshape(len(m), -1).max(1)[:, None, None]
    return ((m - lo) / np.maximum(hi - lo, 1e-8)).astype(np.float32)


def run_learned_models(hu: np.ndarray, lung_labels: np.ndarray, models: dict[str, BundledModel], *,
                       batch_size: int = 32, keep_maps: bool = True,
                       threshold_area_mm2: np.ndarray | Callable[[], np.ndarray] | None = None,
                       slice_probability: str = "area", threads: int | Callable[[], int | None] | None = None,
                       inputs: SliceInputs | None = None) -> LearnedOutput:
    """Run the bundled models on a (Z, Y, X) HU volume with its lung labels (canonical orientation).

    ``slice_probability`` decides what ``lesion_probability`` holds:
    ``"area"`` (default): the threshold baseline's lesion area per slice (``threshold_area_mm2``, (Z,)) through the
    logistic calibration stored with the lesion model (``meta.area_calibration``, fitted on the radiologist slice
    labels of the 3 real DICOM studies) — on those studies it ranks slices better than the network does on a
    study it never saw (docs/models.md); ``"model"``: the network's calibrated score. The network's own score is
    always in ``lesion_probability_model`` and its CAM maps are always computed. ``threshold_area_mm2`` may be a
    callable returning the areas (the threshold baseline running in another thread): it is called only after all
    networks ran. ``threads``: the networks' intra-op threads (None: all), or a callable asked before every
    batch — one while another stage uses the other core, so the two do not fight over it. ``inputs``: the
    study's shared :class:`~pneumoct.preprocess.slice_input.SliceInputs` (built here when not given)."""
    if slice_probability not in ("area", "model"):
        raise ValueError("slice_probability must be 'area' or 'model'")
    return _run_learned_models(hu, lung_labels, models, batch_size=batch_size, keep_maps=keep_maps,
                               threshold_area_mm2=threshold_area_mm2, slice_probability=slice_probability,
                               inputs=inputs, threads=threads)


def _run_learned_models(hu: np.ndarray, lung_labels: np.ndarray, models: dict[str, BundledModel], *,
                        batch_size: int, keep_maps: bool,
                        threshold_area_mm2: np.ndarray | Callable[[], np.ndarray] | None,
                        slice_probability: str, inputs: SliceInputs | None = None,
                        threads: int | Callable[[], int | None] | None = None) -> LearnedOutput:
    out = LearnedOutput()
    z_total = hu.shape[0]
    if not models:
        return out
    t = time.perf_counter()
    # one lung box per slice, shared with the segmenter; each model gets its own resize of it
    inputs = inputs if inputs is not None else SliceInputs(hu, lung_labels > 0)
    out.inputs = inputs
    z_idx = inputs.z
    if z_idx.size == 0:
        return out
    out.timing["crop"] = time.perf_counter() - t

    def batched(model: BundledModel, x_all: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S) inputs → the head's outputs for all N, ``batch_size`` at a time."""
        ch = int(model.meta.get("channels", 1))
        parts = []
        for b in _batches(len(x_all), batch_size):
            xb = x_all[b][:, None]
            parts.append(model.run({"x": np.broadcast_to(xb, (xb.shape[0], ch) + xb.shape[2:])},
                                   threads=threads() if callable(threads) else threads))
        return {k: np.concatenate([r[k] for r in parts]) for k in parts[0]}

    lesion = models.get("lesion_presence")
    if lesion is not None:
        t = time.perf_counter()
        c, w = lesion.meta.get("window", [-600.0, 1200.0])
        res = batched(lesion, inputs.inputs(int(lesion.meta.get("input_size", 96)), float(c), float(w),
                                            model="lesion_presence"))
        raw = res["probability"]
        p_model = np.full(z_total, np.nan, np.float32)
        p_model[z_idx] = raw
        out.lesion_probability_model = p_model
        area_cal = lesion.meta.get("area_calibration")
        use_area = slice_probability == "area" and area_cal and threshold_area_mm2 is not None
        if not use_area:
            p = np.full(z_total, np.nan, np.float32)
            p[z_idx] = calibrate(raw, lesion.meta.get("calibration"))
            out.lesion_probability = p
            out.lesion_probability_kind = "model"
        if keep_maps:
            out.cam_maps = {int(k): res["cam"][i].astype(np.float16) for i, k in enumerate(z_idx)}
        out.provenance["lesion_presence"] = lesion.provenance()
        out.timing["lesion_presence"] = time.perf_counter() - t

    m3 = models.get("m3lung_slice")
    if m3 is not None:
        t = time.perf_counter()
        centers = m3.meta.get("window_centers") or list(M3LUNG_INFERENCE_CENTERS)
        width = float(m3.meta.get("window_width", M3LUNG_WIDTH))
        m3_size = int(m3.meta.get("input_size", 128))
        cls_sum = les_sum = feat_sum = map_sum = None
        # M3Lung-Sys Sec. III-A-2: at inference the window centre is -700/-600/-500 (width 1200) and the
        # predicted scores and features are averaged over the three windows.
        for c in centers:
            res = batched(m3, inputs.inputs(m3_size, float(c), width, model="m3lung_slice"))
            cls_sum = _acc(cls_sum, res["class_probabilities"])
            feat_sum = _acc(feat_sum, res["features"])
            if "lesion_probability" in res:
                les_sum = _acc(les_sum, res["lesion_probability"])
            if keep_maps and "location_map" in res:
                map_sum = _acc(map_sum, res["location_map"])
        n_w = float(len(centers))
        cp = np.full((z_total, len(CLASS_NAMES)), np.nan, np.float32)
        cp[z_idx] = cls_sum / n_w
        out.slice_class_probabilities = cp
        if les_sum is not None:
            lp = np.full(z_total, np.nan, np.float32)
            lp[z_idx] = les_sum / n_w
            out.slice_lesion_probability_m3lung = lp
        if map_sum is not None:
            mp = _normalise_maps(map_sum / n_w)
            out.prototype_maps = {int(k): mp[i].astype(np.float16) for i, k in enumerate(z_idx)}
        out.provenance["m3lung_slice"] = m3.provenance()
        out.timing["m3lung_slice"] = time.perf_counter() - t

        patient = models.get("m3lung_patient")
        if patient is not None:
            t = time.perf_counter()
            feats = (feat_sum / n_w).astype(np.float32)[None]  # (1, N, D) slices in order
            res = patient.run({"features": feats}, threads=threads() if callable(threads) else threads)
            out.patient_probabilities = res["probabilities"][0].astype(np.float64)
            out.provenance["m3lung_patient"] = patient.provenance()
            out.timing["m3lung_patient"] = time.perf_counter() - t
    if lesion is not None and use_area:  # last: the areas may still be computed by another thread
        area = threshold_area_mm2() if callable(threshold_area_mm2) else threshold_area_mm2
        p = np.full(z_total, np.nan, np.float32)
        p[z_idx] = area_probability(np.asarray(area, np.float64)[z_idx], area_cal)
        out.lesion_probability = p
        out.lesion_probability_kind = "area"
    return out


def area_probability(area_mm2: np.ndarray, cal: dict) -> np.ndarray:
    """sigmoid(w * log(1 + threshold lesion area in mm2) + b), a logistic regression on the radiologist slice
    labels of the real DICOM studies (experiments/lesion_fusion.py, validated leave-one-study-out)."""
    s = float(cal["w_log1p_area_mm2"]) * np.log1p(np.maximum(np.asarray(area_mm2, np.float64), 0.0))
    return (1.0 / (1.0 + np.exp(-(s + float(cal["bias"]))))).astype(np.float32)


def calibrate(p: np.ndarray, cal: dict | None) -> np.ndarray:
    """Platt scaling stored with the model (``meta.calibration = {a, b}``): sigmoid(a * logit(p) + b). The
    lesion model sees two looks of slice in training (HU windowed, 8-bit CLAHE exports); its raw scores on the
    DICOM path are shifted, so it carries a calibration fitted on DICOM studies (see docs/models.md)."""
    if not cal:
        return p
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    return (1.0 / (1.0 + np.exp(-(float(cal["a"]) * z + float(cal["b"]))))).astype(np.float32)


def _acc(total: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if total is None else total + x
