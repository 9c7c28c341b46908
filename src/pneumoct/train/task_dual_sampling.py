"""Training task ``dual_sampling``: one network of the dual-sampling attention method (Ouyang et al. 2020) per run.

    metrics = fit_dual_sampling(load_config("configs/dual_sampling_cpu.yaml"), "runs/ds_us")

The variant is chosen in the config: ``dual.sampling`` uniform (US) or size_balanced (SS, Sec. III-C),
``dual.attention`` true (online attention + L_ex, Eq. 1-4) or false (the plain "RN34 + US" baseline). The
ensemble (Eq. 5) combines two finished runs (see :mod:`pneumoct.models.dual_sampling_system`).

Classes: the paper's COVID-19 (1) vs CAP (0). Our product's ``covid19`` and ``cap`` map to them one to one;
``healthy`` and ``other_viral`` cases are excluded, as the paper has no such class (a study of either gets a
COVID-19-vs-CAP score that means nothing, and the system says so).

Data: synthetic phantoms generated in memory (:func:`pneumoct.train.volumes.phantom_volume_cohort`), in one chunk
per ``dual.cohort.difficulties`` value so the infection ratios span the paper's groups. Their voxel lesion truth is
the infection mask M of Eq. 3 and gives the infection ratio that forms the size-balanced groups (the paper used
its VB-Net toolkit's segmentation for both). Split: patient level (each phantom is a patient), ``split.*``.

Real studies (``dual.real_ctmd``, e.g. ``[covid, cap]``): the covid-ct-md studies of the task's classes
(:func:`pneumoct.train.volumes.real_ctmd_volumes`; ``normal`` is refused when the config is checked) are added to
the TRAINING cases, never to validation (the epoch is still chosen on phantoms). They have radiologist slice and
lobe labels but no voxel masks, so Eq. 3's M (used on the COVID-19 study) and the infection ratio of the size
groups come from :func:`weak_infection_mask`: the threshold lesion finder's mask on the radiologist-positive slices
(lobe-negative lung sides emptied, :func:`pneumoct.train.pseudo.pseudo_masks_for_study`), or the lung voxels of
those slices when the finder marks nothing there. A weak target: it says where the radiologists saw infection,
roughly, not its outline.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import PneumoctInputError
from .config import DUAL_CLASSES, TrainConfig
from .epochs import TaskPlugin, run_epochs

__all__ = ["PreparedCase", "build_cohort", "prepare_cases", "DualSamplingPlugin", "train_network", "predict",
           "fit_dual_sampling", "prep_config", "cohort_fingerprint", "checkpoint_meta", "weak_infection_mask",
           "real_training_volumes", "split_cases"]

log = logging.getLogger("pneumoct.train")


@dataclass
class PreparedCase:
    """One volume on the network grid. x, mask: (Z, Y, X) float16 (input in [0, 1]; lesion fraction M).
    ``weak``: the mask (and ratio) is a weak one built from a real study's slice labels, not voxel truth."""

    case_id: str
    group: str
    source: str
    label: int  # 1 COVID-19, 0 CAP
    ratio: float  # infection volume / lung volume (voxel truth, or the weak mask's)
    x: np.ndarray
    mask: np.ndarray | None
    weak: bool = False


def prep_config(cfg: TrainConfig):
    from ..preprocess.volume_dual import DualPrepConfig

    d = cfg.dual
    return DualPrepConfig(size=tuple(int(v) for v in d.size), factor=float(d.factor), crop_to_lungs=d.crop_to_lungs)


def build_cohort(cohort: dict, labels: Sequence[str] = ("covid19", "cap")) -> list:
    """The synthetic cohort of ``dual.cohort``: one ``phantom_volume_cohort`` call per difficulty, seeds
    ``seed + 1000 * chunk`` (disjoint from another cohort whose seed differs by >= 10000)."""
    from .volumes import phantom_volume_cohort

    out = []
    diffs = list(cohort.get("difficulties", [0.0]))
    n = int(cohort.get("n_per_class", 8))
    per = [n // len(diffs) + (1 if i < n % len(diffs) else 0) for i in range(len(diffs))]
    for i, (d, k) in enumerate(zip(diffs, per)):
        if k:
            out += phantom_volume_cohort(k, seed=int(cohort.get("seed", 0)) + 1000 * i, labels=tuple(labels),
                                         matrix=int(cohort.get("matrix", 128)),
                                         n_slices=int(cohort.get("n_slices", 48)), difficulty=float(d))
    return out


def weak_infection_mask(lung: np.ndarray, slice_labels: np.ndarray, thr_mask: np.ndarray,
                        lobe_labels: np.ndarray | None = None, min_pixels: int = 20) -> tuple[np.ndarray, str]:
    """The weak infection mask of a real study without voxel truth (the M of Eq. 3 and its infection ratio).

    lung: (Z, Y, X) labels (1 right, 2 left); slice_labels: (Z,) radiologist labels (True = infection in the slice);
    thr_mask: (Z, Y, X) the threshold lesion finder's mask; lobe_labels: (Z, 5) LLL, LUL, RLL, RML, RUL or None.
    Rule: the threshold mask on the radiologist-positive slices, inside the lungs, with a lung side emptied where
    all its lobes are labelled negative (:func:`pneumoct.train.pseudo.pseudo_masks_for_study`, no agreement model;
    slices with fewer than ``min_pixels`` voxels dropped). If nothing is left, the lung voxels of the positive
    slices (restricted to the lobe-positive sides the same way). Returns ``(mask uint8 0/1, method)``; an all-zero
    mask (method "none") when no slice is positive."""
    from ..types import LUNG_LEFT, LUNG_RIGHT
    from .pseudo import LOBES_LEFT, LOBES_RIGHT, pseudo_masks_for_study

    lung = np.asarray(lung)
    sl = np.asarray(slice_labels).astype(bool)
    if sl.shape != (lung.shape[0],) or np.shape(thr_mask) != lung.shape:
        raise PneumoctInputError("bad_input", f"slice labels {sl.shape} / threshold mask {np.shape(thr_mask)} do "
                                 f"not fit the lungs {lung.shape}")
    out = np.zeros(lung.shape, np.uint8)
    if not sl.any():
        return out, "none"
    for z, m in pseudo_masks_for_study(np.asarray(thr_mask), lung, sl, lobe_labels, None, min_pixels).items():
        out[z] = m > 0
    if out.any():
        return out, "threshold-baseline mask on radiologist-positive slices (lobe-negative sides emptied)"
    for z in np.flatnonzero(sl):
        keep = lung[z] > 0
        lob = None if lobe_labels is None else np.asarray(lobe_labels[z]).astype(bool)
        if lob is not None and lob.any():
            if not lob[list(LOBES_LEFT)].any():
                keep &= lung[z] != LUNG_LEFT
            if not lob[list(LOBES_RIGHT)].any():
                keep &= lung[z] != LUNG_RIGHT
        out[z] = keep
    return out, "fallback: lung voxels of radiologist-positive slices (threshold finder found nothing there)"


def real_training_volumes(keys: Sequence[str], root: Any = None) -> list:
    """The covid-ct-md studies ``keys`` (COVID-19 / CAP only) as :class:`~pneumoct.train.volumes.VolumeCase` with
    their weak infection mask in ``extra["weak_lesion"]`` (method in ``extra["weak_lesion_method"]``)."""
    from ..quantify.threshold_baseline import find_lesions_threshold
    from .volumes import real_ctmd_volumes

    out = []
    for c in real_ctmd_volumes(tuple(keys), root):
        if c.label not in DUAL_CLASSES:
            raise PneumoctInputError("bad_config", f"{c.case_id} is {c.label}: outside the dual-sampling task "
                                     "(COVID-19 vs CAP)")
        thr = find_lesions_threshold(c.hu, c.lung, c.spacing).mask  # as diagnose calls it
        m, method = weak_infection_mask(c.lung, c.slice_labels, thr, c.extra.get("lobe_labels"))
        c.extra["weak_lesion"], c.extra["weak_lesion_method"] = m, method
        lung = int(np.count_nonzero(c.lung))
        c.extra["weak_ratio"] = float(np.count_nonzero(m & (c.lung > 0))) / lung if lung else 0.0
        log.info("%s: weak infection mask %s, ratio %.4f", c.case_id, method, c.extra["weak_ratio"])
        out.append(c)
    return out


def prepare_cases(cases: Sequence, prep) -> list[PreparedCase]:
    """VolumeCase list -> network-grid arrays (float16 to halve the in-memory cohort). A case without voxel truth
    but with ``extra["weak_lesion"]`` (:func:`real_training_volumes`) gets that mask and its ratio, marked weak."""
    from ..preprocess.volume_dual import prepare_volume

    out = []
    for c in cases:
        if c.label not in DUAL_CLASSES:
            continue  # healthy / other_viral: no class of the paper
        weak = c.lesion is None and c.extra.get("weak_lesion") is not None
        lesion = c.extra["weak_lesion"] if weak else c.lesion
        x, m, _ = prepare_volume(c.hu, c.spacing, c.lung, prep, lesion=lesion)
        ratio = c.extra.get("weak_ratio", 0.0) if weak else c.infection_ratio
        out.append(PreparedCase(c.case_id, c.group, c.source, int(c.label == "covid19"), float(ratio or 0.0),
                                x.astype(np.float16), None if m is None else m.astype(np.float16), weak=weak))
    return out


def split_cases(cases: Sequence[PreparedCase], cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level split (``split.*``) of the cases with voxel truth; weak (real) cases all go to training, so
    the epoch is chosen on phantoms and a real study is never spent on validation."""
    from .sampling import patient_split

    strong = np.array([i for i, c in enumerate(cases) if not c.weak], int)
    weak = np.array([i for i, c in enumerate(cases) if c.weak], int)
    tr, va = patient_split([cases[i].group for i in strong], [cases[i].label for i in strong],
                           cfg.split.val_fraction, cfg.split.seed)
    return np.concatenate([strong[tr], weak]).astype(int), strong[va]


def _stack(cases: Sequence[PreparedCase], idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([cases[i].x for i in idx]).astype(np.float32))[:, None]
    m = torch.from_numpy(np.stack([cases[i].mask if cases[i].mask is not None else np.zeros_like(cases[i].x)
                                   for i in idx]).astype(np.float32))[:, None]
    y = torch.tensor([cases[i].label for i in idx], dtype=torch.long)
    return x, m, y


@torch.no_grad()
def predict(model: torch.nn.Module, cases: Sequence[PreparedCase], idx=None, batch_size: int = 4) -> np.ndarray:
    """P(COVID-19) per case (model in eval mode)."""
    model.eval()
    idx = np.arange(len(cases)) if idx is None else np.asarray(idx)
    out = []
    for s in range(0, len(idx), batch_size):
        x, _, _ = _stack(cases, idx[s: s + batch_size])
        out.append(torch.sigmoid(model(x)["logit"]).numpy())
    return np.concatenate(out) if out else np.zeros(0)


class DualSamplingPlugin(TaskPlugin):
    """One dual-sampling network for :func:`run_epochs`: US (a seeded permutation of the training cases per
    epoch) or SS (as many size-balanced draws), loss Eq. 4, validation BCE / accuracy / AUC."""

    def __init__(self, cases: Sequence[PreparedCase], train_idx, val_idx, cfg: TrainConfig, on_improved=None):
        from .sampling import size_balanced_groups

        self.cases, self.train_idx, self.val_idx = cases, np.asarray(train_idx), np.asarray(val_idx)
        self.cfg, self.t, self._on_improved = cfg, cfg.train, on_improved
        y = np.array([cases[i].label for i in self.train_idx], bool)
        r = np.array([cases[i].ratio for i in self.train_idx])
        self.groups = size_balanced_groups(y, r)

    def n_batches(self, epoch: int) -> int:
        n = math.ceil(len(self.train_idx) / self.t.batch_size)
        return min(n, int(self.t.max_batches_per_epoch)) if self.t.max_batches_per_epoch else n

    def batches(self, epoch: int, seed: int):
        from .sampling import size_balanced_order, uniform_order

        if self.cfg.dual.sampling == "size_balanced":
            order = self.train_idx[size_balanced_order(self.groups, len(self.train_idx), seed)]
        else:
            order = self.train_idx[uniform_order(len(self.train_idx), seed)]
        bs = self.t.batch_size
        for s in range(0, len(order), bs):
            yield _stack(self.cases, order[s: s + bs])

    def loss(self, model, batch):
        from ..models.dual_sampling import total_loss

        x, m, y = batch
        loss, _ = total_loss(model(x), y, m if self.cfg.dual.attention else None, self.cfg.dual.lambda_ex)
        return loss

    def evaluate(self, model) -> dict:
        from ..evaluate.classification import roc_auc

        if not len(self.val_idx):
            return {"val_loss": None, "val_acc": None, "val_auc": None, "val_n": 0}
        p = predict(model, self.cases, self.val_idx, self.t.batch_size)
        y = np.array([self.cases[i].label for i in self.val_idx])
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        bce = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
        return {"val_loss": bce, "val_acc": float(np.mean((p >= 0.5) == y)), "val_auc": roc_auc(y, p),
                "val_n": int(len(y))}

    def monitor(self, metrics: dict) -> float:
        from .loop import monitor_value

        v = monitor_value(metrics, self.t.monitor)
        if self.t.monitor != "val_loss" and metrics.get("val_loss") is not None:
            # a small synthetic validation set often saturates AUC/accuracy: ties go to the lower validation BCE
            v -= 1e-3 * min(float(metrics["val_loss"]), 100.0)
        return v

    def on_improved(self, epoch, model, best, recalibrated) -> None:
        if self._on_improved is not None:
            self._on_improved(epoch, model, best)

    def log_epoch(self, epoch, epochs, rec, improved) -> None:
        log.info("dual-sampling epoch %d/%d: train_loss %.4f val_auc %s val_acc %s (%.0f s)%s", epoch + 1, epochs,
                 rec["train_loss"] or float("nan"), rec["val_auc"], rec["val_acc"], rec["seconds"],
                 " (best)" if improved else "")


def train_network(cfg: TrainConfig, cases: Sequence[PreparedCase], train_idx, val_idx, *, on_improved=None,
                  run: Any = None, progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build ``cfg.model`` and train it on ``cases[train_idx]`` (seeded by ``train.seed``). Returns
    ``(model with the best validation weights, {"history", "best", "early_stopped"})``."""
    import copy

    from ..models import build_model
    from .loop import build_optimizer, build_scheduler, seed_everything

    t = cfg.train
    if t.threads:
        torch.set_num_threads(int(t.threads))
    seed_everything(t.seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t)
    keep: dict = {}

    def improved(epoch, m, best):
        keep["state"] = copy.deepcopy(m.state_dict())
        if on_improved is not None:
            on_improved(epoch, m, best)

    plugin = DualSamplingPlugin(cases, train_idx, val_idx, cfg, improved)
    t_eff = copy.copy(t)
    t_eff.bn_recalibrate = "off"  # the 3D volumes are not a (image, label) dataset the recalibration can read
    st = run_epochs(model, plugin, opt, sched, t_eff, run, torch.device("cpu"), progress=progress,
                    desc="dual-sampling epoch")
    if "state" in keep:
        model.load_state_dict(keep["state"])
    model.eval()
    return model, {"history": st.history, "best": st.best, "early_stopped": st.stopped}


def checkpoint_meta(cfg: TrainConfig, cases: Sequence[PreparedCase], train_idx, val_idx, extra: dict) -> dict:
    from .._version import __version__

    tr = [cases[i] for i in train_idx]
    real = [c for c in tr if c.weak]
    sources = ["synthetic phantoms (pneumoct.synth), generated in memory"] + [
        f"{c.source}: radiologist slice/lobe labels, weak infection mask" for c in real]
    return {"pneumoct_version": __version__, "family": "dual_sampling", "task": "dual_sampling",
            "classes": list(DUAL_CLASSES), "positive_class": "covid19",
            "sampling": cfg.dual.sampling, "attention": cfg.dual.attention, "lambda_ex": cfg.dual.lambda_ex,
            "prep": {"size": list(cfg.dual.size), "factor": cfg.dual.factor, "crop_to_lungs": cfg.dual.crop_to_lungs},
            "data": {"sources": sources, "synthetic": True,
                     "training_data": "real+synthetic" if real else "synthetic",
                     "real_studies": [c.case_id for c in real],
                     "real_weak_ratios": {c.case_id: round(c.ratio, 5) for c in real},
                     "cohort": dict(cfg.dual.cohort), "train_cases": len(tr), "val_cases": len(val_idx),
                     "train_covid19": sum(c.label for c in tr), "train_cap": sum(1 - c.label for c in tr)},
            "config_name": cfg.name, **extra}


def _card(cfg: TrainConfig, meta: dict, metrics: dict) -> str:
    best = metrics.get("best") or {}
    d = meta["data"]
    variant = ("Attention RN34" if cfg.dual.attention else "RN34") + (" + SS" if cfg.dual.sampling ==
                                                                      "size_balanced" else " + US")
    real = d.get("real_studies") or []
    banner = ("**Trained on synthetic phantoms — not clinical accuracy.**" if not real else
              f"**Trained on synthetic phantoms plus {len(real)} real stud{'y' if len(real) == 1 else 'ies'} "
              f"({', '.join(real)}; weak infection masks from slice labels); validated on phantoms only — not "
              "clinical accuracy.**")
    return "\n".join([
        f"# Model card: {cfg.name or cfg.model.name} ({variant})", "",
        banner, "",
        "Research use only. Not a medical device.", "",
        "## Model",
        f"- dual-sampling attention network (Ouyang et al. 2020), `{cfg.model.name}` kwargs `{cfg.model.kwargs}`",
        f"- classes: COVID-19 (1) vs CAP (0), one logit; sampling `{cfg.dual.sampling}`, attention "
        f"`{cfg.dual.attention}` (lambda {cfg.dual.lambda_ex})",
        f"- input grid {list(cfg.dual.size)}, shrink factor >= {cfg.dual.factor}, lung crop {cfg.dual.crop_to_lungs}",
        "", "## Data",
        f"- synthetic phantoms generated in memory, cohort {d['cohort']}",
        f"- real studies (training only): {', '.join(real) or 'none'}"
        + (f"; weak infection masks (threshold finder on radiologist-positive slices, lobe-negative sides emptied; "
           f"ratios {d.get('real_weak_ratios')})" if real else ""),
        f"- train {d['train_cases']} ({d['train_covid19']} COVID-19 / {d['train_cap']} CAP), validation "
        f"{d['val_cases']} (patient-level split, seed {cfg.split.seed})",
        "", "## Validation (best epoch, held-out phantoms of the same generator)",
        f"- epoch {best.get('epoch')}: AUC {best.get('val_auc')}, accuracy {best.get('val_acc')}, "
        f"BCE {best.get('val_loss')}",
        "", "## Limitations",
        "- Phantoms are far simpler than real CT; nothing here measures accuracy on patients.",
        "- Two classes only: healthy or other viral pneumonia studies get a meaningless COVID-19-vs-CAP score.", ""])


def cohort_fingerprint(volumes: Sequence, name: str) -> dict:
    """The training-data fingerprint (:mod:`pneumoct.fingerprint`) of an in-memory phantom cohort."""
    from types import SimpleNamespace

    from ..fingerprint import dataset_fingerprint, hu_case_properties

    from .volumes import dataset_of

    recs, real = [], []
    for i, v in enumerate(volumes):
        syn = dataset_of(v) == "phantom"
        if not syn:
            real.append(v.case_id)
        recs.append(hu_case_properties(SimpleNamespace(hu=v.hu, spacing=v.spacing, metadata={
            **v.extra.get("metadata", {}), "synthetic": syn}), v.lung, dataset_of(v), synthetic=syn, seed=i))
    return dataset_fingerprint(recs, model={
        "key": "dual_sampling", "config_name": name,
        "trained_on": "synthetic phantoms only (pneumoct.synth)" if not real else
        f"synthetic phantoms (pneumoct.synth) + real {', '.join(real)} (weak infection masks)",
        "data_kind": "real+synthetic" if real else "synthetic"})


def fit_dual_sampling(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True,
                      cases: Sequence[PreparedCase] | None = None) -> dict:
    """Train one dual-sampling network into run folder ``out_dir`` (config.yaml, train.log, metrics.json,
    best/ checkpoint, model_card.md, DONE). ``cases``: an already prepared cohort (else built from
    ``dual.cohort`` plus the real studies of ``dual.real_ctmd``). Cases marked ``weak`` (real studies) always go to
    training (:func:`split_cases`)."""
    from .checkpoint import save_checkpoint
    from .run import RunFolder

    if resume:
        raise PneumoctInputError("bad_argument", "--resume is not supported for the dual_sampling task; rerun it")
    run = RunFolder(out_dir, resume=False)
    run.open_log()
    try:
        fp = None
        if cases is None:
            log.info("generating the synthetic cohort %s", cfg.dual.cohort)
            volumes = build_cohort(cfg.dual.cohort)
            if cfg.dual.real_ctmd:
                log.info("adding the real covid-ct-md studies %s (training only)", list(cfg.dual.real_ctmd))
                volumes += real_training_volumes(cfg.dual.real_ctmd)
            fp = cohort_fingerprint(volumes, cfg.name or "dual_sampling")
            cases = prepare_cases(volumes, prep_config(cfg))
            del volumes
        if len(cases) < 4:
            raise PneumoctInputError("bad_input", "the dual_sampling task needs at least 4 COVID-19/CAP cases")
        tr, va = split_cases(cases, cfg)
        run.write_config(cfg)
        log.info("dual-sampling: %d train (%d real, weak masks) / %d val cases, sampling %s, attention %s", len(tr),
                 sum(cases[i].weak for i in tr), len(va), cfg.dual.sampling, cfg.dual.attention)

        def on_improved(epoch, m, best):
            save_checkpoint(run.best, m, cfg.model.name, cfg.model.kwargs,
                            checkpoint_meta(cfg, cases, tr, va, {"epoch": epoch, "val": best}))

        _, res = train_network(cfg, cases, tr, va, on_improved=on_improved, run=run, progress=progress)
        metrics = {"status": "done", **res, "monitor": cfg.train.monitor}
        run.write_json("metrics.json", metrics)
        run.write_model_card(_card(cfg, checkpoint_meta(cfg, cases, tr, va, {}), metrics))
        if fp is not None and run.best.is_dir():
            from ..fingerprint import write_fingerprint

            write_fingerprint(fp, run.best)
        run.mark_done()
        return metrics
    finally:
        run.close_log()
