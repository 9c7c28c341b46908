"""The slice-level training loop: one model, one config, one run folder.

    from pneumoct.train.config import load_config
    from pneumoct.train.loop import fit
    metrics = fit(load_config("configs/m3lung_slice_cpu.yaml"), "runs/m3lung_slice_cpu")

Order of work: seed everything -> build the slice tables -> (M3Lung-Sys slice rule) -> training target ->
patient-level split (or k-fold) -> datasets (augmentation on train only) -> class-balanced sampler -> epochs with
validation (loss, accuracy, AUC), early stopping on ``train.monitor``, best checkpoint, last state for resume ->
BatchNorm recalibration (kept only when it does not hurt validation) -> model card -> ``DONE``.

Every epoch is seeded from ``(train.seed, epoch)`` (torch RNG, sampler, augmentation, mixing), so a resumed run
repeats exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._version import __version__
from ..errors import PneumoctInputError
from .checkpoint import (load_checkpoint, load_training_state, rng_state, save_checkpoint,
                         save_training_state)
from .config import TrainConfig, config_to_dict
from .epochs import EpochState, TaskPlugin, recalibrate_best_at_end, run_epochs
from .run import RunFolder, is_synthetic_source, model_card
from .table import SliceTable

__all__ = ["fit", "prepare_table", "split_indices", "build_optimizer", "build_scheduler", "evaluate",
           "seed_everything", "select_device", "data_summary", "monitor_value"]

log = logging.getLogger("pneumoct.train")


# ------------------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoctInputError("bad_config", "train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_table(table: SliceTable, target: str) -> tuple[SliceTable, np.ndarray]:
    """Rows with a known training target, ``class_label`` replaced by the target; also each row's patient-level
    label of the same target (stratifies the split; one value per patient)."""
    cl, les, pl = table.class_label, table.lesion_label, table.patient_label
    if target == "class":
        y, py = cl.copy(), pl.copy()
    elif target == "lesion":
        y = les.copy()
        py = np.zeros(len(table), np.int64)
        for p in np.unique(table.patient_id):
            sel = table.patient_id == p
            py[sel] = int((les[sel] == 1).any())
    elif target == "abnormal":
        y = np.where(cl < 0, -1, (cl != 0).astype(np.int64))
        py = np.where(pl < 0, -1, (pl != 0).astype(np.int64))
    elif target == "covid":
        y = np.where(cl < 0, -1, (cl == 1).astype(np.int64))
        py = np.where(pl < 0, -1, (pl == 1).astype(np.int64))
    elif target == "covid_cap_np":  # healthy -> 0, covid19 -> 1, cap -> 2, other_viral dropped
        lut = np.array([0, 1, -1, 2], np.int64)
        y = np.where((cl >= 0) & (cl <= 3), lut[np.clip(cl, 0, 3)], -1)
        py = np.where((pl >= 0) & (pl <= 3), lut[np.clip(pl, 0, 3)], -1)
        y = np.where(py < 0, -1, y)
    else:  # pragma: no cover - validated in config
        raise ValueError(target)
    keep = np.flatnonzero(y >= 0)
    out = table.subset(keep)
    out.class_label = y[keep].astype(np.int64)
    py = py[keep]
    py = np.where(py < 0, out.class_label, py)  # unknown patient label: stratify by the row label
    # one stratification label per patient: the most frequent one
    for p in np.unique(out.patient_id):
        sel = out.patient_id == p
        vals = np.unique(py[sel])
        if len(vals) > 1:
            py[sel] = np.bincount(py[sel]).argmax()
    return out, py


def split_indices(table: SliceTable, patient_labels: np.ndarray, split: Any) -> tuple[np.ndarray, np.ndarray]:
    from .sampling import patient_kfold, patient_split

    keep = ~excluded_rows(table.patient_id, getattr(split, "exclude_patients", None))
    if not keep.any():
        raise PneumoctInputError("bad_config", "split.exclude_patients leaves no data")
    forced = keep & excluded_rows(table.patient_id, getattr(split, "train_only_patients", None))
    if forced.any():
        rest = keep & ~forced
        sub = table.subset(np.flatnonzero(rest))
        tr, va = split_indices(sub, np.asarray(patient_labels)[rest], _without_forced(split))
        rest_rows = np.flatnonzero(rest)
        return np.sort(np.concatenate([rest_rows[tr], np.flatnonzero(forced)])), rest_rows[va]
    rows = np.flatnonzero(keep)
    pids, plabels = table.patient_id[rows], np.asarray(patient_labels)[rows]
    if split.kfold:
        try:
            tr, va = patient_kfold(pids, plabels, split.kfold, split.seed)[split.fold]
        except ValueError as exc:
            raise PneumoctInputError("bad_config", f"k-fold split impossible: {exc}") from None
    else:
        tr, va = patient_split(pids, plabels, split.val_fraction, split.seed)
    return rows[tr], rows[va]


def _without_forced(split: Any) -> Any:
    import copy

    out = copy.copy(split)
    out.exclude_patients = None
    out.train_only_patients = None
    return out


def excluded_rows(patient_ids: np.ndarray, patterns: list | None) -> np.ndarray:
    """Rows whose patient id equals a pattern, or starts with it when the pattern ends in ``*``."""
    out = np.zeros(len(patient_ids), dtype=bool)
    for pat in patterns or []:
        pat = str(pat)
        if pat.endswith("*"):
            out |= np.char.startswith(patient_ids.astype(str), pat[:-1])
        else:
            out |= patient_ids.astype(str) == pat
    return out


def build_optimizer(model: torch.nn.Module, t: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(float(b) for b in t.betas), weight_decay=t.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, t: Any):
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.lr_gamma)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t.epochs))
    return None


def monitor_value(metrics: dict, monitor: str) -> float:
    """Higher is better. AUC falls back to accuracy where it is undefined (one class in val)."""
    if monitor == "val_loss":
        v = metrics.get("val_loss")
        return -float(v) if v is not None and math.isfinite(v) else -math.inf
    v = metrics.get(monitor)
    if v is None and monitor == "val_auc":
        v = metrics.get("val_acc")
    return float(v) if v is not None else -math.inf


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Any, loader: DataLoader, class_names: list[str],
             device: torch.device) -> dict:
    """Validation loss, accuracy and AUC (binary: of class 1; multi-class: macro one-vs-rest)."""
    from ..evaluate.classification import classification_report

    model.eval()
    total, n, probs, ys = 0.0, 0, [], []
    for batch in loader:
        batch = _to_device(batch, device)
        loss, pred = task.eval_loss(model, batch)
        b = int(batch["class_label"].shape[0])
        total += float(loss) * b
        n += b
        probs.append(pred["probs"].float().cpu().numpy())
        ys.append(batch["class_label"].cpu().numpy())
    if n == 0:
        return {"val_loss": None, "val_acc": None, "val_auc": None, "val_n": 0}
    p, y = np.concatenate(probs), np.concatenate(ys)
    rep = classification_report(y, p, class_names, positive_is_abnormal=True)
    auc = rep["per_class"][class_names[1]]["auc"] if len(class_names) == 2 else rep["macro"]["auc"]
    return {"val_loss": total / n, "val_acc": rep["accuracy"], "val_auc": auc, "val_n": n,
            "val_confusion_matrix": rep["confusion_matrix"]}


def data_summary(train: SliceTable, val: SliceTable, cfg: TrainConfig) -> dict:
    sources = sorted(set(map(str, train.source)) | set(map(str, val.source)))
    synth = [s for s in sources if is_synthetic_source(s)]
    return {
        "train": train.summary(), "val": val.summary(),
        "sources": sources, "synthetic_sources": synth, "synthetic": bool(synth),
        "training_data": "synthetic" if synth and len(synth) == len(sources) else ("mixed" if synth else "real"),
        "target": cfg.data.target, "class_names": cfg.class_names, "tables": cfg.data.tables,
        "m3lung_rule": cfg.data.m3lung_rule, "size": train.size,
    }


def _checkpoint_meta(cfg: TrainConfig, summary: dict, extra: dict) -> dict:
    return {
        "pneumoct_version": __version__, "family": cfg.family, "task": cfg.task,
        "classes": cfg.class_names, "target": cfg.data.target, "input_size": cfg.data.size,
        "channels": cfg.data.channels, "window": [cfg.data.window_center, cfg.data.window_width],
        "window_centers": (list(cfg.patient.window_centers or []) if cfg.family.startswith("m3lung") else None),
        "data": {"sources": summary["sources"], "training_data": summary["training_data"],
                 "synthetic": summary["synthetic"], "tables": cfg.data.tables,
                 "train_slices": summary["train"]["slices"], "val_slices": summary["val"]["slices"],
                 "train_patients": summary["train"]["patients"], "val_patients": summary["val"]["patients"]},
        "config_name": cfg.name, **extra,
    }


class _SlicePlugin(TaskPlugin):
    """Slice classification (M3Lung-Sys, multi-scale CAM, JCS classifier) for :func:`run_epochs`: batches from
    the class-balanced (or shuffled) sampler, the task's loss, loss / accuracy / AUC on validation; the last state
    is saved every epoch for ``--resume``."""

    def __init__(self, cfg, run, summary, task, train_t, train_ds, plain_train_ds, val_loader, n_batches, device,
                 opt, sched):
        self.cfg, self.run, self.summary, self.task = cfg, run, summary, task
        self._opt, self._sched = opt, sched  # saved with the last state (resume)
        self.train_t, self.train_ds, self.plain_train_ds, self.val_loader = train_t, train_ds, plain_train_ds, val_loader
        self._n, self.device, self.t = n_batches, device, cfg.train

    def n_batches(self, epoch: int) -> int:
        return self._n

    def batches(self, epoch: int, seed: int):
        t = self.t
        self.train_ds.set_epoch(epoch)
        if hasattr(self.task, "reseed"):
            self.task.reseed([t.seed, epoch])
        if t.balanced_sampling:
            from .sampling import class_balanced_sampler

            groups = self.train_t.class_label
            if t.balance_by == "class_and_look":
                # equal weight to every (class, look) pair, look = HU-windowed vs 8-bit export: without it a
                # source that holds one class only teaches "this look means that class"
                groups = np.where(self.train_t.class_label < 0, -1,
                                  self.train_t.class_label * 2 + self.train_t.is_hu.astype(int))
            sampler = class_balanced_sampler(groups, num_samples=len(self.train_t), seed=seed)
            loader = DataLoader(self.train_ds, batch_size=t.batch_size, sampler=sampler,
                                drop_last=len(self.train_ds) > t.batch_size)
        else:
            g = torch.Generator()
            g.manual_seed(seed)
            loader = DataLoader(self.train_ds, batch_size=t.batch_size, shuffle=True, generator=g,
                                drop_last=len(self.train_ds) > t.batch_size)
        return (_to_device(b, self.device) for b in loader)

    def loss(self, model, batch):
        return self.task.loss(model, batch, train=True)[0]

    def evaluate(self, model) -> dict:
        return evaluate(model, self.task, self.val_loader, self.cfg.class_names, self.device)

    def monitor(self, metrics: dict) -> float:
        return monitor_value(metrics, self.t.monitor)

    def recalibration_data(self):
        return self.plain_train_ds if self.t.bn_recalibrate in ("epoch", "end") else None

    def on_improved(self, epoch, model, best, recalibrated) -> None:
        cfg = self.cfg
        save_checkpoint(self.run.best, model, cfg.model.name, cfg.model.kwargs,
                        _checkpoint_meta(cfg, self.summary, {"epoch": epoch, "val": best,
                                                             "bn_recalibrated": self.t.bn_recalibrate == "epoch"}))

    def on_epoch_end(self, epoch, model, state) -> None:
        cfg = self.cfg
        save_checkpoint(self.run.last_state, model, cfg.model.name, cfg.model.kwargs,
                        _checkpoint_meta(cfg, self.summary, {"epoch": epoch}))
        save_training_state(self.run.last_state, self._opt, self._sched, epoch, state.best, rng_state(),
                            extra={"history": state.history, "bad_epochs": state.bad_epochs,
                                   "stopped": state.stopped})

    def log_epoch(self, epoch, epochs, rec, improved) -> None:
        log.info("epoch %d/%d: train_loss %.4f val_loss %s val_acc %s val_auc %s%s", epoch + 1, epochs,
                 rec["train_loss"] or float("nan"), _f(rec["val_loss"]), _f(rec["val_acc"]), _f(rec["val_auc"]),
                 " (best)" if improved else "")


# ----------------------------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True,
        table: SliceTable | None = None) -> dict:
    """Train one slice-level model (``cfg.task == "slice"``) into run folder ``out_dir``; returns the metrics dict
    (``history``, ``best``, ``bn_recalibration``, ``early_stopped``). ``table`` skips building the data tables."""
    if cfg.task != "slice":
        raise PneumoctInputError("bad_config", "fit() trains slice models; the patient task is fit_patient()")
    from ..models import build_model
    from .augment import AugmentConfig
    from .sampling import m3lung_slice_rule
    from .tasks import make_task
    from .torchdata import SliceDataset

    t = cfg.train
    if t.threads:
        torch.set_num_threads(int(t.threads))
    device = select_device(t.device)
    run = RunFolder(out_dir, resume=resume)
    run.open_log()
    try:
        seed_everything(t.seed)
        # ------------------------------------------------------------------ data
        if table is None:
            if not cfg.data.tables:
                raise PneumoctInputError("bad_config", "data.tables is empty")
            from .data import build_tables

            table = build_tables(cfg.data.tables, cfg.data.size, cfg.data.cache_dir)
        if table.size != cfg.data.size:
            raise PneumoctInputError("bad_config", f"slice table crops are {table.size} px, data.size is "
                                     f"{cfg.data.size}")
        if cfg.data.m3lung_rule:
            table = m3lung_slice_rule(table)
        table, patient_y = prepare_table(table, cfg.data.target)
        k = cfg.num_classes
        if len(table) == 0:
            raise PneumoctInputError("bad_input", "no rows with a training label in the data tables")
        if int(table.class_label.max()) >= k:
            raise PneumoctInputError("bad_config", f"labels go up to {int(table.class_label.max())} but the model has "
                                     f"num_classes={k}")
        tr_idx, va_idx = split_indices(table, patient_y, cfg.split)
        if len(tr_idx) == 0 or len(va_idx) == 0:
            raise PneumoctInputError("bad_input", f"the patient-level split left {len(tr_idx)} training and "
                                     f"{len(va_idx)} validation slices; need more patients")
        train_t, val_t = table.subset(tr_idx), table.subset(va_idx)
        summary = data_summary(train_t, val_t, cfg)
        if not resume:
            run.write_config(cfg)
        run.write_json("data_summary.json", summary)
        log.info("data: %d train slices (%d patients), %d val slices (%d patients), sources %s",
                 len(train_t), summary["train"]["patients"], len(val_t), summary["val"]["patients"],
                 ", ".join(summary["sources"]))
        aug = None
        if cfg.augment is not None:
            aug = AugmentConfig(**{kk: (tuple(v) if isinstance(v, list) else v) for kk, v in cfg.augment.items()})
        window = (cfg.data.window_center, cfg.data.window_width)
        train_ds = SliceDataset(train_t, channels=cfg.data.channels, augment=aug, seed=t.seed, window=window)
        plain_train_ds = SliceDataset(train_t, channels=cfg.data.channels, augment=None, window=window)
        val_ds = SliceDataset(val_t, channels=cfg.data.channels, augment=None, window=window)
        val_loader = DataLoader(val_ds, batch_size=t.batch_size, shuffle=False)

        # ------------------------------------------------------------------ model
        model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
        task = make_task(cfg, train_labels=train_t.class_label)
        opt = build_optimizer(model, t)
        sched = build_scheduler(opt, t)
        history: list[dict] = []
        best: dict | None = None
        bad_epochs = 0
        start_epoch = 0
        resumed_stopped = False
        if resume:
            last_model, _ = load_checkpoint(run.last_state, expected_name=cfg.model.name)
            model.load_state_dict(last_model.state_dict())
            st = load_training_state(run.last_state, opt, sched)
            start_epoch = int(st["epoch"]) + 1
            best = st.get("best")
            history = list(st.get("extra", {}).get("history", []))
            bad_epochs = int(st.get("extra", {}).get("bad_epochs", 0))
            log.info("resuming after epoch %d", start_epoch - 1)
            if st.get("extra", {}).get("stopped"):
                start_epoch = t.epochs  # early-stopped run: nothing left to train
                resumed_stopped = True

        n_batches = max(1, len(train_ds) // t.batch_size)
        if t.max_batches_per_epoch:
            n_batches = min(n_batches, int(t.max_batches_per_epoch))
        plugin = _SlicePlugin(cfg, run, summary, task, train_t, train_ds, plain_train_ds, val_loader, n_batches, device,
                              opt, sched)
        st = run_epochs(model, plugin, opt, sched, t, run, device, start_epoch=start_epoch, progress=progress,
                        state=EpochState(history=history, best=best, bad_epochs=bad_epochs, stopped=resumed_stopped))
        history, best, stopped = st.history, st.best, st.stopped

        # ------------------------------------------------------------------ BatchNorm recalibration (end)
        best, bn_info = recalibrate_best_at_end(run, cfg, plugin, device, best, _brief)
        metrics = {"status": "done", "history": history, "best": best, "early_stopped": stopped,
                   "bn_recalibration": bn_info, "monitor": t.monitor}
        run.write_json("metrics.json", metrics)
        _, info = load_checkpoint(run.best, expected_name=cfg.model.name)
        run.write_model_card(model_card(cfg, summary, metrics, info))
        run.mark_done()
        log.info("done: best epoch %s, %s", best.get("epoch") if best else None, run.path)
        return metrics
    finally:
        run.close_log()


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _brief(m: dict) -> dict:
    return {k: m.get(k) for k in ("val_loss", "val_acc", "val_auc")}
