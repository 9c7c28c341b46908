"""Lesion segmentation training (``task: segmentation``): JCS segmentation branch or the U-Net baseline.

    from pneumoct.train.config import load_config
    from pneumoct.train.segment import fit_segmentation
    metrics = fit_segmentation(load_config("configs/lesion_seg_real_cpu.yaml"), "runs/lesion_seg_real_cpu")

Order of work (as :func:`pneumoct.train.loop.fit`): seed -> slice tables -> rows with a lesion mask only ->
patient-level split (stratified by source, :func:`~pneumoct.train.loop.split_indices`) -> datasets (augmentation on
train rows; image and mask move together, the mask by nearest neighbour) -> epochs of deep supervision loss
(JCS Eq. (6): BCE/CE + soft Dice on every side-output; a U-Net has one output) -> validation Dice each epoch ->
early stopping / best checkpoint on ``train.monitor`` (``val_dice`` or ``val_loss``) -> BatchNorm recalibration ->
model card -> ``DONE``.

Targets (``data.target``):

* ``lesion_binary``: lesion_mask > 0, one logit (sigmoid); validation = mean per-image Dice at probability 0.5.
* ``lesion_multiclass``: lesion_mask 0 background / 1 ground-glass / 2 consolidation, three logits (softmax);
  validation = argmax, mean per-image Dice of "any lesion" (``val_dice``, the monitor) and per class.

**Binary-only masks in a multi-class run.** Some sources mark "lesion" without telling GGO from consolidation
(covid19-ct-seg-png: 1 = any infection). Their mask value 1 must not be read as "GGO". Rule chosen here: those rows
are kept and supervised only on *lesion vs background*: the model's lesion probability is
``P(GGO) + P(consolidation)``, i.e. the binary logit ``logsumexp(z_GGO, z_cons) - z_bg``, trained with the binary
deep supervision loss against ``mask > 0``; their GGO/consolidation split is left free. They count in the
"any lesion" validation Dice, never in the per-class Dice. A row is binary-only when its source (``lung-crop:``
prefix removed) is in :data:`BINARY_MASK_SOURCES`, or when no mask of its source has a value above 1.

Every epoch is seeded from ``(train.seed, epoch)``; augmentation of item ``i`` from ``(train.seed, epoch, i)``.
``--resume`` is not supported for this task (start a new run).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import PneumoctInputError
from .config import TrainConfig
from .epochs import TaskPlugin, recalibrate_best_at_end, run_epochs
from .loop import (_checkpoint_meta, build_optimizer, build_scheduler, data_summary, seed_everything, select_device,
                   split_indices)
from .run import SYNTHETIC_LINE, synthetic_banner, RunFolder
from .table import SliceTable

__all__ = ["fit_segmentation", "SegmentationDataset", "segmentation_loss", "evaluate_segmentation",
           "binary_only_rows", "BINARY_MASK_SOURCES", "seg_model_card"]

log = logging.getLogger("pneumoct.train")

#: sources whose masks say "lesion" (1) without the GGO / consolidation distinction
BINARY_MASK_SOURCES = ("covid19-ct-seg-png",)
_PREFIX = "lung-crop:"


def binary_only_rows(table: SliceTable) -> np.ndarray:
    """(N,) bool: rows whose mask is lesion-vs-background only (see the module docstring)."""
    src = np.asarray([str(s)[len(_PREFIX):] if str(s).startswith(_PREFIX) else str(s) for s in table.source])
    out = np.isin(src, BINARY_MASK_SOURCES)
    for s in np.unique(src):
        sel = (src == s) & table.has_mask
        if sel.any() and int(table.lesion_mask[sel].max()) <= 1:
            out |= src == s
    return out


# --------------------------------------------------------------------------------------------------------- data
class SegmentationDataset(Dataset):
    """Items: ``image`` (C, S, S) float32 in [0, 1]; ``target`` (S, S): float32 lesion>0 (binary) or long 0/1/2
    (multi-class); ``binary_only`` bool; ``index`` long. Without ``augment`` HU rows use the fixed ``window``."""

    def __init__(self, table: SliceTable, *, multiclass: bool, binary_only: np.ndarray | None = None,
                 channels: int = 1, augment: Any = None, seed: int = 0,
                 window: tuple[float, float] = (-600.0, 1200.0), input_transform: str = "none") -> None:
        self.table = table
        self.input_transform = input_transform
        self.multiclass = bool(multiclass)
        self.binary_only = np.zeros(len(table), bool) if binary_only is None else np.asarray(binary_only, bool)
        self.channels = int(channels)
        self.augment = augment
        self.seed = int(seed)
        self.window = (float(window[0]), float(window[1]))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from .augment import augment_slice, to_unit

        i = int(index)
        t = self.table
        mask = np.asarray(t.lesion_mask[i], np.uint8)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            x, mask = augment_slice(t.images[i], bool(t.is_hu[i]), mask, rng, self.augment)
        else:
            x = to_unit(t.images[i], bool(t.is_hu[i]), *self.window)
        if self.input_transform != "none":
            from ..preprocess.slice_input import harmonise

            x = harmonise(x, self.input_transform)
        bo = bool(self.binary_only[i])
        if self.multiclass:
            tgt = torch.from_numpy(((mask > 0) if bo else np.minimum(mask, 2)).astype(np.int64))
        else:
            tgt = torch.from_numpy((mask > 0).astype(np.float32))
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        if self.channels > 1:
            xt = xt.expand(self.channels, -1, -1).contiguous()
        return {"image": xt, "target": tgt, "binary_only": torch.tensor(bo), "index": torch.tensor(i)}


# --------------------------------------------------------------------------------------------------------- loss
def _lesion_logit(lg: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) softmax logits -> (B, 1, H, W) logit whose sigmoid is P(any lesion class) = 1 - P(bg)."""
    return torch.logsumexp(lg[:, 1:], dim=1, keepdim=True) - lg[:, :1]


def segmentation_loss(out: dict, target: torch.Tensor, binary_only: torch.Tensor | None = None) -> torch.Tensor:
    """Deep supervision loss (:func:`pneumoct.models.jcs_seg.deep_supervision_loss`). Multi-class outputs with
    ``binary_only`` rows: those rows get the binary loss on the lesion logit (module docstring), the others the
    multi-class loss; the two are averaged weighted by their row counts."""
    from ..models.jcs_seg import deep_supervision_loss

    sides = list(out.get("side_logits") or [out["logits"]])
    if sides[-1].shape[1] == 1 or binary_only is None or not bool(binary_only.any()):
        return deep_supervision_loss(out, target)
    bo = binary_only.bool()
    n = float(bo.numel())
    total = sides[-1].new_zeros(())
    if bool((~bo).any()):
        total = total + float((~bo).sum()) / n * deep_supervision_loss(
            {"side_logits": [s[~bo] for s in sides]}, target[~bo])
    total = total + float(bo.sum()) / n * deep_supervision_loss(
        {"side_logits": [_lesion_logit(s[bo]) for s in sides]}, (target[bo] > 0).float())
    return total


# --------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, loader: DataLoader, multiclass: bool, device: torch.device,
                          threshold: float = 0.5) -> dict:
    """``val_loss``, ``val_dice`` (mean per-image Dice of any lesion; both-empty = 1, one empty = 0, as in
    :mod:`pneumoct.evaluate.segmentation`) and, multi-class, ``val_dice_ground_glass`` /
    ``val_dice_consolidation`` over the rows with multi-class masks."""
    from ..evaluate.segmentation import dice

    model.eval()
    total, n = 0.0, 0
    any_d: list[float] = []
    cls_d: dict[int, list[float]] = {1: [], 2: []}
    n_empty_truth = 0
    for batch in loader:
        x = batch["image"].to(device)
        tgt = batch["target"].to(device)
        bo = batch["binary_only"].to(device)
        out = model(x)
        b = int(x.shape[0])
        total += float(segmentation_loss(out, tgt, bo)) * b
        n += b
        lg = out["logits"]
        if lg.shape[-2:] != tgt.shape[-2:]:
            lg = torch.nn.functional.interpolate(lg, size=tgt.shape[-2:], mode="bilinear", align_corners=False)
        if multiclass:
            pred = lg.argmax(1).cpu().numpy()
        else:
            pred = (torch.sigmoid(lg[:, 0]) > threshold).cpu().numpy().astype(np.int64)
        truth = tgt.cpu().numpy()
        bon = bo.cpu().numpy()
        for j in range(b):
            tj = truth[j] > 0
            n_empty_truth += int(not tj.any())
            any_d.append(dice(pred[j] > 0, tj))
            if multiclass and not bon[j]:
                for c in (1, 2):
                    cls_d[c].append(dice(pred[j] == c, truth[j] == c))
    if n == 0:
        return {"val_loss": None, "val_dice": None, "val_n": 0}
    m = {"val_loss": total / n, "val_dice": float(np.mean(any_d)), "val_n": n, "val_n_empty_truth": n_empty_truth}
    if multiclass:
        m["val_dice_ground_glass"] = float(np.mean(cls_d[1])) if cls_d[1] else None
        m["val_dice_consolidation"] = float(np.mean(cls_d[2])) if cls_d[2] else None
        m["val_n_multiclass"] = len(cls_d[1])
    return m


def _monitor(m: dict, monitor: str) -> float:
    v = m.get(monitor)
    if v is None or not math.isfinite(float(v)):
        return -math.inf
    return -float(v) if monitor == "val_loss" else float(v)


def _brief(m: dict) -> dict:
    return {k: v for k, v in m.items() if k.startswith("val_")}


# ---------------------------------------------------------------------------------------------------- model card
def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def seg_model_card(cfg: TrainConfig, summary: dict, metrics: dict, info: dict | None = None) -> str:
    sources = sorted(set(summary.get("sources", [])))
    synthetic = bool(summary.get("synthetic"))
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
        f"- target `{cfg.data.target}`, mask classes: {', '.join(cfg.class_names)}",
        f"- input: {cfg.data.size}x{cfg.data.size} lung crop, {cfg.data.channels} channel(s); HU rows through the "
        f"window centre {cfg.data.window_center} width {cfg.data.window_width}, 8-bit rows as exported",
        "- loss: deep supervision (JCS Eq. (6)): BCE / cross-entropy + soft Dice on every side-output",
        "",
        "## Data",
        f"- sources: {', '.join(sources) or 'n/a'} ({('includes synthetic phantoms' if len(sources) > 1 else 'synthetic') if synthetic else 'real data'}); rows with a lesion "
        "mask only",
        f"- tables: {json.dumps(cfg.data.tables)}",
        f"- train: {summary.get('train', {}).get('slices')} slices / {summary.get('train', {}).get('patients')} "
        f"patients; val: {summary.get('val', {}).get('slices')} slices / {summary.get('val', {}).get('patients')} "
        "patients",
        "- split: patient level (stratified by source), "
        + (f"fold {cfg.split.fold} of {cfg.split.kfold}" if cfg.split.kfold else f"val_fraction {cfg.split.val_fraction}")
        + f", seed {cfg.split.seed}",
    ]
    if cfg.data.target == "lesion_multiclass":
        lines.append(f"- binary-only mask rows (lesion vs background supervision only): "
                     f"{summary.get('binary_only_rows', 0)}")
    lines += [
        "",
        "## Validation (best epoch)",
        f"- epoch: {_fmt(best.get('epoch'))}; monitor `{cfg.train.monitor}`",
        f"- mean per-image Dice (any lesion, threshold 0.5 / argmax): {_fmt(best.get('val_dice'))}; "
        f"loss: {_fmt(best.get('val_loss'))}",
    ]
    if cfg.data.target == "lesion_multiclass":
        lines.append(f"- Dice ground-glass: {_fmt(best.get('val_dice_ground_glass'))}; consolidation: "
                     f"{_fmt(best.get('val_dice_consolidation'))}")
    lines += [
        f"- BatchNorm recalibration: {json.dumps(metrics.get('bn_recalibration'))}",
        f"- epochs run: {len(metrics.get('history', []))} of {cfg.train.epochs}"
        + (" (early stopping)" if metrics.get("early_stopped") else ""),
        "",
        "## Intended use",
        "Research on lesion segmentation of chest CT (comparison with JCS / U-Net, quantification studies). Not for "
        "diagnosis, triage or any clinical decision.",
        "",
        "## Limitations",
        "- Validation is on a held-out split of the same sources with few patients; it says nothing about other "
        "scanners, protocols or populations.",
        "- Empty-truth images score Dice 1 when the prediction is empty too, 0 otherwise.",
    ]
    if "covid19-ct-seg-png" in sources:
        lines.append("- covid19-ct-seg-png has no reliable patient mapping: its split may leak and be optimistic.")
    if "medseg" in sources:
        lines.append("- medseg: one pseudo-patient per image (slices of one scan may be on both sides of the split).")
    if synthetic:
        lines.append("- Synthetic phantoms are far simpler than real CT: accuracy on them is not clinical accuracy.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- fit
class _SegPlugin(TaskPlugin):
    """Lesion segmentation (JCS-style nets, U-Net) for :func:`run_epochs`: shuffled batches, the deep-supervised
    Dice + cross-entropy loss with binary-only rows, Dice on validation; JCS's poly schedule steps per batch."""

    def __init__(self, cfg, run, summary, train_ds, plain_train_ds, val_loader, n_batches, per_iter, multiclass,
                 device):
        self.cfg, self.run, self.summary, self.t = cfg, run, summary, cfg.train
        self.train_ds, self.plain_train_ds, self.val_loader = train_ds, plain_train_ds, val_loader
        self._n, self.per_iteration_scheduler, self.multiclass, self.device = n_batches, per_iter, multiclass, device

    def n_batches(self, epoch: int) -> int:
        return self._n

    def batches(self, epoch: int, seed: int):
        self.train_ds.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(seed)
        loader = DataLoader(self.train_ds, batch_size=self.t.batch_size, shuffle=True, generator=g,
                            drop_last=len(self.train_ds) > self.t.batch_size)
        return loader

    def loss(self, model, batch):
        x = batch["image"].to(self.device)
        return segmentation_loss(model(x), batch["target"].to(self.device), batch["binary_only"].to(self.device))

    def evaluate(self, model) -> dict:
        return evaluate_segmentation(model, self.val_loader, self.multiclass, self.device)

    def monitor(self, metrics: dict) -> float:
        return _monitor(metrics, self.t.monitor)

    def recalibration_data(self):
        return self.plain_train_ds

    def on_improved(self, epoch, model, best, recalibrated) -> None:
        save_checkpoint_seg(self.run.best, model, self.cfg, self.summary,
                            {"epoch": epoch, "val": best, "bn_recalibrated": self.t.bn_recalibrate == "epoch"})

    def log_epoch(self, epoch, epochs, rec, improved) -> None:
        log.info("epoch %d/%d: train_loss %.4f val_loss %s val_dice %s%s", epoch + 1, epochs,
                 rec["train_loss"] if rec["train_loss"] is not None else float("nan"), _fmt(rec.get("val_loss")),
                 _fmt(rec.get("val_dice")), " (best)" if improved else "")


def _poly(opt: torch.optim.Optimizer, total_iters: int, power: float):
    total = max(1, int(total_iters))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1.0 - min(it, total) / total) ** power)


def fit_segmentation(cfg: TrainConfig, out_dir, progress: bool = True, table: SliceTable | None = None) -> dict:
    """Train a lesion segmentation model (``cfg.task == "segmentation"``) into run folder ``out_dir``; returns the
    metrics dict (``history``, ``best``, ``bn_recalibration``, ``early_stopped``, ``monitor``). ``table`` skips
    building the data tables."""
    if cfg.task != "segmentation":
        raise PneumoctInputError("bad_config", "fit_segmentation() trains the segmentation task")
    from ..models import build_model
    from .augment import AugmentConfig

    t = cfg.train
    if t.threads:
        torch.set_num_threads(int(t.threads))
    device = select_device(t.device)
    multiclass = cfg.data.target == "lesion_multiclass"
    run = RunFolder(out_dir)
    run.open_log()
    try:
        seed_everything(t.seed)
        if table is None:
            if not cfg.data.tables:
                raise PneumoctInputError("bad_config", "data.tables is empty")
            from .data import build_tables

            table = build_tables(cfg.data.tables, cfg.data.size, cfg.data.cache_dir)
        if len(table) and table.size != cfg.data.size:
            raise PneumoctInputError("bad_config", f"slice table crops are {table.size} px, data.size is "
                                     f"{cfg.data.size}")
        table = table.subset(np.flatnonzero(table.has_mask))
        if len(table) == 0:
            raise PneumoctInputError("bad_input", "no rows with a lesion mask in the data tables")
        bin_only = binary_only_rows(table) if multiclass else np.zeros(len(table), bool)
        # stratify the patient-level split by source, so every source is represented in validation
        _, strat = np.unique(table.source.astype(str), return_inverse=True)
        tr_idx, va_idx = split_indices(table, strat.astype(np.int64), cfg.split)
        if len(tr_idx) == 0 or len(va_idx) == 0:
            raise PneumoctInputError("bad_input", f"the patient-level split left {len(tr_idx)} training and "
                                     f"{len(va_idx)} validation slices; need more patients")
        train_t, val_t = table.subset(tr_idx), table.subset(va_idx)
        summary = data_summary(train_t, val_t, cfg)
        summary["binary_only_rows"] = int(bin_only.sum())
        run.write_config(cfg)
        run.write_json("data_summary.json", summary)
        log.info("data: %d train slices (%d patients), %d val slices (%d patients), sources %s%s",
                 len(train_t), summary["train"]["patients"], len(val_t), summary["val"]["patients"],
                 ", ".join(summary["sources"]),
                 f"; {int(bin_only.sum())} binary-only mask rows" if multiclass else "")
        aug = None
        if cfg.augment is not None:
            aug = AugmentConfig(**{kk: (tuple(v) if isinstance(v, list) else v) for kk, v in cfg.augment.items()})
        window = (cfg.data.window_center, cfg.data.window_width)
        kw = dict(multiclass=multiclass, channels=cfg.data.channels, window=window,
                  input_transform=cfg.data.input_transform)
        train_ds = SegmentationDataset(train_t, binary_only=bin_only[tr_idx], augment=aug, seed=t.seed, **kw)
        plain_train_ds = SegmentationDataset(train_t, binary_only=bin_only[tr_idx], **kw)
        val_ds = SegmentationDataset(val_t, binary_only=bin_only[va_idx], **kw)
        val_loader = DataLoader(val_ds, batch_size=t.batch_size, shuffle=False)

        model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
        if getattr(t, "init_from", None):
            from .checkpoint import load_checkpoint

            init_model, _ = load_checkpoint(t.init_from, expected_name=cfg.model.name)  # sha256-verified
            model.load_state_dict(init_model.state_dict())
            log.info("initialised from %s", t.init_from)
        opt = build_optimizer(model, t)
        n_batches = max(1, len(train_ds) // t.batch_size)
        if t.max_batches_per_epoch:
            n_batches = min(n_batches, int(t.max_batches_per_epoch))
        per_iter = t.scheduler == "poly"
        sched = _poly(opt, n_batches * t.epochs, t.poly_power) if per_iter else build_scheduler(opt, t)
        plugin = _SegPlugin(cfg, run, summary, train_ds, plain_train_ds, val_loader, n_batches, per_iter, multiclass,
                            device)
        st = run_epochs(model, plugin, opt, sched, t, run, device, progress=progress)
        history, best, stopped = st.history, st.best, st.stopped

        from .checkpoint import load_checkpoint

        best, bn_info = recalibrate_best_at_end(run, cfg, plugin, device, best, _brief)
        metrics = {"status": "done", "history": history, "best": best, "early_stopped": stopped,
                   "bn_recalibration": bn_info, "monitor": t.monitor}
        run.write_json("metrics.json", metrics)
        _, info = load_checkpoint(run.best, expected_name=cfg.model.name)
        run.write_model_card(seg_model_card(cfg, summary, metrics, info))
        from ..models.onnx_runtime import try_export_onnx

        try_export_onnx(run.best)  # `segment` then runs it without importing PyTorch
        run.mark_done()
        log.info("done: best epoch %s, %s", best.get("epoch") if best else None, run.path)
        return metrics
    finally:
        run.close_log()


def save_checkpoint_seg(path: Path, model: torch.nn.Module, cfg: TrainConfig, summary: dict, extra: dict) -> None:
    """:func:`~pneumoct.train.checkpoint.save_checkpoint` with the segmentation meta: family / task
    ``segmentation``, ``target``, ``num_classes``, ``classes``, ``input_size``, ``channels``, ``window``, data."""
    from .checkpoint import save_checkpoint

    meta = _checkpoint_meta(cfg, summary, {"num_classes": cfg.num_classes,
                                           "input_transform": cfg.data.input_transform,
                                           "binary_only_sources": list(BINARY_MASK_SOURCES), **extra})
    meta["data"]["binary_only_rows"] = summary.get("binary_only_rows", 0)
    save_checkpoint(path, model, cfg.model.name, cfg.model.kwargs, meta)
