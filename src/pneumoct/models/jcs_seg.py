"""JCS segmentation branch (Wu et al., "JCS: An Explainable COVID-19 Diagnosis System by Joint Classification and
Segmentation", IEEE TIP 2021), Section III-B.

* Encoder (§III-B1): VGG-16 conv part (five blocks E1..E5, 2-2-3-3-3 3x3 convs, max-pool/2 at the front of every
  block but the first; no FC layers).  BatchNorm after every conv (the ``vgg16_bn`` layout; ``batch_norm=False``
  gives the plain VGG-16 convs) so the net trains from scratch.
* Enhanced Feature Module (EFM, §III-B2): after conv5_3, GAM -> max-pool/2 -> GAM.  Each Grouped Atrous Module
  (Fig. 3a): 1x1 conv expanding the channels (x ``gam_expand``), four equal channel groups each with a 3x3 atrous
  conv (JCS Eq. (5)) of rates {1,3,6,9} (first GAM) / {1,2,3,4} (second GAM), SE block (reduction 4), 1x1 conv
  halving the channels, 3x3 transition conv with as many channels as the GAM input.
  Six feature levels M_E^1..M_E^6 with strides {1,2,4,8,16,32}: M_E^1..4 = E1..E4, M_E^5 = GAM1(E5),
  M_E^6 = GAM2(maxpool(M_E^5)).  Inputs must therefore have H, W divisible by 32.
* Attentive Feature Fusion decoder (AFF, §III-B3, Fig. 3b), stages i = 5..1 with M_D^6 := M_E^6:
  r_E = 1x1(M_E^i) (C_i/2 ch), r_D = up2(1x1(M_D^{i+1})) (C_{i+1}/2 ch, bilinear);
  F = 3x3(SE([r_E, r_D]))                 -- SE channel attention computed from both levels gates the bottom feature;
  M_D^i = 3x3(SE([F, up2(M_D^{i+1})]))    -- the higher-level decoder output enters a second time ("the feature map
                                             with a smaller size is more valued");
  side_i = 1x1(M_D^i) -> K logits.  Our reading of the text: the "doubly upsampled output in the previous stage" is
  taken to be the previous decoder feature M_D^{i+1} (not its one-channel side-output).
  Five side-outputs at strides 16, 8, 4, 2, 1; the stride-1 one is the final prediction.
* Combination with the classifier (§III-B4, Fig. 4), optional: with ``extra_channels`` (channels of the
  classifier stages A_1..A_5) each M_E^k is merged as N_E^k = 3x3(SE(1x1([M_E^k, resize(A_k)]))) and N_E^1..N_E^5
  feed the decoder; pass the classifier stage outputs as ``forward(x, extra_features=[A_1, ..., A_5])`` (e.g. the
  ``"stages"`` list of :class:`pneumoct.models.jcs.JCSClassifier`).  M_E^6 comes from the un-merged M_E^5.
* Deep supervision (§III-B5): :func:`deep_supervision_loss`, JCS Eq. (6) on every side-output upsampled to the
  ground-truth size.

Binary (``num_classes=1``: one logit channel, sigmoid) and multi-class (``num_classes=K>1``, e.g. 3 =
background / GGO / consolidation: softmax) heads.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import init_conv_bn

__all__ = ["SEBlock", "GroupedAtrousModule", "AttentiveFeatureFusion", "FeatureCombination", "JCSSegNet",
           "deep_supervision_loss", "soft_dice_loss", "jcs_seg", "jcs_seg_cpu", "VGG16_WIDTHS", "VGG16_DEPTHS"]

VGG16_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG16_DEPTHS: tuple[int, ...] = (2, 2, 3, 3, 3)  # convs per VGG-16 block E1..E5


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1, bn: bool = True) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SEBlock(nn.Module):
    """Squeeze-Excitation [68]: GAP -> Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid -> channel scaling.
    (B, C, h, w) -> (B, C, h, w).  JCS uses reduction r = 4 (§III-B2)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                                nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class GroupedAtrousModule(nn.Module):
    """GAM (JCS Fig. 3a): (B, C, h, w) -> (B, C, h, w).

    1x1 expand to ``expand*C`` -> 4 groups, group g convolved by a 3x3 atrous conv of rate ``rates[g]`` (Eq. (5))
    -> concat -> SE (r=4) -> 1x1 halving (``expand*C`` -> ``expand*C/2``) -> 3x3 transition conv to C channels."""

    def __init__(self, channels: int, rates: Sequence[int], expand: int = 2, reduction: int = 4,
                 bn: bool = True) -> None:
        super().__init__()
        groups = len(rates)
        mid = channels * expand
        if mid % groups or mid % 2:
            raise ValueError(f"expanded channels {mid} must split into {groups} groups and halve")
        gw = mid // groups
        self.expand = conv_bn_relu(channels, mid, 1, bn=bn)
        self.branches = nn.ModuleList(conv_bn_relu(gw, gw, 3, dilation=r, bn=bn) for r in rates)
        self.se = SEBlock(mid, reduction)
        self.halve = conv_bn_relu(mid, mid // 2, 1, bn=bn)
        self.transition = conv_bn_relu(mid // 2, channels, 3, bn=bn)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x)
        parts = torch.chunk(y, self.groups, dim=1)
        y = torch.cat([b(p) for b, p in zip(self.branches, parts)], dim=1)
        return self.transition(self.halve(self.se(y)))


class AttentiveFeatureFusion(nn.Module):
    """AFF stage (JCS Fig. 3b): (M_E^i (B, C_e, h, w), M_D^{i+1} (B, C_d, h', w')) -> (M_D^i (B, C_e, h, w),
    side logits (B, K, h, w)).  See the module docstring for the equations."""

    def __init__(self, c_enc: int, c_dec: int, num_classes: int, reduction: int = 4, bn: bool = True) -> None:
        super().__init__()
        re, rd = max(1, c_enc // 2), max(1, c_dec // 2)
        self.reduce_e = conv_bn_relu(c_enc, re, 1, bn=bn)
        self.reduce_d = conv_bn_relu(c_dec, rd, 1, bn=bn)
        self.se1 = SEBlock(re + rd, reduction)
        self.trans1 = conv_bn_relu(re + rd, c_enc, 3, bn=bn)
        self.se2 = SEBlock(c_enc + c_dec, reduction)
        self.trans2 = conv_bn_relu(c_enc + c_dec, c_enc, 3, bn=bn)
        self.side = nn.Conv2d(c_enc, num_classes, 1)

    def forward(self, m_e: torch.Tensor, m_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = m_e.shape[-2:]
        r_e = self.reduce_e(m_e)
        r_d = F.interpolate(self.reduce_d(m_d), size=size, mode="bilinear", align_corners=False)
        f = self.trans1(self.se1(torch.cat([r_e, r_d], dim=1)))
        up_d = F.interpolate(m_d, size=size, mode="bilinear", align_corners=False)
        out = self.trans2(self.se2(torch.cat([f, up_d], dim=1)))
        return out, self.side(out)


class FeatureCombination(nn.Module):
    """JCS Fig. 4 / §III-B4: N_E^k = 3x3(SE(1x1([M_E^k, resize(A_k)]))), (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, c_seg: int, c_cls: int, reduction: int = 4, bn: bool = True) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(c_seg + c_cls, c_seg, 1, bn=bn)
        self.se = SEBlock(c_seg, reduction)
        self.transition = conv_bn_relu(c_seg, c_seg, 3, bn=bn)

    def forward(self, m_e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if a.shape[-2:] != m_e.shape[-2:]:
            a = F.interpolate(a, size=m_e.shape[-2:], mode="bilinear", align_corners=False)
        return self.transition(self.se(self.reduce(torch.cat([m_e, a], dim=1))))


class JCSSegNet(nn.Module):
    """JCS segmentation network (§III-B, Fig. 2).

    ``forward(x (B, in_channels, H, W), extra_features=None)`` with H, W divisible by 32 ->
    ``{"logits": (B, K, H, W), "side_logits": [5 x (B, K, H, W)]}``; side outputs ordered coarse to fine (native
    strides 16, 8, 4, 2, 1, all bilinearly upsampled to H x W); ``logits`` is the last (stride-1) side output.
    K = ``num_classes`` (1: binary/sigmoid, >1: softmax over classes).
    """

    stride = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 1, widths: Sequence[int] = VGG16_WIDTHS,
                 depths: Sequence[int] = VGG16_DEPTHS, gam_rates: Sequence[Sequence[int]] = ((1, 3, 6, 9),
                                                                                         (1, 2, 3, 4)),
                 gam_expand: int = 2, se_reduction: int = 4, batch_norm: bool = True,
                 extra_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError("widths and depths need 5 entries (VGG blocks E1..E5)")
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, tuple(widths)
        bn = batch_norm
        blocks = []
        cin = in_channels
        for i, (w, d) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i > 0 else []  # pool at the front of E2..E5
            for _ in range(d):
                layers.append(conv_bn_relu(cin, w, 3, bn=bn))
                cin = w
            blocks.append(nn.Sequential(*layers))
        self.encoder = nn.ModuleList(blocks)
        c5 = widths[4]
        # EFM: GAM -> max-pool -> GAM (§III-B2)
        self.gam1 = GroupedAtrousModule(c5, gam_rates[0], gam_expand, se_reduction, bn)
        self.efm_pool = nn.MaxPool2d(2, 2)
        self.gam2 = GroupedAtrousModule(c5, gam_rates[1], gam_expand, se_reduction, bn)
        enc_ch = list(widths) + [c5]  # channels of M_E^1..M_E^6
        self.aff = nn.ModuleList(AttentiveFeatureFusion(enc_ch[i], enc_ch[i + 1], num_classes, se_reduction, bn)
                                 for i in range(5))  # aff[i] is stage i+1 (uses M_E^{i+1}, M_D^{i+2})
        self.extra_channels = tuple(extra_channels) if extra_channels is not None else None
        if self.extra_channels is not None:
            if len(self.extra_channels) != 5:
                raise ValueError("extra_channels needs 5 entries (classifier stages A_1..A_5)")
            self.combine = nn.ModuleList(FeatureCombination(enc_ch[k], self.extra_channels[k], se_reduction, bn)
                                         for k in range(5))
        else:
            self.combine = None
        init_conv_bn(self)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """M_E^1..M_E^6, strides 1..32."""
        feats = []
        h = x
        for blk in self.encoder:
            h = blk(h)
            feats.append(h)
        feats[4] = self.gam1(feats[4])                        # M_E^5
        feats.append(self.gam2(self.efm_pool(feats[4])))      # M_E^6
        return feats

    def forward(self, x: torch.Tensor, extra_features: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
        H, W = x.shape[-2:]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if H % self.stride or W % self.stride:
            raise ValueError(f"JCSSegNet needs H and W divisible by {self.stride}, got {H}x{W}")
        feats = self.encode(x)
        if self.combine is not None:
            if extra_features is None or len(extra_features) != 5:
                raise ValueError("this JCSSegNet was built with extra_channels: pass 5 classifier stage features")
            feats[:5] = [c(m, a) for c, m, a in zip(self.combine, feats[:5], extra_features)]  # N_E^1..N_E^5
        elif extra_features is not None:
            raise ValueError("extra_features given but the net was built without extra_channels")
        m_d = feats[5]
        sides = []
        for i in range(4, -1, -1):  # AFF stages 5..1
            m_d, side = self.aff[i](feats[i], m_d)
            sides.append(side if side.shape[-2:] == (H, W)
                         else F.interpolate(side, size=(H, W), mode="bilinear", align_corners=False))
        return {"logits": sides[-1], "side_logits": sides}


# ---------------------------------------------------------------------------------------------------- losses
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over samples (and classes).  Binary: ``logits`` (B, 1, H, W), ``target`` float
    (B, H, W) / (B, 1, H, W) in [0, 1], P = sigmoid.  Multi-class: ``logits`` (B, K, H, W), ``target`` long (B, H, W),
    P = softmax, G = one-hot, averaged over all K classes."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        g = target.reshape(p.shape).to(p.dtype)
        p, g = p[:, None], g[:, None]
    else:
        p = torch.softmax(logits, dim=1)
        g = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * g).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + g.sum(dim=(2, 3))
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def _one_output_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    if logits.shape[-2:] != target.shape[-2:]:  # "we up-sample it to the size of the ground-truth map"
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    if logits.shape[1] == 1:
        g = target.reshape(logits.shape[0], *logits.shape[-2:]).to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits[:, 0], g)  # BCE averaged over the H x W pixels
    else:
        ce = F.cross_entropy(logits, target.long())
    return ce + soft_dice_loss(logits, target, smooth)


def deep_supervision_loss(out: dict[str, Any] | torch.Tensor, target: torch.Tensor,
                          weights: Sequence[float] | None = None, smooth: float = 1.0) -> torch.Tensor:
    """Deep supervision loss, JCS §III-B5 / Eq. (6): sum over side-outputs of BCE(P, G) + Dice loss.

    ``out``: a model output dict (``side_logits`` used when present, else ``[logits]``, so a plain U-Net output
    works too) or a logits tensor.  Binary (K=1): ``target`` float (B, H, W) or (B, 1, H, W) in {0, 1};
    multi-class (K>1): ``target`` long (B, H, W) in [0, K) and the loss is CE + multi-class soft Dice.
    ``weights``: one per output (default all 1).  The final prediction is the last side-output, so it is not
    counted twice.

    Note: Eq. (6) as printed reads 1 - P.G / (|P|_1 + |G|_1), whose minimum is 0.5; we use the Dice loss of the
    cited [71] (Milletari et al.), 1 - 2 P.G / (|P|_1 + |G|_1), smoothed by ``smooth`` and computed per sample, so
    a perfect prediction gives ~0.
    """
    if isinstance(out, torch.Tensor):
        outputs = [out]
    else:
        outputs = list(out.get("side_logits") or [out["logits"]])
    if weights is None:
        weights = [1.0] * len(outputs)
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
    total = outputs[0].new_zeros(())
    for w, lg in zip(weights, outputs):
        total = total + w * _one_output_loss(lg, target, smooth)  # JCS Eq. (6) per side-output
    return total


# ---------------------------------------------------------------------------------------------------- builders
@register("jcs_seg")
def jcs_seg(num_classes: int = 1, in_channels: int = 3, **kw: Any) -> JCSSegNet:
    """Paper widths: VGG-16 (64, 128, 256, 512, 512) encoder + EFM + AFF decoder."""
    kw.setdefault("widths", VGG16_WIDTHS)
    return JCSSegNet(in_channels=in_channels, num_classes=num_classes, **kw)


@register("jcs_seg_cpu")
def jcs_seg_cpu(num_classes: int = 1, in_channels: int = 1, **kw: Any) -> JCSSegNet:
    """CPU-sized variant: same design (VGG-16 block depths 2-2-3-3-3, both GAMs, five AFF stages), every width / 8:
    (8, 16, 32, 64, 64)."""
    kw.setdefault("widths", tuple(w // 8 for w in VGG16_WIDTHS))
    return JCSSegNet(in_channels=in_channels, num_classes=num_classes, **kw)
