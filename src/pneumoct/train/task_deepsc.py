"""DeepSC-COVID training (``task: deepsc``): the two-stage schedule of Wang et al. (TMI 2022, Sec. V-A "Model
training") as a :class:`~pneumoct.train.epochs.TaskPlugin` of the shared epoch loop.

    pneumoct train configs/deepsc_cpu.yaml

Data: whole volumes (:mod:`pneumoct.train.volumes`): in-memory phantoms with voxel lesion truth (training and a
validation cohort of other seeds) and, optionally, the real covid-ct-md studies whose radiologist slice labels
supervise the lesion subnet weakly (:func:`~pneumoct.models.losses.slice_max_loss`). Each volume goes once through
the recorded input chain (:mod:`pneumoct.preprocess.volume_deepsc`); one training item is one study (all its
patches + its N sampled slices); a batch is ``train.batch_size`` studies, the loss their mean.

Loss (Eq. (11)): lambda_seg L_seg (Eq. (8): Dice + focal on the voxel truth; the weak slice loss where there is
none) + lambda_cls L_cls (Eq. (9): inverse-frequency weighted cross-entropy) + lambda_ta L_ta (Eq. (10)).

Task-aware loss, our reading of Eq. (5)/(10): the intermediate segmentations S_3 (1/2), S_2 (1/4), S_1 (1/8) are
paired with the evidence masks of the same resolution V_1, V_2, V_3 (weights eta_3, eta_2, eta_1); S_i is taken at
the N sampled slices (its stack of patches gathered at ``cls_index // f`` and average-pooled over z by f, the
encoder's z stride), V_i is ReLU-ed and scaled to [0, 1] (:func:`~pneumoct.models.losses.normalise_evidence`)
and cropped / padded to S_i's size (the CROP of Eq. (5)). V is of the predicted class (paper); when that class is
the "no pneumonia" class (``healthy`` / ``non_pneumonia``) the study gets no task-aware term (a healthy class's
evidence is not lesion evidence). ``multi_scale_ta: false`` keeps only the finest pair (Table III ablation).

Schedule: stage 1 pre-trains the two subnets apart (cross-stitch unmixed, the classifier sees the segmentation
without gradient, no task-aware loss; lr ``pretrain_lr``, paper 1e-3); stage 2 fine-tunes everything jointly
(lr ``finetune_lr``, paper 1e-4, task-aware loss on). Adam (0.9, 0.999), learning rate decayed linearly to 0
within each stage (paper: "linear decay"). The best stage-2 epoch on ``train.monitor`` is kept (stage 1 when
there is no stage 2).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._version import __version__
from ..errors import PneumoctInputError
from .config import TrainConfig
from .deepsc_options import DeepSCOptions
from .epochs import EpochState, TaskPlugin, run_epochs
from .run import RunFolder, synthetic_banner

__all__ = ["DeepSCOptions", "VolumeItem", "fit_deepsc", "prepare_items", "deepsc_study_loss", "evaluate_items",
           "predict_item", "target_index", "NORMAL_CLASSES"]

log = logging.getLogger("pneumoct.train")

#: class names that mean "no pneumonia" (no task-aware term; the "abnormal" call of a system is any other class)
NORMAL_CLASSES = ("healthy", "non_pneumonia")


def target_index(label: str, class_names: list[str]) -> int | None:
    """A case's product label -> index in the head's classes (config ``data.target``); None = not in this task
    (other_viral under covid_cap_np). Mapping: ``covid``: covid19 vs everything else (non_covid);
    ``covid_cap_np``: healthy -> non_pneumonia."""
    if label in class_names:
        return class_names.index(label)
    if "non_covid" in class_names:
        return class_names.index("non_covid")
    if label == "healthy" and "non_pneumonia" in class_names:
        return class_names.index("non_pneumonia")
    return None


@dataclass
class VolumeItem:
    """One study on the model grid, as tensors: patches (P, 1, D, H, W), x_cls (1, 1, N, H, W), cls_index (N,),
    lesion (Z', H, W) float 0/1 or None, lung (Z', H, W) bool, slice_labels (Z',) float or None, y class index."""

    case_id: str
    dataset: str
    group: str
    y: int
    patches: torch.Tensor
    x_cls: torch.Tensor
    cls_index: torch.Tensor
    lung: torch.Tensor
    n_real: int
    lesion: torch.Tensor | None = None
    slice_labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> "VolumeItem":
        mv = {k: (getattr(self, k).to(device) if getattr(self, k) is not None else None)
              for k in ("patches", "x_cls", "cls_index", "lung", "lesion", "slice_labels")}
        return dataclasses.replace(self, **mv)


def prepare_items(cases: list, class_names: list[str], spec) -> list[VolumeItem]:
    """Volume cases -> model-grid items (cases whose label is not in the task are left out)."""
    from ..preprocess.volume_deepsc import prepare
    from .volumes import dataset_of

    items = []
    for c in cases:
        y = target_index(c.label, class_names)
        if y is None:
            continue
        pv = prepare(c.hu, c.lung, c.spacing, spec)
        lesion = None if c.lesion is None else torch.from_numpy(pv.to_model_grid(c.lesion > 0, binary=True))
        sl = None if c.slice_labels is None or c.lesion is not None else torch.from_numpy(
            pv.slice_labels_to_model(c.slice_labels))
        items.append(VolumeItem(
            case_id=c.case_id, dataset=dataset_of(c), group=c.group, y=int(y),
            patches=torch.from_numpy(np.ascontiguousarray(pv.patches()))[:, None],
            x_cls=torch.from_numpy(np.ascontiguousarray(pv.cls_input()))[None, None],
            cls_index=torch.from_numpy(pv.cls_index), lung=torch.from_numpy(pv.lung), n_real=pv.n_real,
            lesion=lesion, slice_labels=sl))
    return items


def _stack(t: torch.Tensor) -> torch.Tensor:
    """(P, 1, d, h, w) patch outputs -> (P*d, h, w) one volume in z order."""
    return t[:, 0].reshape(-1, *t.shape[-2:])


def _seg_at_cls(side: torch.Tensor, cls_index: torch.Tensor, f: int) -> torch.Tensor:
    """An intermediate segmentation (P, 1, D/f, H/f, W/f) logits -> its probability at the sampled slices on the
    encoder's grid, (1, 1, N/f, H/f, W/f) (module docstring)."""
    s = torch.sigmoid(_stack(side))[None, None]  # (1, 1, Z'/f, h, w)
    s = s.index_select(2, torch.div(cls_index, f, rounding_mode="floor"))
    return F.avg_pool3d(s, (f, 1, 1)) if f > 1 else s


def deepsc_study_loss(model, item: VolumeItem, opts: DeepSCOptions, class_weights: torch.Tensor | None,
                      *, stage: int, normal_index: int | None) -> tuple[torch.Tensor, dict]:
    """Eq. (11) for one study. Returns (loss, parts)."""
    from ..models.deepsc import match_dims
    from ..models.losses import (ClassBalancedFocalLoss, deepsc_segmentation_loss, normalise_evidence,
                                 slice_max_loss, task_aware_loss)

    out = model(item.patches, item.x_cls, item.cls_index, detach_lesion=stage == 1)
    seg = _stack(out["seg_logits"])
    n = item.n_real
    zero = seg.new_zeros(())
    if item.lesion is not None:
        l_seg = deepsc_segmentation_loss(seg[:n], item.lesion[:n], lambda_dice=opts.lambda_dice,
                                         lambda_focal=opts.lambda_focal, alpha=opts.focal_alpha,
                                         gamma=opts.focal_gamma)
    elif item.slice_labels is not None:
        l_seg = opts.weak_slice_weight * slice_max_loss(torch.sigmoid(seg[:n]), item.slice_labels[:n], item.lung[:n])
    else:
        l_seg = zero
    y = torch.tensor([item.y], device=seg.device)
    # DeepSC-COVID Eq. (9): xi_y * CE, xi = inverse class frequency (normalised as pneumoct.models.losses says)
    l_cls = ClassBalancedFocalLoss(weights=class_weights, gamma=0.0)(out["logits"], y)
    l_ta = zero
    pred = int(out["logits"].argmax(1))
    if stage == 2 and opts.lambda_ta > 0 and pred != normal_index:
        ev = model.evidence(out, torch.tensor([pred], device=seg.device))  # Eq. (5), finest first
        sides = out["side_logits"]  # S_1 (1/8) .. S_4 (1/1)
        pairs = [(sides[2], 2, ev[0], 2), (sides[1], 4, ev[1], 1), (sides[0], 8, ev[2], 0)]
        if not opts.multi_scale_ta:
            pairs = pairs[:1]
        s_list, v_list, eta = [], [], []
        for side, f, v, k in pairs:
            s = _seg_at_cls(side, item.cls_index, f)
            s_list.append(s)
            v_list.append(match_dims(normalise_evidence(v), s.shape[2:]))  # the CROP of Eq. (5)
            eta.append(float(model.eta[k]))
        l_ta = task_aware_loss(s_list, v_list, eta)  # DeepSC-COVID Eq. (10)
    total = opts.lambda_seg * l_seg + opts.lambda_cls * l_cls + opts.lambda_ta * l_ta  # Eq. (11)
    return total, {"seg": float(l_seg.detach()), "cls": float(l_cls.detach()), "ta": float(l_ta.detach()),
                   "probs": torch.softmax(out["logits"].detach(), 1)[0], "seg_prob": torch.sigmoid(seg.detach())}


@torch.no_grad()
def predict_item(model, item: VolumeItem) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (K,), lesion probability on the model grid (n_real, H, W))."""
    model.eval()
    out = model(item.patches, item.x_cls, item.cls_index)
    return (torch.softmax(out["logits"], 1)[0].cpu().numpy(),
            torch.sigmoid(_stack(out["seg_logits"]))[: item.n_real].cpu().numpy())


@torch.no_grad()
def evaluate_items(model, items: list[VolumeItem], class_names: list[str], opts: DeepSCOptions,
                   class_weights: torch.Tensor | None, normal_index: int | None) -> dict:
    """``val_loss`` (seg + cls, no task-aware term), ``val_acc``, ``val_auc`` (binary: of class 1; else macro),
    ``val_dice`` (mean per-study Dice at 0.5 inside the lung, model grid, studies with a non-empty voxel
    truth), ``val_score``
    = mean of AUC (accuracy where undefined) and Dice."""
    from ..evaluate.classification import classification_report
    from ..evaluate.segmentation import dice

    model.eval()
    losses, probs, ys, dices = [], [], [], []
    for it in items:
        loss, parts = deepsc_study_loss(model, it, dataclasses.replace(opts, lambda_ta=0.0), class_weights,
                                        stage=2, normal_index=normal_index)
        losses.append(float(loss))
        probs.append(parts["probs"].cpu().numpy())
        ys.append(it.y)
        if it.lesion is not None and bool(it.lesion.any()):  # Dice of lesion-bearing studies only
            n = it.n_real
            pred = (parts["seg_prob"][:n] >= 0.5) & it.lung[:n]
            dices.append(dice(pred.cpu().numpy(), it.lesion[:n].cpu().numpy() > 0))
    if not items:
        return {"val_loss": None, "val_acc": None, "val_auc": None, "val_dice": None, "val_n": 0}
    rep = classification_report(np.asarray(ys), np.stack(probs), class_names, positive_is_abnormal=False)
    auc = rep["per_class"][class_names[1]]["auc"] if len(class_names) == 2 else rep["macro"]["auc"]
    d = float(np.mean(dices)) if dices else None
    score_parts = [v for v in (auc if auc is not None else rep["accuracy"], d) if v is not None]
    return {"val_loss": float(np.mean(losses)), "val_acc": rep["accuracy"], "val_auc": auc, "val_dice": d,
            "val_score": float(np.mean(score_parts)), "val_n": len(items), "val_n_dice": len(dices)}


class _DeepSCPlugin(TaskPlugin):
    """Batches of studies, Eq. (11), validation on the held-out cohort; ``stage`` 1 or 2 (module docstring)."""

    def __init__(self, cfg, opts, run, model_meta, train_items, val_items, class_weights, normal_index):
        self.cfg, self.opts, self.run, self.meta = cfg, opts, run, model_meta
        self.train_items, self.val_items = train_items, val_items
        self.class_weights, self.normal_index = class_weights, normal_index
        self.stage = 1
        self.bs = max(1, int(cfg.train.batch_size))

    def n_batches(self, epoch: int) -> int:
        n = math.ceil(len(self.train_items) / self.bs)
        mb = self.cfg.train.max_batches_per_epoch
        return min(n, int(mb)) if mb else n

    def batches(self, epoch: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(self.train_items))
        for i in range(0, len(order), self.bs):
            yield [self.train_items[j] for j in order[i:i + self.bs]]

    def loss(self, model, batch):
        losses = [deepsc_study_loss(model, it, self.opts, self.class_weights, stage=self.stage,
                                    normal_index=self.normal_index)[0] for it in batch]
        return torch.stack(losses).mean()

    def evaluate(self, model) -> dict:
        m = evaluate_items(model, self.val_items, self.cfg.class_names, self.opts, self.class_weights,
                           self.normal_index)
        m["stage"] = self.stage
        return m

    def monitor(self, metrics: dict) -> float:
        key = self.cfg.train.monitor
        v = metrics.get(key)
        if key == "val_auc" and v is None:
            v = metrics.get("val_acc")
        if v is None or not math.isfinite(float(v)):
            return -math.inf
        return -float(v) if key == "val_loss" else float(v)

    def on_improved(self, epoch, model, best, recalibrated) -> None:
        from ..models.checkpoint import save_checkpoint

        save_checkpoint(self.run.best, model, self.cfg.model.name, self.cfg.model.kwargs,
                        {**self.meta, "epoch": epoch, "stage": self.stage, "val": best})

    def log_epoch(self, epoch, epochs, rec, improved) -> None:
        log.info("stage %d epoch %d/%d: train_loss %.4f val_loss %s val_auc %s val_dice %s%s", self.stage, epoch + 1,
                 epochs, rec["train_loss"] if rec["train_loss"] is not None else float("nan"),
                 _f(rec.get("val_loss")), _f(rec.get("val_auc")), _f(rec.get("val_dice")),
                 " (best)" if improved else "")


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _linear_decay(opt: torch.optim.Optimizer, epochs: int):
    """Paper: learning rates "adjusted by linear decay"; here to lr / epochs in the last epoch of the stage."""
    n = max(1, int(epochs))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, 1.0 - e / n))


def load_cases(opts: DeepSCOptions, which: str) -> list:
    """``which`` = "train" (training phantoms + real studies) or "val" (the validation phantoms)."""
    from ..types import CLASS_NAMES
    from .volumes import phantom_volume_cohort, real_ctmd_volumes

    ph = opts.phantoms if which == "train" else opts.val_phantoms
    cases = []
    if ph:
        ph = dict(ph)
        cases += phantom_volume_cohort(int(ph.pop("n_per_class")), int(ph.pop("seed", 0)),
                                       labels=tuple(ph.pop("labels", CLASS_NAMES)), **ph)
    if which == "train" and opts.real_ctmd:
        cases += real_ctmd_volumes(tuple(opts.real_ctmd))
    return cases


def data_provenance(train_cases: list, val_cases: list, opts: DeepSCOptions) -> dict:
    """What the model card, checkpoint meta and bundle need: sources, counts per source and class, real studies."""
    from .run import is_synthetic_source
    from .volumes import dataset_of

    def counts(cases):
        out: dict[str, dict[str, int]] = {}
        for c in cases:
            out.setdefault(dataset_of(c), {}).setdefault(c.label, 0)
            out[dataset_of(c)][c.label] += 1
        return out

    sources = sorted({dataset_of(c) for c in train_cases + val_cases})
    synth = [s for s in sources if is_synthetic_source(s)]
    return {"kind": "volume_cases", "sources": sources, "synthetic_sources": synth, "synthetic": bool(synth),
            "training_data": "synthetic" if synth and len(synth) == len(sources) else ("mixed" if synth else "real"),
            "train_cases": len(train_cases), "val_cases": len(val_cases), "train_by_source": counts(train_cases),
            "val_by_source": counts(val_cases), "phantoms": opts.phantoms, "val_phantoms": opts.val_phantoms,
            "real_studies": list(opts.real_ctmd), "tables": []}


def write_volume_fingerprint(cases: list, out_dir: Path, model: dict) -> Path:
    """The training-data fingerprint (:mod:`pneumoct.fingerprint`) of the volume cases themselves."""
    from types import SimpleNamespace

    from ..fingerprint import dataset_fingerprint, hu_case_properties, write_fingerprint
    from .volumes import dataset_of

    recs = []
    for i, c in enumerate(cases):
        st = SimpleNamespace(hu=c.hu, spacing=c.spacing, metadata={**c.extra.get("metadata", {}),
                                                                   "synthetic": dataset_of(c) == "phantom"})
        recs.append(hu_case_properties(st, c.lung, dataset_of(c), seed=[0, i]))
    return write_fingerprint(dataset_fingerprint(recs, model=model), out_dir)


def model_card(cfg: TrainConfig, opts: DeepSCOptions, data: dict, metrics: dict, info: dict) -> str:
    best = metrics.get("best") or {}
    spec = opts.spec()
    lines = [f"# Model card: {cfg.name or cfg.model.name}", ""]
    if data["synthetic"] and data["training_data"] == "mixed":
        lines += [f"**Trained on synthetic phantoms plus {len(opts.real_ctmd)} real studies (slice labels only); the "
                  "validation figures below are on held-out synthetic phantoms only — not clinical accuracy.**", ""]
    elif data["synthetic"]:
        lines += [synthetic_banner(data["sources"]), ""]
    lines += [
        "Research use only. Not a medical device; nothing here has been validated on patients.", "",
        "## Model",
        f"- DeepSC-COVID (Wang et al., IEEE TMI 2022): `{cfg.model.name}`, kwargs `{cfg.model.kwargs}`, "
        f"{info.get('parameters')} parameters",
        f"- classes (`data.target: {cfg.data.target}`): {', '.join(cfg.class_names)}",
        f"- input chain: {json.dumps(spec.to_dict())} (pneumoct.preprocess.volume_deepsc)",
        f"- losses: Eq. (11) with lambda_seg {opts.lambda_seg}, lambda_cls {opts.lambda_cls}, lambda_ta "
        f"{opts.lambda_ta} ({'multi' if opts.multi_scale_ta else 'single'}-scale), Dice {opts.lambda_dice} + focal "
        f"{opts.lambda_focal} (alpha {opts.focal_alpha}, gamma {opts.focal_gamma}); weak slice loss weight "
        f"{opts.weak_slice_weight}",
        f"- schedule: {opts.pretrain_epochs} pre-training epochs (lr {opts.pretrain_lr}) + {opts.finetune_epochs} "
        f"joint fine-tuning epochs (lr {opts.finetune_lr}), {cfg.train.batch_size} studies per batch, seed "
        f"{cfg.train.seed}",
        "", "## Data",
        f"- training: {data['train_cases']} volumes: {json.dumps(data['train_by_source'])}",
        f"- phantoms (in-memory, pneumoct.synth): {json.dumps(opts.phantoms)}",
        f"- real studies: {', '.join('covid-ct-md/' + k for k in opts.real_ctmd) or 'none'} (radiologist slice "
        "labels as weak lesion supervision; no voxel masks)",
        f"- validation (model choice): {data['val_cases']} phantoms of other seeds: {json.dumps(opts.val_phantoms)}",
        "", "## Validation (best epoch; held-out phantoms, used to choose the epoch)",
        f"- stage {best.get('stage')}, epoch {best.get('epoch')}; monitor `{cfg.train.monitor}`",
        f"- accuracy {_f(best.get('val_acc'))}, AUC {_f(best.get('val_auc'))}, lesion Dice (model grid) "
        f"{_f(best.get('val_dice'))}, loss {_f(best.get('val_loss'))}",
        "", "## Intended use",
        "Research on joint 3D lesion segmentation and classification (comparison with the paper). Its output is a "
        "research panel in `diagnose --model deepsc`, never the headline.",
        "", "## Limitations",
        "- Validation figures are on synthetic phantoms: they are not clinical accuracy.",
        "- CPU-sized network and inputs, far below the paper's (Sec. V-A); 3 real studies at most.",
    ]
    return "\n".join(lines) + "\n"


def fit_deepsc(cfg: TrainConfig, out_dir, progress: bool = True, cases: tuple[list, list] | None = None) -> dict:
    """Train DeepSC-COVID (``cfg.task == "deepsc"``) into run folder ``out_dir``; returns the metrics dict.
    ``cases``: (training, validation) volume cases instead of the config's sources (tests)."""
    from ..models import build_model
    from ..models.checkpoint import load_checkpoint
    from ..models.losses import class_weights_from_labels
    from .loop import seed_everything, select_device

    if cfg.task != "deepsc":
        raise PneumoctInputError("bad_config", "fit_deepsc() trains the deepsc task")
    opts = DeepSCOptions.from_config(cfg.deepsc)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(int(t.threads))
    device = select_device(t.device)
    run = RunFolder(out_dir)
    run.open_log()
    try:
        seed_everything(t.seed)
        t0 = time.perf_counter()
        train_cases, val_cases = cases if cases is not None else (load_cases(opts, "train"), load_cases(opts, "val"))
        groups = {c.group for c in train_cases} & {c.group for c in val_cases}
        if groups:
            raise PneumoctInputError("bad_config", f"{len(groups)} case(s) in both training and validation")
        names = cfg.class_names
        spec = opts.spec()
        train_items = [it.to(device) for it in prepare_items(train_cases, names, spec)]
        val_items = [it.to(device) for it in prepare_items(val_cases, names, spec)]
        if not train_items:
            raise PneumoctInputError("bad_input", "no training volumes for the task's classes")
        data = data_provenance(train_cases, val_cases, opts)
        run.write_config(cfg)
        run.write_json("data_summary.json", data)
        log.info("data: %d training and %d validation volumes (%s), prepared in %.1f s", len(train_items),
                 len(val_items), ", ".join(data["sources"]), time.perf_counter() - t0)
        ys = [it.y for it in train_items]
        weights = class_weights_from_labels(ys, len(names)) if opts.class_weights else None
        normal = next((names.index(n) for n in NORMAL_CLASSES if n in names), None)
        meta = {"pneumoct_version": __version__, "family": "deepsc", "task": "deepsc", "classes": names,
                "target": cfg.data.target, "input_spec": spec.to_dict(), "normal_class": normal,
                "data": data, "config_name": cfg.name,
                "losses": {k: getattr(opts, k) for k in ("lambda_seg", "lambda_cls", "lambda_ta", "multi_scale_ta")}}
        model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
        plugin = _DeepSCPlugin(cfg, opts, run, meta, train_items, val_items, weights, normal)
        state = EpochState()
        e1, e2 = opts.pretrain_epochs, opts.finetune_epochs
        stages = [(1, e1, opts.pretrain_lr), (2, e2, opts.finetune_lr)]
        done = 0
        for stage, n_ep, lr in stages:
            if n_ep == 0:
                continue
            plugin.stage = stage
            model.cross.active = stage == 2 and model.cross.enabled  # stage 1: the subnets apart
            if stage == 2:  # the kept model is the best fine-tuned one
                state.best, state.bad_epochs, state.stopped = None, 0, False
            ts = dataclasses.replace(t, epochs=done + n_ep, lr=lr, bn_recalibrate="off")
            opt = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(float(b) for b in t.betas),
                                   weight_decay=t.weight_decay)
            state = run_epochs(model, plugin, opt, _linear_decay(opt, n_ep), ts, run, device, start_epoch=done,
                               state=state, progress=progress, desc=f"stage {stage}")
            done += n_ep
        best_model, info = load_checkpoint(run.best, expected_name=cfg.model.name)
        metrics = {"status": "done", "history": state.history, "best": state.best, "early_stopped": state.stopped,
                   "monitor": t.monitor, "seconds": round(time.perf_counter() - t0, 1)}
        run.write_json("metrics.json", metrics)
        run.write_model_card(model_card(cfg, opts, data, metrics, info))
        try:
            write_volume_fingerprint(train_cases, run.best, {"config_name": cfg.name, "model_name": cfg.model.name,
                                                             "task": "deepsc"})
        except Exception as exc:  # noqa: BLE001 - a missing fingerprint must not lose the trained model
            log.warning("training-data fingerprint not written: %s", exc)
        run.mark_done()
        log.info("done in %.0f s: best stage %s epoch %s", metrics["seconds"], (state.best or {}).get("stage"),
                 (state.best or {}).get("epoch"))
        return metrics
    finally:
        run.close_log()
