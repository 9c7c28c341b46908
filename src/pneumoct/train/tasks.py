"""One adapter per model family: how to compute the training loss of a batch and how to predict.

``batch`` is a dict as :class:`pneumoct.train.torchdata.SliceDataset` yields (collated): ``image (B, C, S, S)``,
``class_label (B,)`` (the training target), ``lesion_label (B,)`` (-1 unknown), ``mask (B, S, S)``,
``has_mask (B,)``.

* ``multiscale_cam`` — Hu et al. Eq. (1): class-balanced (1/freq from the *training* labels) focal loss, gamma 1.
* ``m3lung_slice`` — M3Lung-Sys Sec. IV-A: cross-entropy on the class head + cross-entropy on the lesion head
  (lesion target = ``lesion_label`` where known, else ``class != 0``).
* ``jcs`` — JCS Sec. IV: image mixing (Beta(0.5, 0.5)) + cross-entropy, plus ``lseg_weight`` x L_seg (Eq. (4)) of
  the COVID-channel Grad-CAM against the lesion mask for the samples that have one.

``predict(model, images)`` -> ``{"probs" (B, K), "lesion_prob" (B,) or None, "features" (B, D) or None}``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Task", "MultiScaleCAMTask", "M3LungSliceTask", "JCSTask", "make_task"]


class Task:
    family = ""

    def loss(self, model: torch.nn.Module, batch: dict, *, train: bool = True) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def outputs(self, model: torch.nn.Module, images: torch.Tensor) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, images: torch.Tensor) -> dict:
        return self.outputs(model, images)

    def eval_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Validation loss (no mixing) and the predictions of the same forward pass."""
        raise NotImplementedError


class MultiScaleCAMTask(Task):
    family = "multiscale_cam"

    def __init__(self, num_classes: int, train_labels: Any = None, gamma: float = 1.0, class_weights: bool = True):
        from ..models.losses import ClassBalancedFocalLoss, class_weights_from_labels

        w = None
        if class_weights and train_labels is not None and len(train_labels):
            w = class_weights_from_labels(torch.as_tensor(np.asarray(train_labels)), num_classes)
        self.criterion = ClassBalancedFocalLoss(weights=w, gamma=gamma)

    def _pred(self, out: dict) -> dict:
        return {"probs": out["logits"].softmax(1), "lesion_prob": None, "features": None}

    def outputs(self, model, images):
        return self._pred(model(images))

    def loss(self, model, batch, *, train=True):
        out = model(batch["image"])
        loss = self.criterion(out["logits"], batch["class_label"])
        return loss, {"loss": float(loss.detach())}

    def eval_loss(self, model, batch):
        out = model(batch["image"])
        return self.criterion(out["logits"], batch["class_label"]), self._pred(out)


class M3LungSliceTask(Task):
    family = "m3lung_slice"

    def __init__(self, lesion_weight: float = 1.0):
        self.lesion_weight = float(lesion_weight)

    @staticmethod
    def _lesion_target(batch: dict) -> torch.Tensor:
        les = batch.get("lesion_label")
        fallback = (batch["class_label"] != 0).long()
        if les is None:
            return fallback
        return torch.where(les >= 0, les, fallback)

    def _pred(self, out: dict) -> dict:
        les = out.get("lesion_logits")
        return {"probs": out["class_logits"].softmax(1),
                "lesion_prob": les.softmax(1)[:, 1] if les is not None else None,
                "features": out["features"]}

    def outputs(self, model, images):
        return self._pred(model(images))

    def _loss(self, out, batch):
        from ..models.m3lung import slice_loss

        return slice_loss(out, batch["class_label"], self._lesion_target(batch), lesion_weight=self.lesion_weight)

    def loss(self, model, batch, *, train=True):
        loss = self._loss(model(batch["image"]), batch)
        return loss, {"loss": float(loss.detach())}

    def eval_loss(self, model, batch):
        out = model(batch["image"])
        return self._loss(out, batch), self._pred(out)


class JCSTask(Task):
    family = "jcs"

    def __init__(self, num_classes: int = 2, mixup_alpha: float = 0.5, lseg_weight: float = 0.0, seed: int = 0):
        self.num_classes = int(num_classes)
        self.alpha = float(mixup_alpha)
        self.lseg_weight = float(lseg_weight)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed_seq: Any) -> None:
        self.rng = np.random.default_rng(seed_seq)

    def _pred(self, logits: torch.Tensor, feats: torch.Tensor | None) -> dict:
        return {"probs": logits.softmax(1), "lesion_prob": None,
                "features": feats.mean((2, 3)) if feats is not None else None}

    def outputs(self, model, images):
        out = model(images)
        return self._pred(out["logits"], out["features"])

    def loss(self, model, batch, *, train=True):
        from ..models.jcs import COVID_CLASS, jcs_classification_loss, mixup

        x, y = batch["image"], batch["class_label"]
        mask, has_mask = batch.get("mask"), batch.get("has_mask")
        target: torch.Tensor = y
        if train and self.alpha > 0 and x.shape[0] >= 2:
            x, target, lam, idx = mixup(x, y, alpha=self.alpha, rng=self.rng, num_classes=self.num_classes)
            if mask is not None:
                mask = lam * mask + (1.0 - lam) * mask[idx]
                has_mask = has_mask & has_mask[idx]
        use_seg = (self.lseg_weight > 0 and mask is not None and has_mask is not None and bool(has_mask.any()))
        if use_seg:
            am, logits = model.activation_map(x, class_idx=COVID_CLASS, create_graph=True, return_logits=True)
            loss, parts = jcs_classification_loss(logits, target, am, mask, lambda_seg=self.lseg_weight,
                                                  has_mask=has_mask, return_parts=True)
        else:
            logits = model(x)["logits"]
            loss, parts = jcs_classification_loss(logits, target, return_parts=True)
        return loss, {"loss": float(loss.detach()), "ce": float(parts["ce"]), "seg": float(parts["seg"])}

    def eval_loss(self, model, batch):
        out = model(batch["image"])
        return F.cross_entropy(out["logits"], batch["class_label"]), self._pred(out["logits"], out["features"])


def make_task(cfg: Any, train_labels: Any = None) -> Task:
    """The adapter for ``cfg.family`` (a :class:`pneumoct.train.config.TrainConfig`)."""
    fam = cfg.family
    if fam == "multiscale_cam":
        return MultiScaleCAMTask(cfg.num_classes, train_labels, gamma=cfg.loss.focal_gamma,
                                 class_weights=cfg.loss.class_weights)
    if fam == "m3lung_slice":
        return M3LungSliceTask(cfg.loss.lesion_weight)
    if fam == "jcs":
        return JCSTask(cfg.num_classes, cfg.loss.mixup_alpha, cfg.loss.lseg_weight, seed=cfg.train.seed)
    raise ValueError(f"no slice task for family {fam!r}")


def task_for_family(family: str, num_classes: int = 2) -> Task:
    """A prediction-only adapter (losses at their defaults)."""
    if family == "multiscale_cam":
        return MultiScaleCAMTask(num_classes)
    if family == "m3lung_slice":
        return M3LungSliceTask()
    if family == "jcs":
        return JCSTask(num_classes)
    raise ValueError(f"no slice task for family {family!r}")
