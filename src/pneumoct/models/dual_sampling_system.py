"""The dual-sampling attention system for ``pneumoct diagnose --model dual-sampling`` (see
:mod:`pneumoct.volumetric`): pre-process the study (:mod:`pneumoct.preprocess.volume_dual`), run the uniform-
sampling (US) and size-balanced-sampling (SS) attention networks, combine them by Eq. 5 with the weight chosen
from the infection ratio, and return P(COVID-19) / P(CAP) and both attention maps on the study grid.

The infection ratio (lesion volume / lung volume) comes from our own HU-threshold lesion finder
(:func:`pneumoct.quantify.threshold_baseline.find_lesions_threshold`) on the given lung labels, as the paper's came
from its segmentation toolkit. It only picks Eq. 5's weight (0.35 vs 0.96).

Weights: ``weights_dir`` (a folder holding ``us/`` and ``ss/`` checkpoints, or a weights root holding
``dual_sampling/``), else the bundled ``pneumoct/weights/dual_sampling`` (``$PNEUMOCT_WEIGHTS`` honoured).
Classes: COVID-19 vs community-acquired pneumonia only; a normal or other-viral study still gets a COVID-19-vs-CAP
score, which then means nothing (said in ``info``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PneumoctInputError
from ..volumetric import VolumetricOutput

__all__ = ["analyse", "resolve_weights", "load_networks", "infection_ratio", "prepare_input", "network_output",
           "predict_network", "SYSTEM", "CLASS_NAMES"]

SYSTEM = "dual-sampling"
CLASS_NAMES = ("covid19", "cap")
NETWORKS = ("us", "ss")
_CACHE: dict[tuple, dict] = {}


def resolve_weights(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder with ``us/`` and ``ss/``: ``weights_dir`` itself or its ``dual_sampling/``; None -> bundled."""
    if weights_dir is None:
        from ..learned import bundled_weights_dir  # $PNEUMOCT_WEIGHTS or the bundled folder, as for every model

        cands = [bundled_weights_dir() / "dual_sampling"]
    else:
        cands = [Path(weights_dir), Path(weights_dir) / "dual_sampling"]
    for c in cands:
        if all((c / n / "model.json").is_file() for n in NETWORKS):
            return c
    raise PneumoctInputError("missing_weights", f"no dual-sampling weights (us/ and ss/ checkpoints) in "
                             f"{' or '.join(str(c) for c in cands)}")


def load_networks(folder: Path) -> dict:
    """``{"us": (model, info), "ss": (model, info)}``, loaded once per folder and weights hash (safetensors,
    hash and shapes verified by :func:`pneumoct.models.checkpoint.load_checkpoint`)."""
    from .checkpoint import load_checkpoint, read_checkpoint_info

    key = (str(folder.resolve()),) + tuple(read_checkpoint_info(folder / n)["sha256"] for n in NETWORKS)
    if key not in _CACHE:
        nets = {}
        for n in NETWORKS:
            model, info = load_checkpoint(folder / n, expected_name="dual_sampling_rn34")
            nets[n] = (model.float().eval(), info)  # bundled weights may be stored in half precision
        _CACHE.clear()
        _CACHE[key] = nets
    return _CACHE[key]


def prepare_input(hu: np.ndarray, spacing: Any, lung_labels: np.ndarray, meta: dict) -> tuple[np.ndarray, Any]:
    """The network input (D, H, W) of a study by the checkpoint's recorded chain (``meta["prep"]``), and the record
    that maps network-grid maps back to the study grid."""
    from ..preprocess.volume_dual import DualPrepConfig, prepare_volume

    x, _, rec = prepare_volume(hu, spacing, lung_labels, DualPrepConfig.from_dict(meta["prep"]))
    return x, rec


def network_output(model: Any, x: np.ndarray, rec: Any, lung_labels: np.ndarray) -> tuple[float, np.ndarray]:
    """One network on one prepared input: (P(COVID-19), attention map T(A) on the study grid, zero outside the
    lungs)."""
    from ..preprocess.volume_dual import to_study_grid

    with torch.inference_mode():
        out = model(torch.from_numpy(x)[None, None], return_attention=True)
        p = float(torch.sigmoid(out["logit"])[0])
        m = to_study_grid(out["attention"][0, 0], rec)
    m *= np.asarray(lung_labels) > 0  # the input was lung-masked: attention outside the lungs carries no evidence
    return p, np.clip(m, 0.0, 1.0, out=m)


def predict_network(net: tuple[Any, dict], study: Any, lung_labels: np.ndarray) -> float:
    """P(COVID-19) of ONE network (``(model, checkpoint info)``, e.g. a ``pneumoct train`` run of
    configs/dual_sampling_*.yaml loaded once by :func:`~pneumoct.models.checkpoint.load_checkpoint`) on a study —
    what ``pneumoct evaluate --checkpoint`` scores; the Eq. 5 ensemble needs both networks (:func:`analyse`)."""
    model, info = net
    x, rec = prepare_input(np.asarray(study.hu), study.spacing, lung_labels, info["meta"])
    return network_output(model, x, rec, lung_labels)[0]


def infection_ratio(study: Any, lung_labels: np.ndarray) -> tuple[float, dict]:
    """Lesion volume / lung volume from the threshold lesion finder; ``(ratio, info)``."""
    from ..quantify.threshold_baseline import find_lesions_threshold

    lung = lung_labels > 0
    n = int(np.count_nonzero(lung))
    if n == 0:
        return 0.0, {"method": "threshold-baseline", "lung_voxels": 0}
    mask = find_lesions_threshold(study.hu, lung_labels, study.spacing).mask
    return float(np.count_nonzero((mask > 0) & lung)) / n, {"method": "threshold-baseline (find_lesions_threshold)"}


def analyse(study: Any, lung_labels: np.ndarray, weights_dir: str | None = None, *,
            lesion_mask: np.ndarray | None = None) -> VolumetricOutput:
    """Dual-sampling attention system on one study (:class:`~pneumoct.types.StudyVolume`, HU) and its lung labels
    (Z, Y, X). Returns a :class:`VolumetricOutput`: probabilities of covid19 / cap (Eq. 5 ensemble), maps
    ``attention_us`` and ``attention_ss`` (T(A) of Eq. 2, on the study grid, zero outside the lungs).

    ``lesion_mask``: the study's threshold lesion mask when the caller already has it (``diagnose`` computes it
    anyway); it saves running the finder again (the largest part of the time, ~2 s per 150 slices)."""
    from .dual_sampling import dual_sampling_ensemble, ensemble_weight

    t0 = time.perf_counter()
    if getattr(study, "is_2d_image", False):
        raise PneumoctInputError("not_hu", "the dual-sampling system needs a CT volume in Hounsfield units")
    hu = np.asarray(study.hu)
    lung_labels = np.asarray(lung_labels)
    if hu.ndim != 3 or lung_labels.shape != hu.shape:
        raise PneumoctInputError("bad_input", f"lung labels {lung_labels.shape} do not match the study {hu.shape}")
    folder = resolve_weights(weights_dir)
    nets = load_networks(folder)
    t_load = time.perf_counter()
    if lesion_mask is not None and np.shape(lesion_mask) == hu.shape:
        lung = lung_labels > 0
        ratio = float(np.count_nonzero((np.asarray(lesion_mask) > 0) & lung)) / max(1, int(np.count_nonzero(lung)))
        ratio_info = {"method": "lesion mask given by the caller"}
    else:
        ratio, ratio_info = infection_ratio(study, lung_labels)
    t_ratio = time.perf_counter()
    x, rec = prepare_input(hu, study.spacing, lung_labels, nets["us"][1]["meta"])
    t_prep = time.perf_counter()
    probs, maps = {}, {}
    for n in NETWORKS:
        probs[n], maps[f"attention_{n}"] = network_output(nets[n][0], x, rec, lung_labels)
    w = float(ensemble_weight(ratio))
    p = float(np.clip(dual_sampling_ensemble(probs["us"], probs["ss"], ratio), 0.0, 1.0))
    t_end = time.perf_counter()
    meta = nets["us"][1]["meta"]
    info = {
        "method": "dual-sampling attention network (Ouyang et al., IEEE TMI 2020): Attention RN34 + US and "
                  "+ SS, ensemble Eq. 5",
        "weights": str(folder), "sha256": {n: nets[n][1]["sha256"][:16] for n in NETWORKS},
        "training_data": meta.get("data", {}).get("sources"), "synthetic_training_data": meta.get("data", {}).get(
            "synthetic", True),
        "p_covid19": {"us": probs["us"], "ss": probs["ss"], "ensemble": p},
        "ensemble_weight_us": w, "infection_ratio": ratio, "infection_ratio_source": ratio_info["method"],
        "prep": rec.to_dict(),
        "classes_note": "COVID-19 vs community-acquired pneumonia only; for a normal or other-viral study the "
                        "score means nothing",
        "validation": "synthetic phantoms only (held-out phantoms); not validated on patients",
        "timings_s": {"load": round(t_load - t0, 3), "infection_ratio": round(t_ratio - t_load, 3),
                      "preprocess": round(t_prep - t_ratio, 3), "networks_and_maps": round(t_end - t_prep, 3),
                      "total": round(t_end - t0, 3)},
    }
    return VolumetricOutput(system=SYSTEM, class_names=CLASS_NAMES,
                            probabilities={"covid19": p, "cap": 1.0 - p}, maps=maps, info=info)
