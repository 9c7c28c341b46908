"""The one epoch loop of every training task (slice classifiers, lesion segmenters, the patient network).

A task is a plug-in (:class:`TaskPlugin`): how to draw an epoch's batches, the loss of a batch, the validation
metrics, what "better" means, and what to save. The loop owns everything the tasks share, so it is written once:
per-epoch seeding from ``(train.seed, epoch)`` (torch and NumPy global RNGs; the plug-in seeds its own sampler
from the same value, so a resumed run repeats an uninterrupted one), the optimiser step with a finite-loss guard,
per-iteration or per-epoch learning-rate schedules, BatchNorm recalibration before validation
(``train.bn_recalibrate: epoch``) or once on the best model at the end (``end``, kept only if it does not hurt),
best tracking on ``train.monitor``, early stopping, ``metrics.json`` after every epoch.

    state = run_epochs(model, plugin, opt, sched, cfg.train, run, device)
    best, bn_info = recalibrate_best_at_end(run, cfg, plugin, device, state.best, brief)
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["TaskPlugin", "EpochState", "run_epochs", "recalibrate_best_at_end", "epoch_seed", "has_batchnorm",
           "recalibrated_copy", "progress_bar"]

log = logging.getLogger("pneumoct.train")


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrated_copy(model: torch.nn.Module, ds: Any, t: Any, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated on ``train.bn_recalibrate_batches`` batches of the
    un-augmented training set (seeded by ``train.seed``)."""
    from ..models.multiscale_cam import recalibrate_batchnorm

    cand = copy.deepcopy(model)
    g = torch.Generator()
    g.manual_seed(t.seed)
    loader = DataLoader(ds, batch_size=max(2, t.batch_size), shuffle=True, generator=g)
    batches = []
    for i, b in enumerate(loader):
        if i >= t.bn_recalibrate_batches:
            break
        batches.append(b["image"].to(device))
    return recalibrate_batchnorm(cand, batches)


class TaskPlugin:
    """What one training task supplies to :func:`run_epochs`. Subclasses override the methods they need."""

    per_iteration_scheduler: bool = False  # step the LR schedule after every batch (JCS's poly), else per epoch

    def n_batches(self, epoch: int) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, seed: int) -> Iterable[Any]:
        """The epoch's training batches (the loop stops after :meth:`n_batches`)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Validation metrics (keys ``val_*``)."""
        raise NotImplementedError

    def monitor(self, metrics: dict) -> float:
        """Higher is better."""
        raise NotImplementedError

    def recalibration_data(self) -> Any | None:
        """The un-augmented training set for BatchNorm recalibration; None: the task has none."""
        return None

    def on_improved(self, epoch: int, model: torch.nn.Module, best: dict, recalibrated: bool) -> None:
        """Save the best checkpoint."""

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, state: EpochState) -> None:
        """E.g. the last state for resuming."""

    def log_epoch(self, epoch: int, epochs: int, rec: dict, improved: bool) -> None:
        log.info("epoch %d/%d: train_loss %s val_loss %s%s", epoch + 1, epochs, _f(rec.get("train_loss")),
                 _f(rec.get("val_loss")), " (best)" if improved else "")


@dataclass
class EpochState:
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    bad_epochs: int = 0
    stopped: bool = False


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def run_epochs(model: torch.nn.Module, plugin: TaskPlugin, opt: torch.optim.Optimizer, sched: Any, t: Any,
               run: Any, device: torch.device, *, start_epoch: int = 0, state: EpochState | None = None,
               progress: bool = False, desc: str = "epoch") -> EpochState:
    """Train epochs ``start_epoch .. t.epochs - 1`` (fewer on early stopping); ``run`` (a RunFolder or None)
    receives ``metrics.json`` after each epoch."""
    st = state or EpochState()
    recal_ds = plugin.recalibration_data()
    for epoch in range(start_epoch, t.epochs):
        if st.stopped:
            break
        t0 = time.time()
        es = epoch_seed(t.seed, epoch)
        torch.manual_seed(es)
        np.random.seed(es % (2**32))
        n_batches = plugin.n_batches(epoch)
        model.train()
        losses: list[float] = []
        bar = progress_bar(n_batches, f"{desc} {epoch + 1}/{t.epochs}", progress)
        for bi, batch in enumerate(plugin.batches(epoch, es)):
            if bi >= n_batches:
                break
            opt.zero_grad(set_to_none=True)
            loss = plugin.loss(model, batch)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training loss is {float(loss.detach())} at epoch {epoch + 1}, batch {bi + 1}")
            loss.backward()
            opt.step()
            if plugin.per_iteration_scheduler and sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        bar.close()
        if sched is not None and not plugin.per_iteration_scheduler:
            sched.step()
        eval_model = model
        recalibrated = False
        if t.bn_recalibrate == "epoch" and recal_ds is not None and has_batchnorm(model):
            eval_model = recalibrated_copy(model, recal_ds, t, device)
            recalibrated = True
        m = plugin.evaluate(eval_model)
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
               "lr": float(opt.param_groups[0]["lr"]), "seconds": round(time.time() - t0, 3), **m}
        st.history.append(rec)
        improved = st.best is None or plugin.monitor(m) > plugin.monitor(st.best)
        if improved:
            st.best = {k: v for k, v in rec.items() if k != "val_confusion_matrix"}
            st.bad_epochs = 0
            plugin.on_improved(epoch, eval_model, st.best, recalibrated)
        else:
            st.bad_epochs += 1
        if t.early_stopping_patience is not None and st.bad_epochs >= t.early_stopping_patience:
            st.stopped = True
        plugin.log_epoch(epoch, t.epochs, rec, improved)
        plugin.on_epoch_end(epoch, model, st)
        if run is not None:
            run.write_json("metrics.json", {"status": "running", "history": st.history, "best": st.best,
                                            "early_stopped": st.stopped, "monitor": t.monitor})
        if st.stopped:
            log.info("early stopping: no improvement of %s for %d epoch(s)", t.monitor, st.bad_epochs)
            break
    return st


def recalibrate_best_at_end(run: Any, cfg: Any, plugin: TaskPlugin, device: torch.device, best: dict | None,
                            brief: Callable[[dict], dict]) -> tuple[dict | None, dict]:
    """``train.bn_recalibrate: end``: re-estimate the BatchNorm statistics of the best checkpoint in ``run.best``
    once and keep them (rewriting the checkpoint) only if the monitored validation metric does not get worse.
    Returns ``(best, info)`` for ``metrics.json``."""
    from .checkpoint import load_checkpoint, save_checkpoint

    t = cfg.train
    info: dict[str, Any] = {"mode": t.bn_recalibrate}
    recal_ds = plugin.recalibration_data()
    if t.bn_recalibrate != "end" or recal_ds is None:
        return best, info
    best_model, best_info = load_checkpoint(run.best, expected_name=cfg.model.name)
    best_model.to(device)
    if not has_batchnorm(best_model):
        return best, info
    before = plugin.evaluate(best_model)
    cand = recalibrated_copy(best_model, recal_ds, t, device)
    after = plugin.evaluate(cand)
    keep = plugin.monitor(after) >= plugin.monitor(before)
    info.update({"before": brief(before), "after": brief(after), "kept": bool(keep)})
    if keep:
        best = {**(best or {}), **brief(after), "bn_recalibrated": True}
        save_checkpoint(run.best, cand, cfg.model.name, cfg.model.kwargs,
                        {**best_info["meta"], "val": best, "bn_recalibrated": True})
    log.info("BatchNorm recalibration: %s %s -> %s (%s)", t.monitor, _f(plugin.monitor(before)),
             _f(plugin.monitor(after)), "kept" if keep else "discarded")
    return best, info
