"""Shared helpers of the ablation experiments (``m3lung_ablations.py``, ``hu_scales.py``).

Synthetic phantoms only: every number these scripts produce says nothing about clinical accuracy and is not
comparable with the numbers of the papers whose tables they mirror.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pneumoct.evaluate.classification import bootstrap_ci, classification_report
from pneumoct.evaluate.run import macro_auc
from pneumoct.train.table import SliceTable

ROOT = Path(__file__).resolve().parents[1]
TRAIN_COHORT = "data/phantoms/train"
TEST_COHORT = "data/phantoms/test"
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"
RESULTS_DIR = ROOT / "experiments" / "results"


def one_thread() -> None:
    """Other processes share this 2-core machine: every experiment runs on one thread."""
    torch.set_num_threads(1)


def cohort_tables(size: int, cache_dir: str | Path = ROOT / "data" / "cache") -> tuple[SliceTable, SliceTable]:
    """(train, test) slice tables of the on-disk phantom cohorts (cached as .npz under ``cache_dir``)."""
    from pneumoct.train.data import build_tables

    out = []
    for cohort in (TRAIN_COHORT, TEST_COHORT):
        out.append(build_tables([{"kind": "phantom_cohort", "path": str(ROOT / cohort)}], size=size,
                                cache_dir=str(cache_dir)))
    return out[0], out[1]


def cohort_info() -> dict:
    """Counts and case seeds of the two cohorts (from their manifests), for the results header."""
    info = {}
    for name, cohort in (("train", TRAIN_COHORT), ("test", TEST_COHORT)):
        rows = json.loads((ROOT / cohort / "manifest.json").read_text(encoding="utf-8"))
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["label"]] = labels.get(r["label"], 0) + 1
        info[name] = {"path": cohort, "cases": len(rows), "labels": labels,
                      "case_seeds": [int(r["seed"]) for r in rows],
                      "matrix": rows[0].get("matrix"), "slices": rows[0].get("n_slices"),
                      "difficulty": rows[0].get("difficulty")}
    overlap = set(info["train"]["case_seeds"]) & set(info["test"]["case_seeds"])
    info["seed_overlap"] = len(overlap)
    return info


def tiny_tables(n: int = 8, size: int = 32, matrix: int = 64, n_slices: int = 16,
                seed0: int = 1000) -> tuple[SliceTable, SliceTable]:
    """In-memory (train, test) tables of ``n`` phantoms each (labels cycling over the 4 classes), disjoint seeds."""
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom
    from pneumoct.train.data import table_from_phantoms
    from pneumoct.types import CLASS_NAMES

    tables = []
    for part, base in (("train", seed0), ("test", seed0 + 500)):
        phs = [generate_phantom(PhantomConfig(label=CLASS_NAMES[i % 4], seed=base + i, matrix=matrix,
                                              n_slices=n_slices)) for i in range(n)]
        tables.append(table_from_phantoms(phs, size, ids=[f"{part}-{i:02d}" for i in range(n)]))
    return tables[0], tables[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, 1 thread (torch.set_num_threads(1)), CPU only"


# ------------------------------------------------------------------------------------------------ training
def train_slice_model(model_name: str, model_kwargs: dict, table: SliceTable, out_dir: Path, s: dict, *,
                      target: str, m3lung_rule: bool, loss: dict, augment: dict | None, seed: int,
                      betas: Sequence[float] = (0.9, 0.999), balanced: bool = True):
    """One ``pneumoct.train.loop.fit`` run (patient-level val split of ``table``, seed ``split_seed``) into a fresh
    ``out_dir``; returns ``(best model in eval mode, fit metrics)``."""
    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.config import parse_config
    from pneumoct.train.loop import fit

    raw = {
        "name": out_dir.name,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "task": "slice",
        "data": {"tables": [], "size": int(table.size), "channels": 1, "target": target, "m3lung_rule": m3lung_rule},
        "split": {"val_fraction": 0.25, "seed": int(s["split_seed"])},
        "train": {"epochs": int(s["epochs"]), "batch_size": int(s["batch_size"]), "lr": float(s["lr"]),
                  "optimizer": "adam", "betas": list(betas), "scheduler": "cosine",
                  "balanced_sampling": balanced, "early_stopping_patience": int(s["patience"]),
                  "monitor": "val_auc", "seed": int(seed), "max_batches_per_epoch": int(s["max_batches"]),
                  "threads": 1, "bn_recalibrate": "epoch", "bn_recalibrate_batches": 4},
        "loss": dict(loss),
        "augment": augment,
    }
    cfg = parse_config(raw, ROOT)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # our own run folder from a previous run of the experiment
    metrics = fit(cfg, out_dir, progress=False, table=table)
    one_thread()
    model, _ = load_checkpoint(out_dir / "best")
    return model, metrics


# ------------------------------------------------------------------------------------------------ metrics
def onehot(pred: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(pred), k))
    out[np.arange(len(pred)), np.asarray(pred, int)] = 1.0
    return out


def _acc(y, p):
    return float((np.argmax(p, 1) == y).mean())


def metrics(y: np.ndarray, scores: np.ndarray, class_names: Sequence[str], pred: np.ndarray | None = None,
            ci: bool = False, seed: int = 0) -> dict:
    """Accuracy (from ``pred``, default argmax of ``scores``), macro AUC of ``scores``, per-class sensitivity,
    macro precision/specificity, and FPE/FNE/FDPE (class 0 = the negative class). ``ci``: 95 % bootstrap CI of
    the accuracy (1000 resamples of the cases)."""
    y = np.asarray(y, int)
    scores = np.asarray(scores, float)
    pred = np.argmax(scores, 1) if pred is None else np.asarray(pred, int)
    k = len(class_names)
    rep = classification_report(y, onehot(pred, k), class_names, positive_is_abnormal=True)
    out = {
        "n": int(len(y)),
        "accuracy": rep["accuracy"],
        "macro_auc": macro_auc(y, scores),
        "macro_precision": rep["macro"]["precision"],
        "macro_specificity": rep["macro"]["specificity"],
        "sensitivity": {c: rep["per_class"][c]["sensitivity"] for c in class_names},
        "fpe": rep["abnormal"]["fpe"], "fne": rep["abnormal"]["fne"], "fdpe": rep["abnormal"]["fdpe"],
        "confusion_matrix": rep["confusion_matrix"],
    }
    if ci:
        b = bootstrap_ci(_acc, y, onehot(pred, k), n_boot=1000, seed=seed)
        out["accuracy_ci95"] = [b["low"], b["high"]]
    return out


def mean_over_seeds(per_seed: list[dict], keys: Sequence[str]) -> dict:
    """Mean (and sd, min, max) of the numeric ``keys`` (dotted for nested) over the seeds' metric dicts."""
    out = {}
    for key in keys:
        vals = []
        for m in per_seed:
            v: Any = m
            for part in key.split("."):
                v = None if v is None else v.get(part)
            if v is not None:
                vals.append(float(v))
        out[key] = ({"mean": float(np.mean(vals)), "sd": float(np.std(vals)), "min": float(min(vals)),
                     "max": float(max(vals)), "n": len(vals)} if vals else None)
    return out


def fmt(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"
    return f"{stat['mean']:.{digits}f}"


# ------------------------------------------------------------------------------------------------ output
def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n", encoding="utf-8")


def replace_section(tag: str, body: str, path: Path = RESULTS_MD) -> None:
    """Put ``body`` between ``<!-- tag -->`` and ``<!-- /tag -->`` in ``path``, keeping everything else."""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Experiment results\n"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def header(title: str, settings: dict, info: dict | None, elapsed_s: float, reproduces: str) -> str:
    lines = [f"## {title}", "", f"Reproduces: {reproduces}.", ""]
    if info is not None:
        tr, te = info["train"], info["test"]
        lines.append(
            f"- **Data: synthetic phantoms** (`pneumoct.synth`, difficulty {tr['difficulty']}, {tr['matrix']} px, "
            f"{tr['slices']} slices). Train `{tr['path']}`: {tr['cases']} cases {tr['labels']}; held-out test "
            f"`{te['path']}`: {te['cases']} cases {te['labels']}; per-case seeds in each `manifest.json` "
            f"(train/test case seeds overlapping: {info['seed_overlap']}). Early stopping on a patient-level val split "
            f"(25 %, stratified, seed {settings['split_seed']}) of the train cohort only; all numbers on the test cohort.")
    else:
        lines.append("- **Data: tiny in-memory synthetic phantoms** (smoke run).")
    lines.append(f"- Machine: {machine()}. Wall time of this script: {elapsed_s / 60:.1f} min.")
    lines.append(f"- Settings: {json.dumps({k: v for k, v in settings.items() if k != 'out_root'})}.")
    lines.append("- **Not clinical accuracy, and not comparable with the paper's numbers** (toy phantoms, CPU-sized "
                 "networks, few epochs, 24 test patients). Cells: mean over training seeds (min–max).")
    return "\n".join(lines) + "\n"


class Timer:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0
