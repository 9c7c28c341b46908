"""M3Lung-Sys patient-level task (Sec. III-C): a trained slice network turns every slice of a patient into a
feature vector (GAP of ResBlock3 + ResBlock4, averaged over the window centres -700/-600/-500, Sec. IV-A); the
patient network (:class:`pneumoct.models.m3lung.M3LungPatientNet`) classifies the ordered sequence of features.

    metrics = fit_patient(load_config("configs/m3lung_patient_cpu.yaml"), "runs/m3lung_patient_cpu")

The split is at the patient level with the same rules and seed as the slice task (``split``), so with the same
data config the validation patients of both stages coincide (the slice network never saw them either).
Resume is not supported for this stage (it trains in seconds to minutes on cached features).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PneumoctInputError
from .checkpoint import load_checkpoint, save_checkpoint, sha256_file
from .config import TrainConfig
from .epochs import TaskPlugin, run_epochs
from .table import SliceTable

__all__ = ["extract_patient_features", "pad_batch", "train_patient_model", "fit_patient"]

log = logging.getLogger("pneumoct.train")


def extract_patient_features(slice_model: torch.nn.Module, table: SliceTable, *, channels: int,
                             window_centers: Sequence[float] | None, window_width: float = 1200.0,
                             batch_size: int = 64, max_slices: int | None = None,
                             device: str | torch.device = "cpu") -> tuple[list[np.ndarray], np.ndarray]:
    """Per patient (in ``np.unique`` order of ``patient_id``): features (N_i, D) of all its slices in slice order
    (``max_slices``: evenly subsampled). Returns ``(features list, patient ids)``."""
    from .predict import predict_table

    out = predict_table(slice_model, "m3lung_slice", table, batch_size=batch_size, window_centers=window_centers,
                        window_width=window_width, channels=channels, device=device)
    feats = out["features"]
    if feats is None:
        raise PneumoctInputError("bad_checkpoint", "the slice model gives no features")
    pids = np.unique(table.patient_id)
    res = []
    for p in pids:
        rows = np.flatnonzero(table.patient_id == p)
        rows = rows[np.argsort(table.slice_index[rows], kind="stable")]
        if max_slices and len(rows) > max_slices:
            rows = rows[np.round(np.linspace(0, len(rows) - 1, max_slices)).astype(int)]
        res.append(feats[rows].astype(np.float32))
    return res, pids


def pad_batch(feats: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (N_i, D) -> ``(B, N_max, D)`` zero-padded at the end, ``mask (B, N_max)`` bool (valid prefix)."""
    n = max(len(f) for f in feats)
    d = feats[0].shape[1]
    x = torch.zeros(len(feats), n, d)
    m = torch.zeros(len(feats), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.as_tensor(f)
        m[i, : len(f)] = True
    return x, m


@torch.no_grad()
def _evaluate(model, feats, labels, idx, class_names, batch_size, device) -> dict:
    from ..evaluate.classification import classification_report

    model.eval()
    probs, total = [], 0.0
    for s in range(0, len(idx), batch_size):
        b = idx[s: s + batch_size]
        x, m = pad_batch([feats[i] for i in b])
        y = torch.as_tensor(labels[b]).long().to(device)
        logits = model(x.to(device), m.to(device))["logits"]
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(logits.softmax(1).cpu().numpy())
    if not len(idx):
        return {"val_loss": None, "val_acc": None, "val_auc": None, "val_n": 0}
    p = np.concatenate(probs)
    rep = classification_report(labels[idx], p, class_names, positive_is_abnormal=True)
    auc = rep["per_class"][class_names[1]]["auc"] if len(class_names) == 2 else rep["macro"]["auc"]
    return {"val_loss": total / len(idx), "val_acc": rep["accuracy"], "val_auc": auc, "val_n": int(len(idx)),
            "val_confusion_matrix": rep["confusion_matrix"]}


class _PatientPlugin(TaskPlugin):
    """The patient network on per-patient slice features for :func:`run_epochs` (M3Lung-Sys Sec. IV-A:
    cross-entropy), class-balanced draws of patients when ``t.balanced_sampling``."""

    def __init__(self, feats, labels, train_idx, val_idx, t, class_names, device, on_epoch):
        self.feats, self.labels, self.train_idx, self.val_idx = feats, labels, np.asarray(train_idx), val_idx
        self.t, self.class_names, self.device, self._on_epoch = t, class_names, device, on_epoch
        self._order = self.train_idx

    def n_batches(self, epoch: int) -> int:
        n = math.ceil(len(self.train_idx) / self.t.batch_size)
        return min(n, int(self.t.max_batches_per_epoch)) if self.t.max_batches_per_epoch else n

    def batches(self, epoch: int, seed: int):
        rng = np.random.default_rng(seed)
        if self.t.balanced_sampling:
            y = self.labels[self.train_idx]
            w = 1.0 / np.bincount(y)[y]
            order = rng.choice(self.train_idx, size=len(self.train_idx), replace=True, p=w / w.sum())
        else:
            order = rng.permutation(self.train_idx)
        bs = self.t.batch_size
        for bi in range(math.ceil(len(order) / bs)):
            b = order[bi * bs: (bi + 1) * bs]
            x, m = pad_batch([self.feats[i] for i in b])
            yield x.to(self.device), m.to(self.device), torch.as_tensor(self.labels[b]).long().to(self.device)

    def loss(self, model, batch):
        x, m, y = batch
        return F.cross_entropy(model(x, m)["logits"], y)

    def evaluate(self, model) -> dict:
        return _evaluate(model, self.feats, self.labels, np.asarray(self.val_idx), self.class_names,
                         self.t.batch_size, self.device)

    def monitor(self, metrics: dict) -> float:
        from .loop import monitor_value

        return monitor_value(metrics, self.t.monitor)

    def on_epoch_end(self, epoch, model, state) -> None:
        if self._on_epoch is not None:
            improved = state.bad_epochs == 0
            self._on_epoch(epoch, state.history[-1], improved, model)

    def log_epoch(self, epoch, epochs, rec, improved) -> None:
        log.info("patient epoch %d/%d: train_loss %.4f val_acc %s", epoch + 1, epochs,
                 rec["train_loss"] or float("nan"), rec["val_acc"])


def train_patient_model(model: torch.nn.Module, feats: Sequence[np.ndarray], labels: np.ndarray,
                        train_idx: np.ndarray, val_idx: np.ndarray, t: Any, class_names: list[str], *,
                        on_epoch: Callable[[int, dict, bool, torch.nn.Module], None] | None = None,
                        progress: bool = False, device: str | torch.device = "cpu") -> dict:
    """Train the patient network with cross-entropy (M3Lung-Sys Sec. IV-A), class-balanced sampling when
    ``t.balanced_sampling``; ``t`` is a :class:`TrainOptions`. Returns ``{"history", "best", "early_stopped"}``."""
    from .loop import build_optimizer, build_scheduler

    labels = np.asarray(labels, np.int64)
    model.to(device)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t)
    plugin = _PatientPlugin(feats, labels, train_idx, val_idx, t, class_names, device, on_epoch)
    st = run_epochs(model, plugin, opt, sched, t, None, torch.device(device), progress=progress,
                    desc="patient epoch")
    return {"history": st.history, "best": st.best, "early_stopped": st.stopped}


def fit_patient(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True,
                table: SliceTable | None = None) -> dict:
    """The patient-level stage end to end, into run folder ``out_dir`` (same layout as the slice task)."""
    from ..models import build_model
    from .loop import _checkpoint_meta, data_summary, prepare_table, select_device, seed_everything, split_indices
    from .run import RunFolder, model_card

    if resume:
        raise PneumoctInputError("bad_argument", "--resume is not supported for the patient task; rerun it "
                                 "(it trains on cached slice features in minutes)")
    t = cfg.train
    if t.threads:
        torch.set_num_threads(int(t.threads))
    device = select_device(t.device)
    slice_model, sinfo = load_checkpoint(cfg.patient.slice_checkpoint)
    if not sinfo["model_name"].startswith("m3lung_slice"):
        raise PneumoctInputError("bad_config", f"patient.slice_checkpoint holds {sinfo['model_name']!r}, "
                                 "not an m3lung_slice model")
    smeta = sinfo.get("meta", {})
    channels = int(smeta.get("channels", sinfo["model_kwargs"].get("in_channels", 3)))
    size = int(smeta.get("input_size", cfg.data.size))
    if size != cfg.data.size:
        raise PneumoctInputError("bad_config", f"data.size {cfg.data.size} differs from the slice model's input "
                                 f"size {size}")
    run = RunFolder(out_dir, resume=False)
    run.open_log()
    try:
        seed_everything(t.seed)
        if table is None:
            from .data import build_tables

            table = build_tables(cfg.data.tables, cfg.data.size, cfg.data.cache_dir)
        relabel = table.subset(np.arange(len(table)))
        if cfg.data.target != "lesion":
            relabel.class_label = table.patient_label.copy()
        table, patient_y = prepare_table(relabel, cfg.data.target)
        if len(table) == 0:
            raise PneumoctInputError("bad_input", "no patients with a label in the data tables")
        tr_rows, va_rows = split_indices(table, patient_y, cfg.split)
        train_t, val_t = table.subset(tr_rows), table.subset(va_rows)
        summary = data_summary(train_t, val_t, cfg)
        summary["slice_checkpoint"] = {"path": str(cfg.patient.slice_checkpoint), "sha256": sinfo["sha256"]}
        run.write_config(cfg)
        run.write_json("data_summary.json", summary)
        slice_model.to(device)
        feats, pids = extract_patient_features(
            slice_model, table, channels=channels, window_centers=cfg.patient.window_centers,
            window_width=cfg.data.window_width, batch_size=cfg.patient.feature_batch_size,
            max_slices=cfg.patient.max_slices, device=device)
        labels = np.array([patient_y[np.flatnonzero(table.patient_id == p)[0]] for p in pids], np.int64)
        val_p = set(map(str, np.unique(val_t.patient_id)))
        val_idx = np.array([i for i, p in enumerate(pids) if str(p) in val_p], np.int64)
        train_idx = np.array([i for i, p in enumerate(pids) if str(p) not in val_p], np.int64)
        log.info("patient features: %d train / %d val patients, D=%d", len(train_idx), len(val_idx),
                 feats[0].shape[1])
        cfg.model.kwargs["feature_dim"] = int(feats[0].shape[1])
        cfg.model.kwargs.setdefault("num_classes", cfg.num_classes)
        model = build_model(cfg.model.name, **cfg.model.kwargs)
        run.write_config(cfg)
        extra = {"slice_checkpoint_sha256": sinfo["sha256"], "slice_model": sinfo["model_name"],
                 "slice_model_kwargs": sinfo["model_kwargs"], "window_centers": cfg.patient.window_centers,
                 "max_slices": cfg.patient.max_slices}

        def on_epoch(epoch: int, rec: dict, improved: bool, m: torch.nn.Module) -> None:
            if improved:
                save_checkpoint(run.best, m, cfg.model.name, cfg.model.kwargs,
                                _checkpoint_meta(cfg, summary, {**extra, "epoch": epoch, "val": rec}))
            run.write_json("metrics.json", {"status": "running", "history": hist_so_far + [rec]})
            hist_so_far.append(rec)

        hist_so_far: list[dict] = []
        res = train_patient_model(model, feats, labels, train_idx, val_idx, t, cfg.class_names,
                                  on_epoch=on_epoch, progress=progress, device=device)
        save_checkpoint(run.last_state, model, cfg.model.name, cfg.model.kwargs,
                        _checkpoint_meta(cfg, summary, {**extra, "epoch": len(res["history"]) - 1}))
        metrics = {"status": "done", **res, "monitor": t.monitor, "bn_recalibration": {"mode": "n/a (no BatchNorm)"}}
        run.write_json("metrics.json", metrics)
        _, info = load_checkpoint(run.best, expected_name=cfg.model.name)
        run.write_model_card(model_card(cfg, summary, metrics, info))
        run.mark_done()
        return metrics
    finally:
        run.close_log()
