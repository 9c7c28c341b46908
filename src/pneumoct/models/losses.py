"""Class-balanced focal loss of Hu et al. (2020), "Weakly Supervised Deep Learning for COVID-19 Infection
Detection and Classification from CT Images", Eq. (1).

    L = -1/N * sum_i  w_{c_i} * (1 - P_{c_i}(x_i))^gamma * ( S_{c_i}(x_i) - log sum_k exp S_k(x_i) )

with ``S`` the (B, K) score vector (logits), ``c_i`` the true class, ``P_c`` its softmax posterior,
``w_c = 1/freq(c)`` (inverse class frequency) and the focal modulator ``f_i = (1 - P_c)^gamma`` (Lin et al. 2017).
The paper sets gamma = 1.

Weight normalisation (our choice, the paper only says ``w = 1/freq``): the raw inverse frequencies are rescaled
so that the *expected* weight over the training distribution is 1, i.e. ``sum_c freq_c * w_c = 1`` with
``freq`` as proportions, giving ``w_c = 1 / (K' * freq_c)`` where K' is the number of classes present. This keeps
the loss on the same scale as plain cross-entropy (uniform frequencies give w = 1, so gamma = 0 reproduces
``F.cross_entropy`` exactly). The reduction is the paper's plain ``1/N`` mean (not a weight-normalised mean).

DeepSC-COVID losses (Wang et al., IEEE TMI 2022, Sec. IV-E), on probabilities / logits of the 3D lesion subnet:
Dice (Eq. 6) + focal (Eq. 7) = segmentation loss (Eq. 8); inverse-frequency weighted cross-entropy (Eq. 9) is
:class:`ClassBalancedFocalLoss` with ``gamma=0`` (the same normalised inverse frequencies); task-aware loss
(Eq. 10); total (Eq. 11). Plus the weak slice-level loss we use where only radiologist slice labels exist.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassBalancedFocalLoss", "class_weights_from_labels", "inverse_frequency_weights", "dice_loss",
           "binary_focal_loss", "deepsc_segmentation_loss", "task_aware_loss", "normalise_evidence",
           "slice_max_loss", "deepsc_total_loss"]


def inverse_frequency_weights(class_frequencies: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Counts or proportions (K,) -> weights (K,) with ``w_c ∝ 1/freq_c`` and ``sum_c p_c w_c = 1``.

    Classes with frequency 0 (absent from the training labels) get the largest weight among the present
    classes (they are treated as the rarest); they never contribute to the normalisation.
    """
    freq = torch.as_tensor(class_frequencies, dtype=torch.float64).flatten()
    if freq.numel() == 0 or bool((freq < 0).any()):
        raise ValueError("class_frequencies must be a non-empty sequence of non-negative numbers")
    present = freq > 0
    if not bool(present.any()):
        raise ValueError("at least one class must have a positive frequency")
    p = freq / freq[present].sum()
    w = torch.zeros_like(p)
    w[present] = 1.0 / (int(present.sum()) * p[present])  # Hu et al. Eq. (1): w = 1/freq(c), normalised
    if not bool(present.all()):
        w[~present] = w[present].max()
    return w.to(torch.float32)


def class_weights_from_labels(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (N,) in [0, num_classes) -> inverse-frequency weights (num_classes,) (see module doc)."""
    lab = torch.as_tensor(labels).long().flatten()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = torch.bincount(lab, minlength=num_classes)
    return inverse_frequency_weights(counts)


class ClassBalancedFocalLoss(nn.Module):
    """Hu et al. Eq. (1): class-balanced (inverse-frequency) cross-entropy with focal modulator ``(1-P_c)^gamma``.

    Args:
        class_frequencies: per-class counts or proportions (K,); turned into weights by
            :func:`inverse_frequency_weights`. Mutually exclusive with ``weights``.
        weights: per-class weights (K,) used as given.
        gamma: focal exponent (>= 0; the paper uses 1). ``gamma=0`` gives weighted cross-entropy.
        reduction: ``"mean"`` (paper: 1/N sum), ``"sum"`` or ``"none"`` (per-sample (B,)).

    Input: ``logits`` (B, K) for K >= 2 classes, or (B,) / (B, 1) single binary logits (treated as the
    two-class scores ``[0, s]``, i.e. sigmoid); ``target`` (B,) integer class indices (0/1 floats allowed
    for the binary case). With no weights given all classes weigh 1.
    """

    def __init__(self, class_frequencies: Sequence[float] | torch.Tensor | None = None,
                 weights: Sequence[float] | torch.Tensor | None = None, gamma: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if class_frequencies is not None and weights is not None:
            raise ValueError("give class_frequencies or weights, not both")
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"unknown reduction {reduction!r}")
        if class_frequencies is not None:
            w = inverse_frequency_weights(class_frequencies)
        elif weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if bool((w < 0).any()):
                raise ValueError("weights must be non-negative")
        else:
            w = None
        self.register_buffer("weight", w)
        self.gamma = float(gamma)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            s = logits.reshape(-1, 1)
            logits = torch.cat([torch.zeros_like(s), s], dim=1)
        if logits.dim() != 2:
            raise ValueError(f"logits must be (B, K), (B, 1) or (B,), got {tuple(logits.shape)}")
        target = target.reshape(-1).long()
        if target.shape[0] != logits.shape[0]:
            raise ValueError("logits and target disagree on batch size")
        k = logits.shape[1]
        if self.weight is not None and self.weight.numel() != k:
            raise ValueError(f"{self.weight.numel()} class weights for {k} classes")
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pc = log_p.gather(1, target[:, None]).squeeze(1)  # S_c - log sum_k exp S_k
        loss = -log_pc
        if self.gamma != 0.0:
            f = (1.0 - log_pc.exp()).clamp_min(0.0) ** self.gamma  # f_i = (1 - P_c)^gamma
            loss = f * loss
        if self.weight is not None:
            loss = self.weight.to(loss.device, loss.dtype)[target] * loss  # w_i = 1/freq(c)
        if self.reduction == "mean":
            return loss.mean()  # Hu et al. Eq. (1): 1/N sum_i
        if self.reduction == "sum":
            return loss.sum()
        return loss


# ------------------------------------------------------------------------------------------ DeepSC-COVID (TMI 2022)
def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DeepSC-COVID Eq. (6): 1 - 2 ||S^ o S||_1 / (||S^||_1 + ||S||_1) over all voxels of the batch. ``prob`` and
    ``target`` in [0, 1], same shape. Both empty -> 0 (``eps`` keeps it defined)."""
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75,
                      gamma: float = 2.0) -> torch.Tensor:
    """DeepSC-COVID Eq. (7), mean over voxels: -alpha (1 - S^)^gamma S log S^ - (1 - alpha) S^^gamma (1 - S)
    log(1 - S^), with S^ = sigmoid(logits) (log-sigmoid for stability). ``alpha`` weighs the (rare) lesion voxels;
    the paper's values are in its supplementary material (ours: alpha 0.75, gamma 2)."""
    p = torch.sigmoid(logits)
    pos = -alpha * (1.0 - p) ** gamma * target * F.logsigmoid(logits)
    neg = -(1.0 - alpha) * p ** gamma * (1.0 - target) * F.logsigmoid(-logits)
    return (pos + neg).mean()


def deepsc_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *, lambda_dice: float = 1.0,
                             lambda_focal: float = 1.0, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """DeepSC-COVID Eq. (8): lambda_dice Dice(sigmoid(logits), S) + lambda_focal Focal(logits, S)."""
    return (lambda_dice * dice_loss(torch.sigmoid(logits), target)
            + lambda_focal * binary_focal_loss(logits, target, alpha, gamma))


def normalise_evidence(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """An evidence mask of Eq. (5) (B, 1, d, h, w), signed, to [0, 1]: ReLU, then divided by its maximum per
    sample (as CAMs are displayed). Our choice: Eq. (10) compares it with a probability map, so both must share a
    scale; the paper does not say how."""
    r = F.relu(v)
    return r / (r.flatten(1).amax(dim=1).view(-1, *([1] * (r.dim() - 1))) + eps)


def task_aware_loss(seg_probs: list[torch.Tensor], evidence: list[torch.Tensor], eta: list[float]) -> torch.Tensor:
    """DeepSC-COVID Eq. (10): sum_i eta_i ||S^_i - V_i||_2^2, each term the mean squared difference over voxels
    (the paper's squared norm divided by the voxel count, so scales of different size weigh by eta alone).
    ``seg_probs[i]`` and ``evidence[i]`` must have the same shape (the CROP of Eq. (5) is done by the caller)."""
    if not (len(seg_probs) == len(evidence) == len(eta)):
        raise ValueError("task-aware loss: as many segmentations, evidence masks and weights")
    total = seg_probs[0].new_zeros(())
    for s, v, e in zip(seg_probs, evidence, eta):
        if s.shape != v.shape:
            raise ValueError(f"task-aware loss: shapes {tuple(s.shape)} and {tuple(v.shape)} differ")
        total = total + float(e) * ((s - v) ** 2).mean()
    return total


def slice_max_loss(prob: torch.Tensor, slice_labels: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Weak supervision where only slice labels exist (ours, not in the paper): binary cross-entropy between the
    maximum of the predicted lesion probability over each slice (inside ``region``, e.g. the lung) and the
    radiologist's slice label. prob (Z, H, W), slice_labels (Z,) 0/1, region (Z, H, W) bool or None."""
    p = prob if region is None else prob * region
    m = p.flatten(1).amax(dim=1).clamp(1e-6, 1.0 - 1e-6)
    return F.binary_cross_entropy(m, slice_labels.to(m.dtype))


def deepsc_total_loss(l_seg: torch.Tensor, l_cls: torch.Tensor, l_ta: torch.Tensor, *, lambda_seg: float = 1.0,
                      lambda_cls: float = 1.0, lambda_ta: float = 10.0) -> torch.Tensor:
    """DeepSC-COVID Eq. (11): lambda_seg L_seg + lambda_cls L_cls + lambda_ta L_ta (paper's best lambda_ta: 10)."""
    return lambda_seg * l_seg + lambda_cls * l_cls + lambda_ta * l_ta
