"""Run folders: what ``pneumoct train`` writes, and in which order.

    RUN_DIR/
      config.yaml         the resolved config (after --set overrides)
      data_summary.json   SliceTable.summary() of train / val, the sources and whether any is synthetic
      train.log           progress log (counts and metrics only; no patient names or IDs)
      metrics.json        per-epoch history, best epoch, BatchNorm recalibration result (rewritten every epoch)
      best/               the best checkpoint (model.safetensors + model.json)
      last_state/         last epoch's weights + optimizer/scheduler/RNG state, for --resume
      model_card.md       model, data, split, validation metrics, intended use, limitations
      DONE                written last: a folder without it is not a finished run
      best/fingerprint.json  the training-data fingerprint (pneumoct.fingerprint), written after DONE by
                          train_from_config; a run without it still counts as finished

:func:`pneumoct.train.entry.train_from_config` is what the CLI calls (it imports the task modules; this module
imports none of them).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import PneumoctInputError
from .config import TrainConfig, config_to_dict

__all__ = ["RunFolder", "is_complete", "SYNTHETIC_SOURCES",
           "is_synthetic_source", "synthetic_banner"]

SYNTHETIC_SOURCES = ("phantom",)
SYNTHETIC_LINE = "**Trained on synthetic phantoms — not clinical accuracy.**"
MIXED_LINE = ("**Trained on real data plus synthetic phantoms — the validation figures below mix both kinds of "
              "data; only figures measured on real data say anything about real CT, and none is clinical accuracy.**")


def synthetic_banner(sources) -> str | None:
    """The model card's warning line: all sources synthetic, mixed, or none (all real)."""
    kinds = {is_synthetic_source(s.split(":")[-1]) for s in sources}
    if kinds == {True}:
        return SYNTHETIC_LINE
    return MIXED_LINE if True in kinds else None


def is_synthetic_source(name: str) -> bool:
    return any(str(name).lower().startswith(s) for s in SYNTHETIC_SOURCES)


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "DONE").is_file()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        if self.path.exists() and not self.path.is_dir():
            raise PneumoctInputError("bad_argument", f"{self.path} exists and is not a folder")
        if not resume and self.path.is_dir() and any(self.path.iterdir()):
            raise PneumoctInputError("bad_argument", f"run folder {self.path} is not empty; use --resume to continue "
                                     "it or choose another --out")
        if resume and not (self.path / "last_state").is_dir():
            raise PneumoctInputError("bad_argument", f"nothing to resume in {self.path} (no last_state/)")
        self.path.mkdir(parents=True, exist_ok=True)
        # a resumed run is unfinished until it ends again
        for name in ("DONE", "model_card.md"):
            (self.path / name).unlink(missing_ok=True)
        self._handler: logging.Handler | None = None

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def last_state(self) -> Path:
        return self.path / "last_state"

    # ---------------------------------------------------------------------------------------------- logging
    def open_log(self) -> logging.Logger:
        log = logging.getLogger("pneumoct.train")
        log.setLevel(logging.INFO)
        h = logging.FileHandler(self.path / "train.log", mode="a")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
        self._handler = h
        return log

    def close_log(self) -> None:
        if self._handler is not None:
            logging.getLogger("pneumoct.train").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    # ---------------------------------------------------------------------------------------------- files
    def write_config(self, cfg: TrainConfig) -> None:
        _write_atomic(self.path / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def write_json(self, name: str, obj: Any) -> None:
        from .checkpoint import _jsonable

        _write_atomic(self.path / name, json.dumps(_jsonable(obj), indent=2) + "\n")

    def read_json(self, name: str) -> Any:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def write_model_card(self, text: str) -> None:
        _write_atomic(self.path / "model_card.md", text)

    def mark_done(self) -> None:
        _write_atomic(self.path / "DONE", "ok\n")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def model_card(cfg: TrainConfig, data_summary: dict, metrics: dict, info: dict | None = None) -> str:
    """Markdown model card. Says plainly when any training source is synthetic."""
    sources = sorted(set(data_summary.get("sources", [])))
    synthetic = bool(data_summary.get("synthetic"))
    best = metrics.get("best") or {}
    lines = [f"# Model card: {cfg.name or cfg.model.name}", ""]
    banner = synthetic_banner(sources) if sources else (SYNTHETIC_LINE if synthetic else None)
    if banner:
        lines += [banner, ""]
    lines += [
        "Research use only. Not a medical device; nothing here has been validated on patients.", "",
        "## Model",
        f"- architecture: `{cfg.model.name}` (family `{cfg.family}`, task `{cfg.task}`), kwargs `{cfg.model.kwargs}`",
        f"- parameters: {info.get('parameters') if info else 'n/a'}",
        f"- classes ({cfg.data.target} target): {', '.join(cfg.class_names)}",
        f"- input: {cfg.data.size}x{cfg.data.size} lung crop, {cfg.data.channels} channel(s), HU window "
        f"centre {cfg.data.window_center} width {cfg.data.window_width}"
        + (f"; multi-window inference centres {cfg.patient.window_centers}" if cfg.task == "patient" else ""),
        "",
        "## Data",
        f"- sources: {', '.join(sources) or 'n/a'} ({'synthetic phantoms' if synthetic and len(sources) == 1 else ('includes synthetic phantoms' if synthetic else 'real data')})",
        f"- tables: {json.dumps(cfg.data.tables)}",
        f"- M3Lung-Sys slice rule: {cfg.data.m3lung_rule}",
        f"- train: {json.dumps(data_summary.get('train', {}).get('slices'))} slices / "
        f"{json.dumps(data_summary.get('train', {}).get('patients'))} patients; "
        f"val: {json.dumps(data_summary.get('val', {}).get('slices'))} slices / "
        f"{json.dumps(data_summary.get('val', {}).get('patients'))} patients",
        f"- split: patient level, "
        + (f"fold {cfg.split.fold} of {cfg.split.kfold}" if cfg.split.kfold else f"val_fraction {cfg.split.val_fraction}")
        + f", seed {cfg.split.seed}",
        "",
        "## Validation (best epoch)",
        f"- epoch: {_fmt(best.get('epoch'))}; monitor `{cfg.train.monitor}`",
        f"- loss: {_fmt(best.get('val_loss'))}; accuracy: {_fmt(best.get('val_acc'))}; AUC: {_fmt(best.get('val_auc'))}",
        f"- BatchNorm recalibration: {json.dumps(metrics.get('bn_recalibration'))}",
        f"- epochs run: {len(metrics.get('history', []))} of {cfg.train.epochs}"
        + (" (early stopping)" if metrics.get("early_stopped") else ""),
        "",
        "## Intended use",
        "Research and method development on chest CT (comparison with the published methods, explainability "
        "studies). Not for diagnosis, triage or any clinical decision.",
        "",
        "## Limitations",
        "- Validation is on a held-out split of the same sources, with few patients; it says nothing about other "
        "scanners, protocols or populations.",
        "- Slice labels may be derived from patient labels (weak labels); lesion labels where masks are missing are "
        "unknown.",
    ]
    if synthetic:
        lines.append("- Synthetic phantoms are far simpler than real CT: accuracy on them is not clinical accuracy.")
    if "covid19-ct-seg-png" in sources:
        lines.append("- covid19-ct-seg-png has no reliable patient mapping: its split may leak and be optimistic.")
    return "\n".join(lines) + "\n"


