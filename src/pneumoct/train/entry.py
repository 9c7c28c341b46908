"""Train any task from a config: the one entry point of ``pneumoct train`` (slice classifiers, segmentation,
patient aggregation, the dual-sampling 3D networks). It sits above the task modules (``loop``, ``segment``,
``patient``, ``task_dual_sampling``), which share
``run.RunFolder`` and never import this module, so the training package has no import circle.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PneumoctInputError
from .config import TrainConfig, load_config
from .run import is_complete

__all__ = ["train_from_config", "store_fingerprint"]


def train_from_config(config: str | Path | TrainConfig, out: str | Path | None = None, *, resume: bool = False,
                      progress: bool = True, overrides: list[str] | None = None) -> dict:
    """Load a YAML config (with ``key=value`` overrides), train, return the final metrics dict."""
    if isinstance(config, TrainConfig):
        cfg = config
        stem = cfg.name or cfg.model.name
    else:
        cfg = load_config(config, overrides)
        stem = Path(config).stem
    out = Path(out) if out is not None else Path("runs") / stem
    if cfg.task == "segmentation":
        from .segment import fit_segmentation  # each task imports torch and its data code only when used

        if resume:
            raise PneumoctInputError("bad_argument", "the segmentation task does not resume; start a new run")
        metrics = fit_segmentation(cfg, out, progress=progress)
    elif cfg.task == "deepsc":
        from .task_deepsc import fit_deepsc

        if resume:
            raise PneumoctInputError("bad_argument", "the deepsc task does not resume; start a new run")
        # it writes its own training-data fingerprint (of the volumes it trained on; it has no data.tables)
        return fit_deepsc(cfg, out, progress=progress)
    elif cfg.task == "dual_sampling":
        from .task_dual_sampling import fit_dual_sampling

        return fit_dual_sampling(cfg, out, resume=resume, progress=progress)  # writes its own fingerprint
    elif cfg.task == "patient":
        from .patient import fit_patient

        metrics = fit_patient(cfg, out, resume=resume, progress=progress)
    else:
        from .loop import fit

        metrics = fit(cfg, out, resume=resume, progress=progress)
    store_fingerprint(cfg, out)
    return metrics


def store_fingerprint(cfg: TrainConfig, out: str | Path) -> Path | None:
    """Write the training-data fingerprint beside a finished run's best checkpoint (``best/fingerprint.json``).
    Never fails the run: a problem is logged and None returned."""
    if not is_complete(out):
        return None
    try:
        from ..fingerprint import write_run_fingerprint

        return write_run_fingerprint(out, cfg)
    except Exception as exc:  # the model is trained; a missing fingerprint must not lose it
        logging.getLogger("pneumoct.train").warning("training-data fingerprint not written: %s", exc)
        return None
