"""DeepSC-COVID (Wang et al., "Joint Learning of 3D Lesion Segmentation and Classification for Explainable
COVID-19 Diagnosis", IEEE TMI 2022, Sec. IV): cross-task feature subnet, 3D lesion subnet, classification subnet.

One study at a time (B = 1 study; its segmentation patches form the batch of the lesion subnet)::

    net = build_model("deepsc_cpu", num_classes=4)
    out = net(patches, x_cls, cls_index)
    # patches (P, 1, D, H, W): non-overlapping segmentation patches of the study, in z order
    # x_cls (1, 1, N, H, W): the N equidistant slices of Eq. (12); cls_index (N,) their slices in the P*D stack
    out["seg_logits"]   (P, 1, D, H, W)  Eq. (3) before the sigmoid
    out["side_logits"]  [S_1 .. S_4]: (P, 1, D/8, H/8, W/8) ... (P, 1, D, H, W), the multi-scale intermediate
                        segmentations of Eq. (3)
    out["logits"]       (1, K) class scores of Eq. (4) before the softmax
    out["features"]     [F_e1, F_e2, F_e3]: (1, C_i, N/2^i, H/2^i, W/2^i) encoder maps, for Eq. (5)

Sizes: D, N, H, W must be multiples of 8 (three 2x poolings on each side). Paper: D x H x W = 24 x 256 x 256,
N = 48 slices of 512 x 512 (the classification input is then matched to the patch by pad / crop); encoder widths
64 / 128 / 256. Our preprocessing (:mod:`pneumoct.preprocess.volume_deepsc`) gives both inputs the same H x W, so
the classification subnet's segmentation-side feature is the lesion subnet's inception output gathered at the N
sampled slices (same grid, no crop needed), and the patch-side feature of the classification input is matched to
the patch by zero-padding / centre-cropping, as the paper's dimension matching does.

Ablations of the paper (Sec. V-E) are constructor flags: ``inception=False`` (a plain 3D conv of the same output
width instead of each 3D inception block), ``cross_stitch=False`` (F_seg = I_seg, F_cls = I_cls).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register

__all__ = ["DeepSC", "Inception3d", "CrossStitch", "LesionSubnet", "ClassificationSubnet", "match_dims",
           "evidence_masks", "deepsc", "deepsc_cpu", "DEFAULT_ETA"]

#: Eq. (3) weights eta_1..eta_4 of the intermediate segmentations, coarse (1/8) to fine (1/1). The paper gives
#: its values in the supplementary material only; ours weight the finer scales more.
DEFAULT_ETA = (0.125, 0.25, 0.5, 1.0)


def _groups(c: int) -> int:
    """GroupNorm groups: 4 where the width allows (paper: group normalisation, group count not given)."""
    for g in (4, 2):
        if c % g == 0 and c // g >= 2:
            return g
    return 1


def _cgr(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """3D conv -> GroupNorm -> ReLU: (B, cin, d, h, w) -> (B, cout, d/stride, h/stride, w/stride)."""
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True))


class Inception3d(nn.Module):
    """3D inception block (Sec. IV-B(1)): four branches of cascaded 3D convs, each GroupNorm + ReLU, concatenated.
    (B, cin, d, h, w) -> (B, cout, d, h, w). Branches: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3 -> 3x3x3 (5x5x5
    receptive field); 3x3x3 max-pool -> 1x1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        b = max(1, cout // 4)
        last = cout - 3 * b
        if last < 1:
            raise ValueError(f"inception block needs at least 4 output channels, got {cout}")
        self.b1 = _cgr(cin, b, 1)
        self.b2 = nn.Sequential(_cgr(cin, b, 1), _cgr(b, b, 3))
        self.b3 = nn.Sequential(_cgr(cin, b, 1), _cgr(b, b, 3), _cgr(b, b, 3))
        self.b4 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), _cgr(cin, last, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


def match_dims(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Dimension matching of Sec. IV-B(2): zero-pad or centre-crop the spatial dims of (B, C, d, h, w) to
    ``size`` (3 ints)."""
    for axis, n in zip((2, 3, 4), size):
        cur = x.shape[axis]
        if cur > n:
            start = (cur - n) // 2
            x = x.narrow(axis, start, n)
        elif cur < n:
            before = (n - cur) // 2
            pad = [0, 0] * (4 - axis) + [before, n - cur - before]  # F.pad lists the last axis first
            x = F.pad(x, pad)
    return x


class CrossStitch(nn.Module):
    """Cross-stitch unit, DeepSC-COVID Eq. (2): [F_seg; F_cls] = [[w_seg1, w_cls2]; [w_seg2, w_cls1]] [I_seg; I_cls]
    with four learnable scalars (initialised 0.9 on the diagonal, 0.1 off it). ``active = False`` (set by the
    training schedule while the subnets are pre-trained apart, or by the ``cross_stitch=False`` ablation) passes the
    features through unmixed."""

    def __init__(self, enabled: bool = True, init_self: float = 0.9) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self.active = self.enabled
        if self.enabled:
            self.w = nn.Parameter(torch.tensor([[init_self, 1.0 - init_self], [1.0 - init_self, init_self]]))

    def forward(self, i_seg: torch.Tensor, i_cls_for_seg: torch.Tensor, i_seg_for_cls: torch.Tensor,
                i_cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``i_cls_for_seg``: I_cls dimension-matched to I_seg's grid; ``i_seg_for_cls``: I_seg on I_cls's grid."""
        if not (self.enabled and self.active):
            return i_seg, i_cls
        w = self.w
        f_seg = w[0, 0] * i_seg + w[0, 1] * i_cls_for_seg  # DeepSC-COVID Eq. (2), first row
        f_cls = w[1, 0] * i_seg_for_cls + w[1, 1] * i_cls  # Eq. (2), second row
        return f_seg, f_cls


class _Double(nn.Sequential):
    """(conv3 -> GN -> ReLU) x 2: a down-transition unit (B, cin, ...) -> (B, cout, ...)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_cgr(cin, cout, 3), _cgr(cout, cout, 3))


class _Up(nn.Module):
    """Up-transition unit: 2x deconvolution, concatenation with the skip feature, double conv.
    (B, cin, d, h, w), skip (B, cskip, 2d, 2h, 2w) -> (B, cout, 2d, 2h, 2w)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        self.fuse = _Double(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class LesionSubnet(nn.Module):
    """3D lesion subnet (Sec. IV-C): a U-shape of three down-transition units (each followed by 2x max-pooling)
    and three up-transition units with skips. (B, cin, D, H, W) -> intermediate segmentation logits
    S_1 (B, 1, D/8, H/8, W/8) from the last down unit, S_2 (1/4), S_3 (1/2), S_4 (1/1) from the up units, and
    Eq. (3) before its sigmoid: sum_i eta_i UP(S_i, 2^(4-i)), (B, 1, D, H, W)."""

    def __init__(self, cin: int, base: int, eta: Sequence[float] = DEFAULT_ETA) -> None:
        super().__init__()
        w1, w2, w3 = base, 2 * base, 4 * base
        self.down1, self.down2, self.down3 = _Double(cin, w1), _Double(w1, w2), _Double(w2, w3)
        self.up1, self.up2, self.up3 = _Up(w3, w3, w3), _Up(w3, w2, w2), _Up(w2, w1, w1)
        self.heads = nn.ModuleList([nn.Conv3d(c, 1, 1) for c in (w3, w3, w2, w1)])
        if len(eta) != 4:
            raise ValueError("eta needs 4 weights (Eq. (3))")
        self.register_buffer("eta", torch.tensor([float(e) for e in eta]), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        e1 = self.down1(x)
        e2 = self.down2(F.max_pool3d(e1, 2))
        e3 = self.down3(F.max_pool3d(e2, 2))
        ctx = F.max_pool3d(e3, 2)  # contextual features (1/8)
        y1 = self.up1(ctx, e3)
        y2 = self.up2(y1, e2)
        y3 = self.up3(y2, e1)
        sides = [h(f) for h, f in zip(self.heads, (ctx, y1, y2, y3))]
        size = x.shape[2:]
        # DeepSC-COVID Eq. (3): S = sigmoid(sum_i eta_i UP(S_i, 2^(4-i))); the sigmoid is left to the caller
        fused = sum(self.eta[i] * (s if s.shape[2:] == size else
                                   F.interpolate(s, size=size, mode="trilinear", align_corners=False))
                    for i, s in enumerate(sides))
        return fused, sides


class _ResUnit(nn.Module):
    """Residual 3D encoder unit (Sec. IV-D): conv3 (stride 2) -> GN -> ReLU -> conv3 -> GN, plus a strided 1x1x1
    projection shortcut, ReLU. (B, cin, d, h, w) -> (B, cout, d/2, h/2, w/2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(cin, cout, 3, stride=2, padding=1, bias=False),
                                  nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True),
                                  nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout))
        self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=2, bias=False), nn.GroupNorm(_groups(cout), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class ClassificationSubnet(nn.Module):
    """Classification subnet (Sec. IV-D). C-features (B, cin, N, H, W) and the segmented lesions at the same slices
    (B, 1, N, H, W), each through a conv, concatenated, then three residual encoder units of widths ``widths``
    (paper 64 / 128 / 256); the channel-wise global average of each, concatenated, through one fully connected
    layer without bias (Eq. (4)). Returns logits (B, K) and the encoder maps [F_e1, F_e2, F_e3]."""

    def __init__(self, cin: int, widths: Sequence[int], num_classes: int, lesion_channels: int = 4) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.feat = _cgr(cin, cin, 3)
        self.lesion = _cgr(1, lesion_channels, 3)
        ins = [cin + lesion_channels] + self.widths[:-1]
        self.enc = nn.ModuleList([_ResUnit(a, b) for a, b in zip(ins, self.widths)])
        self.fc = nn.Linear(sum(self.widths), num_classes, bias=False)

    def forward(self, f_cls: torch.Tensor, lesion: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.cat([self.feat(f_cls), self.lesion(lesion)], dim=1)
        feats = []
        for unit in self.enc:
            x = unit(x)
            feats.append(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)  # [f_e1,k], [f_e2,k], [f_e3,k]
        return self.fc(pooled), feats  # DeepSC-COVID Eq. (4) before the softmax

    def fc_blocks(self) -> list[torch.Tensor]:
        """The FC weights split per encoder unit: [w_e1 (K, C1), w_e2 (K, C2), w_e3 (K, C3)]."""
        return list(torch.split(self.fc.weight, self.widths, dim=1))


def evidence_masks(features: Sequence[torch.Tensor], fc_blocks: Sequence[torch.Tensor],
                   cls: torch.Tensor) -> list[torch.Tensor]:
    """Multi-layer lesion evidence masks, DeepSC-COVID Eq. (5): V_i = sum_k F_ei,k * w_ei^(k, j) for class j.
    features[i] (B, C_i, d, h, w), fc_blocks[i] (K, C_i), cls (B,) long -> [V_i (B, 1, d, h, w)] (raw, signed; the
    CROP of Eq. (5) is done where they are compared)."""
    out = []
    for f, w in zip(features, fc_blocks):
        wj = w[cls]  # (B, C_i)
        out.append(torch.einsum("bcdhw,bc->bdhw", f, wj)[:, None])
    return out


class DeepSC(nn.Module):
    """The whole network (module docstring). ``stem`` = output width of each 3D inception block; ``seg_base`` =
    width of the first down-transition unit (then 2x, 4x); ``cls_widths`` = the three encoder widths (paper
    64 / 128 / 256; ``deepsc_cpu`` uses a width multiplier)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1, stem: int = 16, seg_base: int = 8,
                 cls_widths: Sequence[int] = (64, 128, 256), inception: bool = True, cross_stitch: bool = True,
                 eta: Sequence[float] = DEFAULT_ETA) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("DeepSC-COVID needs at least 2 classes")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        block = (lambda: Inception3d(in_channels, stem)) if inception else (lambda: _cgr(in_channels, stem, 3))
        self.inc_seg, self.inc_cls = block(), block()  # two blocks, parameters not shared (Sec. IV-B(1))
        self.cross = CrossStitch(enabled=cross_stitch)
        self.lesion = LesionSubnet(stem, seg_base, eta)
        self.classifier = ClassificationSubnet(stem, cls_widths, num_classes)

    @property
    def eta(self) -> torch.Tensor:
        return self.lesion.eta

    def forward(self, patches: torch.Tensor, x_cls: torch.Tensor, cls_index: torch.Tensor,
                detach_lesion: bool = False) -> dict[str, Any]:
        """See the module docstring. ``detach_lesion``: the classification subnet gets the segmentation without
        gradient (pre-training the subnets apart, stage 1 of Sec. V-A "Model training")."""
        if patches.dim() != 5 or x_cls.dim() != 5 or x_cls.shape[0] != 1:
            raise ValueError(f"expected patches (P, C, D, H, W) and x_cls (1, C, N, H, W), got "
                             f"{tuple(patches.shape)} and {tuple(x_cls.shape)}")
        p, _, d, h, w = patches.shape
        i_cls = self.inc_cls(x_cls)  # (1, C, N, H, W)
        i_seg = self.inc_seg(patches)  # (P, C, D, H, W)
        i_cls_for_seg = match_dims(i_cls, (d, h, w)).expand(p, -1, -1, -1, -1)
        # the segmentation-side feature at the sampled slices: the patch stack is one (1, C, P*D, H, W) volume
        stack = i_seg.permute(1, 0, 2, 3, 4).reshape(1, i_seg.shape[1], p * d, h, w)
        i_seg_for_cls = match_dims(stack.index_select(2, cls_index), i_cls.shape[2:])
        f_seg, f_cls = self.cross(i_seg, i_cls_for_seg, i_seg_for_cls, i_cls)
        seg_logits, sides = self.lesion(f_seg)
        seg_stack = seg_logits.permute(1, 0, 2, 3, 4).reshape(1, 1, p * d, h, w)
        lesion_at_cls = torch.sigmoid(seg_stack.index_select(2, cls_index))
        if detach_lesion:
            lesion_at_cls = lesion_at_cls.detach()
        logits, feats = self.classifier(f_cls, match_dims(lesion_at_cls, f_cls.shape[2:]))
        return {"seg_logits": seg_logits, "side_logits": sides, "logits": logits, "features": feats}

    def evidence(self, out: dict[str, Any], cls: torch.Tensor) -> list[torch.Tensor]:
        """Eq. (5) for the classes ``cls`` (B,): [V_1, V_2, V_3], finest first."""
        return evidence_masks(out["features"], self.classifier.fc_blocks(), cls)


def _build(num_classes: int, in_channels: int, defaults: dict, kw: dict) -> DeepSC:
    args = {**defaults, **kw}
    if "cls_widths" in kw:  # explicit widths win over the default multiplier
        args.pop("cls_width_mult", None)
    if "cls_width_mult" in args:  # CPU width multiplier on the paper's 64 / 128 / 256
        m = float(args.pop("cls_width_mult"))
        args["cls_widths"] = tuple(max(4, int(round(c * m))) for c in (64, 128, 256))
    return DeepSC(num_classes=num_classes, in_channels=in_channels, **args)


@register("deepsc")
def deepsc(num_classes: int = 3, in_channels: int = 1, **kw: Any) -> DeepSC:
    """Paper widths (encoder 64 / 128 / 256; inception width 32, lesion subnet 32 / 64 / 128 are our guesses: the
    paper gives them in its supplementary material); 3 classes (COVID-19, CAP, non-pneumonia) by default."""
    return _build(num_classes, in_channels, {"stem": 32, "seg_base": 32, "cls_widths": (64, 128, 256)}, kw)


@register("deepsc_cpu")
def deepsc_cpu(num_classes: int = 4, in_channels: int = 1, **kw: Any) -> DeepSC:
    """CPU widths: inception 8, lesion subnet 8 / 16 / 32, encoder 8 / 16 / 32 (width multiplier 1/8)."""
    return _build(num_classes, in_channels, {"stem": 8, "seg_base": 8, "cls_width_mult": 0.125}, kw)
