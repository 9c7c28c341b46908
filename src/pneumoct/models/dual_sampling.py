"""Dual-sampling attention network (Ouyang et al., "Dual-Sampling Attention Network for Diagnosis of COVID-19
from Community Acquired Pneumonia", IEEE TMI 2020), Sec. III.

* :class:`DualSamplingNet`: 3D ResNet-34 (blocks 3-4-6-3) whose last stage has stride 1, so the features before
  global average pooling are at 1/16 of the input in every axis (Sec. III-A); one logit (COVID-19 vs CAP, BCE);
  the online attention module (Sec. III-B, Eq. 1-2) when ``attention=True``, else the plain "RN34" baseline.
* :func:`attention_loss` (Eq. 3), :func:`total_loss` (Eq. 4), :func:`ensemble_weight` / :func:`dual_sampling_ensemble`
  (Eq. 5).

``width`` is the first stage's channel count (paper 64; the CPU setting uses 8): every stage keeps ResNet's 1:2:4:8
ratio, so the architecture is the paper's at a width multiplier ``width / 64``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register

__all__ = ["DualSamplingNet", "attention_map", "attention_loss", "total_loss", "ensemble_weight",
           "dual_sampling_ensemble", "ALPHA", "BETA", "LAMBDA", "W_EXTREME", "W_MIDDLE"]

ALPHA, BETA = 100.0, 0.4   # Dual-sampling Eq. (2)
LAMBDA = 0.5               # Dual-sampling Eq. (4)
W_EXTREME, W_MIDDLE = 0.35, 0.96   # Dual-sampling Eq. (5): ratio < 0.001 or > 0.030 / the rest
RATIO_LOW, RATIO_HIGH = 0.001, 0.030


class BasicBlock3d(nn.Module):
    """3D ResNet basic block: two 3x3x3 convolutions, BatchNorm, identity (or 1x1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)), inplace=True)


def attention_map(f: torch.Tensor, w: torch.Tensor, size: tuple[int, int, int], alpha: float = ALPHA,
                  beta: float = BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Online attention (Sec. III-B). f: (B, C, z, y, x) features before GAP; w: (1, C) FC weights.

    Returns ``(A, T)``: A (B, 1, z, y, x) = ReLU(conv(f, w)) (Eq. 1, the FC weights as a 1x1x1 kernel, no bias as
    in CAM); T (B, 1, *size) = sigmoid(alpha (A_n - beta)) (Eq. 2) where A_n is A upsampled to the input size and
    min-max normalised to [0, 1] per case."""
    A = F.relu(F.conv3d(f, w.reshape(w.shape[0], w.shape[1], 1, 1, 1)))          # Dual-sampling Eq. (1)
    up = F.interpolate(A, size=size, mode="trilinear", align_corners=False)
    flat = up.flatten(1)
    lo = flat.min(1, keepdim=True)[0]
    hi = flat.max(1, keepdim=True)[0]
    # a case with A == 0 everywhere gets A_n = 0 (no attention), not 0/0
    norm = ((flat - lo) / (hi - lo).clamp_min(1e-6)).view_as(up)
    T = torch.sigmoid(alpha * (norm - beta))                                       # Dual-sampling Eq. (2)
    return A, T


class DualSamplingNet(nn.Module):
    """3D ResNet-34 with stride 1 in the last stage and an optional online attention module.

    Input x: (B, in_channels, Z, Y, X) (features at ceil(Z/16) etc.; exactly 1/16 for multiples of 16). Output dict:
      ``logit`` (B,) — COVID-19 (1) vs CAP (0), trained with BCE;
      ``features`` (B, 8w, Z/16, Y/16, X/16) — the last stage, stride 1 (Sec. III-A);
      ``cam`` (B, 1, Z/16, Y/16, X/16) — A of Eq. 1 (always computed: for the plain RN34 it is the offline CAM);
      ``attention`` (B, 1, Z, Y, X) — T(A) of Eq. 2 (only when ``attention`` or ``return_attention``).
    """

    def __init__(self, width: int = 64, in_channels: int = 1, blocks: tuple[int, ...] = (3, 4, 6, 3),
                 attention: bool = True, alpha: float = ALPHA, beta: float = BETA, num_classes: int = 1) -> None:
        super().__init__()
        if num_classes != 1:
            raise ValueError("the dual-sampling network has one logit (COVID-19 vs CAP, BCE); num_classes must be 1")
        self.attention, self.alpha, self.beta = bool(attention), float(alpha), float(beta)
        w = int(width)
        self.stem = nn.Sequential(nn.Conv3d(in_channels, w, 7, 2, 3, bias=False), nn.BatchNorm3d(w),
                                  nn.ReLU(inplace=True), nn.MaxPool3d(3, 2, 1))            # 1/4
        chans = [w, 2 * w, 4 * w, 8 * w]
        strides = [1, 2, 2, 1]  # Sec. III-A: stride 1 in the last stage -> 1/16 instead of 1/32
        layers, cin = [], w
        for cout, n, s in zip(chans, blocks, strides):
            layers.append(nn.Sequential(*[BasicBlock3d(cin if i == 0 else cout, cout, s if i == 0 else 1)
                                          for i in range(n)]))
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(cin, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> dict:
        f = self.stem(x)
        for layer in self.layers:
            f = layer(f)
        logit = self.fc(f.mean(dim=(2, 3, 4))).squeeze(1)          # GAP -> FC
        # Sec. III-B: the 1x1x1 kernel is a copy of the FC weights, updated only through the BCE loss (detach)
        out = {"logit": logit, "features": f}
        if self.attention or return_attention:
            A, T = attention_map(f, self.fc.weight.detach(), tuple(x.shape[2:]), self.alpha, self.beta)
            out.update(cam=A, attention=T)
        else:
            out["cam"] = F.relu(F.conv3d(f, self.fc.weight.detach().reshape(1, -1, 1, 1, 1)))
        return out


def attention_loss(T: torch.Tensor, M: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3 per case: sum (T - M)^2 / (sum T + sum M). T, M: (B, 1, Z, Y, X) (or (B, Z, Y, X)). Returns (B,)."""
    T = T.flatten(1)
    M = M.flatten(1).to(T.dtype)
    return ((T - M) ** 2).sum(1) / (T.sum(1) + M.sum(1) + eps)                     # Dual-sampling Eq. (3)


def total_loss(out: dict, y: torch.Tensor, M: torch.Tensor | None, lam: float = LAMBDA) -> tuple[torch.Tensor, dict]:
    """Eq. 4: L = L_c (BCE) + lambda L_ex, L_ex over the COVID-19 cases (y == 1) only, averaged over them; CAP cases
    contribute L_c only. Returns ``(loss, parts)``."""
    lc = F.binary_cross_entropy_with_logits(out["logit"], y.float())
    lex = torch.zeros((), device=lc.device)
    pos = y > 0
    if out.get("attention") is not None and M is not None and bool(pos.any()):
        lex = attention_loss(out["attention"][pos], M[pos]).mean()
    return lc + lam * lex, {"l_c": float(lc.detach()), "l_ex": float(lex.detach())}   # Dual-sampling Eq. (4)


def ensemble_weight(ratio) -> np.ndarray:
    """Eq. 5's w from the infection ratio: 0.35 when < 0.001 or > 0.030 (the minority groups: more weight to the
    size-balanced network), 0.96 otherwise."""
    r = np.asarray(ratio, float)
    return np.where((r < RATIO_LOW) | (r > RATIO_HIGH), W_EXTREME, W_MIDDLE)


def dual_sampling_ensemble(p_us, p_ss, ratio) -> np.ndarray:
    """Eq. 5: P_final = w P_US + (1 - w) P_SS."""
    w = ensemble_weight(ratio)
    return w * np.asarray(p_us, float) + (1 - w) * np.asarray(p_ss, float)                # Dual-sampling Eq. (5)


@register("dual_sampling_rn34")
def _build(**kw) -> DualSamplingNet:
    kw = dict(kw)
    if "blocks" in kw:
        kw["blocks"] = tuple(kw["blocks"])
    return DualSamplingNet(**kw)
