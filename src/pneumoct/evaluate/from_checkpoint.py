"""``pneumoct evaluate --checkpoint DIR --data KIND:PATH``: run a trained slice model (or, through
:mod:`pneumoct.evaluate.volumetric`, a 3D one) on a data set and turn its outputs into :class:`~pneumoct.evaluate.run.Predictions` (slice level, or patient level by averaging).

For phantom cohorts the patient level carries each case's lesion volume ratio (from ``manifest.json``), so the
group-wise table by lesion volume ratio (dual-sampling paper, Table III) comes out too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import PneumoctInputError
from .run import Predictions

KINDS = ("phantom_cohort", "manifest", "covid_ct_md", "covid19_ct_seg_png", "medseg")


def parse_data_spec(text: str) -> dict:
    kind, _, path = text.partition(":")
    if kind not in KINDS:
        raise PneumoctInputError("bad_arguments", f"--data kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec: dict = {"kind": kind}
    if path:
        if not Path(path).exists():
            raise PneumoctInputError("not_found", f"--data path not found: {path}")
        spec["path"] = path
    elif kind in ("phantom_cohort", "manifest"):
        raise PneumoctInputError("bad_arguments", f"--data {kind} needs a path ({kind}:PATH)")
    return spec


def _phantom_lvr(spec: dict) -> dict[str, float]:
    """case id -> lesion volume ratio, from a phantom cohort's manifest.json."""
    if spec["kind"] != "phantom_cohort":
        return {}
    man = Path(spec["path"]) / "manifest.json"
    if not man.is_file():
        return {}
    rows = json.loads(man.read_text())
    return {f"phantom/{r['case_id']}": float(r.get("lesion_volume_ratio") or 0.0) for r in rows}


def predict_checkpoint(checkpoint: str | Path, data: str, level: str = "slice",
                       batch_size: int = 64) -> tuple[Predictions, str]:
    from ..models.checkpoint import load_checkpoint
    from ..train.config import class_names_for
    from ..train.data import build_table
    from ..train.loop import prepare_table
    from ..train.predict import predict_table

    model, info = load_checkpoint(checkpoint)
    meta = info.get("meta") or {}
    family = meta.get("family")
    spec = parse_data_spec(data)
    from .volumetric import VOLUME_FAMILIES, predict_volumes

    if family in VOLUME_FAMILIES:  # whole studies, patient level (the 3D systems have no slice output)
        return predict_volumes(checkpoint, family, model, info, spec)
    if family not in ("multiscale_cam", "m3lung_slice", "jcs"):
        raise PneumoctInputError("bad_arguments", f"evaluate --checkpoint takes slice or 3D models; this one is "
                                 f"{family!r}")
    table = build_table(spec, int(meta.get("input_size", 128)))
    if not len(table):
        raise PneumoctInputError("bad_input", f"no slices with lungs in {data}")
    target = meta.get("target", "class")
    table, _ = prepare_table(table, target)
    y = table.class_label.astype(np.int64)
    names = list(meta.get("classes") or class_names_for(target, int(info["model_kwargs"].get("num_classes", 2))))
    window = meta.get("window") or [-600.0, 1200.0]
    out = predict_table(model, family, table, batch_size=batch_size,
                        window_centers=meta.get("window_centers") if family == "m3lung_slice" else None,
                        window_center=float(window[0]), window_width=float(window[1]),
                        channels=int(meta.get("channels", 1)), num_classes=len(names))
    probs = out["probs"]
    sources = sorted({str(s) for s in table.source})
    note = (f"{data.split(':')[0]} ({'synthetic phantoms' if any(s.startswith('phantom') for s in sources) else 'real data'}); "
            f"model {info['model_name']} from {Path(checkpoint).name}; level {level}")
    if level == "slice":
        ids = [f"{p}#{int(i)}" for p, i in zip(table.patient_id, table.slice_index)]
        return Predictions(ids, y, probs, names), note
    # patient level: mean of the slice probabilities; for a lesion target the patient is positive when any
    # slice is, and its score is the highest slice score
    lvr = _phantom_lvr(spec)
    pids = sorted(set(table.patient_id.tolist()))
    py, pp = [], []
    for pid in pids:
        sel = table.patient_id == pid
        if target == "lesion":
            s = float(probs[sel, 1].max())
            py.append(int((y[sel] == 1).any()))
            pp.append([1 - s, s])
        else:
            vals, counts = np.unique(table.patient_label[sel] if target == "class" else y[sel], return_counts=True)
            py.append(int(vals[np.argmax(counts)]))
            pp.append(probs[sel].mean(0))
    ratios = [lvr.get(p) for p in pids]
    return Predictions(pids, py, np.asarray(pp), names,
                       ratios if lvr and all(r is not None for r in ratios) else None), note
