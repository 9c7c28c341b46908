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
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassBalancedFocalLoss", "class_weights_from_labels", "inverse_frequency_weights"]


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
