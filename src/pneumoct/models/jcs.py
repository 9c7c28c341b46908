"""JCS explainable classification branch (Wu et al., "JCS: An Explainable COVID-19 Diagnosis System by Joint
Classification and Segmentation", IEEE TIP 2021), Section III-A.

* Res2Net-50 v1b backbone (Gao et al. [41]): bottleneck blocks whose 3x3 conv is replaced by ``scale`` hierarchical
  3x3 convs on channel splits (multi-scale receptive fields inside one block); deep 3-conv stem; avg-pool
  shortcut downsampling (the "v1b" tweaks).  Five stages, as used by the paper's feature-enhancement module (§III-C).
* Classifier: last stage -> global average pooling -> FC with two channels (uninfected / COVID-19), §III-A1.
* Activation mapping (Grad-CAM [18]), JCS Eq. (1)-(2), computed with ``create_graph`` so it can be supervised.
* Image mixing (mixup [65]), JCS Eq. (3), with alpha = 0.5 (§IV implementation details).
* Pixel-level supervision of the activation map, L_seg of JCS Eq. (4), only for images with a lesion mask.
* Patient-level decision: positive when the number of positive slices is larger than a threshold; the sweep over that
  threshold gives the sensitivity / specificity trade-off table (JCS Table IV).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import init_conv_bn

__all__ = [
    "Res2NetBottle2neck", "Res2Net", "JCSClassifier", "jcs_classifier", "jcs_classifier_cpu",
    "normalize_map", "l_seg", "jcs_classification_loss", "mixup", "soft_cross_entropy",
    "patient_positive", "threshold_tradeoff",
]

COVID_CLASS = 1  # index of the COVID-19 (infected) channel of the 2-channel FC


# ----------------------------------------------------------------------------------------------------- backbone
class Res2NetBottle2neck(nn.Module):
    """Res2Net bottleneck (Gao et al., TPAMI 2021), as in Res2Net-50 v1b (``scale=4``, ``base_width=26``).

    1x1 conv to ``width*scale`` channels, split into ``scale`` groups x_1..x_s; y_1 = K_1(x_1),
    y_i = K_i(x_i + y_{i-1}) for 1 < i < s (hierarchical 3x3 convs: each later split sees a larger receptive field),
    y_s = x_s (identity; avg-pooled in the first block of a stage, ``stype='stage'``, where no residual chain is
    used); concat -> 1x1 conv to ``planes*expansion`` -> + shortcut -> ReLU.
    ``scale=1`` degenerates to a plain ResNet bottleneck (a single 3x3 conv).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 26, scale: int = 4, stype: str = "normal") -> None:
        super().__init__()
        if scale < 1:
            raise ValueError("scale must be >= 1")
        width = max(1, int(math.floor(planes * (base_width / 64.0))))
        self.width, self.scale, self.stype = width, scale, stype
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        self.convs = nn.ModuleList(
            [nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False) for _ in range(self.nums)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(self.nums)])
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if (stype == "stage" and scale > 1) else None
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, dim=1)
        outs = []
        sp = spx[0]
        for i in range(self.nums):
            sp = spx[i] if (i == 0 or self.stype == "stage") else sp + spx[i]  # hierarchical residual chain
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            outs.append(sp)
        if self.scale > 1:
            last = spx[self.nums]
            outs.append(self.pool(last) if self.pool is not None else last)
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class Res2Net(nn.Module):
    """Res2Net v1b backbone.  ``forward`` returns the five stage outputs [stem (/2), layer1 (/4), layer2 (/8),
    layer3 (/16), layer4 (/32)] (strides for the default ``stage_strides``).

    ``layers=(3, 4, 6, 3)``, ``base_width=26``, ``scale=4``, ``widths_divisor=1`` is Res2Net-50 v1b 26w4s
    (2048 output channels).  ``widths_divisor`` divides every channel count (stem and stage planes) for a CPU-sized
    variant; ``stage_strides`` lets small inputs keep a usable final feature map.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), base_width: int = 26, scale: int = 4,
                 in_channels: int = 3, widths_divisor: int = 1,
                 stage_strides: Sequence[int] = (1, 2, 2, 2)) -> None:
        super().__init__()
        if len(layers) != 4 or len(stage_strides) != 4:
            raise ValueError("layers and stage_strides must have 4 entries")
        d = max(1, int(widths_divisor))
        stem_w, stem_out = max(1, 32 // d), max(1, 64 // d)
        self.inplanes = stem_out
        self.base_width, self.scale = base_width, scale
        self.stem = nn.Sequential(  # v1b deep stem: three 3x3 convs
            nn.Conv2d(in_channels, stem_w, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_w), nn.ReLU(inplace=True),
            nn.Conv2d(stem_w, stem_w, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_w), nn.ReLU(inplace=True),
            nn.Conv2d(stem_w, self.inplanes, 3, 1, 1, bias=False), nn.BatchNorm2d(self.inplanes),
            nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = [max(1, p // d) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(planes[0], layers[0], stage_strides[0])
        self.layer2 = self._make_layer(planes[1], layers[1], stage_strides[1])
        self.layer3 = self._make_layer(planes[2], layers[2], stage_strides[2])
        self.layer4 = self._make_layer(planes[3], layers[3], stage_strides[3])
        self.out_channels = [stem_out] + [p * Res2NetBottle2neck.expansion for p in planes]
        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        exp = Res2NetBottle2neck.expansion
        downsample = None
        if stride != 1 or self.inplanes != planes * exp:  # v1b: avg-pool then 1x1 conv (stride 1)
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, planes * exp, 1, bias=False), nn.BatchNorm2d(planes * exp))
        blocks_ = [Res2NetBottle2neck(self.inplanes, planes, stride, downsample, self.base_width, self.scale,
                                      stype="stage")]
        self.inplanes = planes * exp
        for _ in range(1, max(1, blocks)):
            blocks_.append(Res2NetBottle2neck(self.inplanes, planes, base_width=self.base_width, scale=self.scale))
        return nn.Sequential(*blocks_)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s1 = self.stem(x)
        s2 = self.layer1(self.maxpool(s1))
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        s5 = self.layer4(s4)
        return [s1, s2, s3, s4, s5]


# --------------------------------------------------------------------------------------------------- classifier
def normalize_map(am: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max normalisation of (B, H, W) maps to [0, 1] ("normalized to (0, 1)", JCS Eq. (4))."""
    flat = am.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(am)


class JCSClassifier(nn.Module):
    """Res2Net backbone + GAP + FC(2) (JCS §III-A1).  ``forward`` -> ``{"logits": (B, C), "features": (B, K, h, w),
    "stages": [5 stage outputs]}``; ``activation_map`` -> Grad-CAM (JCS Eq. (1)-(2)) at input size in [0, 1]."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3),
                 base_width: int = 26, scale: int = 4, widths_divisor: int = 1,
                 stage_strides: Sequence[int] = (1, 2, 2, 2)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Res2Net(layers, base_width, scale, in_channels, widths_divisor, stage_strides)
        self.fc = nn.Linear(self.backbone.out_channels[-1], num_classes)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))  # GAP then FC

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        stages = self.backbone(x)
        return {"logits": self.head(stages[-1]), "features": stages[-1], "stages": stages}

    def activation_map(self, x: torch.Tensor, class_idx: int = COVID_CLASS, *, score: str = "prob",
                       create_graph: bool | None = None, normalize: bool = True,
                       return_logits: bool = False):
        """Grad-CAM of class ``class_idx`` for a batch, (B, H_in, W_in), values in [0, 1] when ``normalize``.

        JCS Eq. (1): w_k = 1/(HW) sum_ij d y_p / d X^k_ij, with X the feature map before GAP and y_p the predicted
        probability of the class (``score="prob"``, softmax; ``score="logit"`` uses the raw logit as in [18]).
        JCS Eq. (2): AM_p = sum_k ReLU(w_k X^k)  (ReLU inside the sum, as written in the paper).
        The map is bilinearly upsampled to the input size, then min-max normalised per sample (AM^norm of Eq. (4)).
        With ``create_graph`` (default: whenever autograd is enabled) the map is differentiable w.r.t. the network
        weights, so L_seg (Eq. (4)) can train it.  Samples are independent (head is per-sample), so the gradient of
        the summed score gives each sample's own gradient.
        """
        if create_graph is None:
            create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            feats = self.backbone(x)[-1]
            if not feats.requires_grad:  # frozen weights and plain input: still need d y / d X
                feats = feats.detach().requires_grad_(True)
            logits = self.head(feats)
            if score == "prob":
                y = torch.softmax(logits, dim=1)[:, class_idx]
            elif score == "logit":
                y = logits[:, class_idx]
            else:
                raise ValueError("score must be 'prob' or 'logit'")
            grads = torch.autograd.grad(y.sum(), feats, create_graph=create_graph)[0]
            w = grads.mean(dim=(2, 3), keepdim=True)               # JCS Eq. (1)
            am = F.relu(w * feats).sum(dim=1, keepdim=True)        # JCS Eq. (2)
            am = F.interpolate(am, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            if normalize:
                am = normalize_map(am)
        if not create_graph:
            am, logits = am.detach(), logits.detach()
        return (am, logits) if return_logits else am


# ---------------------------------------------------------------------------------------------------- losses
def l_seg(act_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample JCS Eq. (4): L_seg = 1/(HW) * ||AM^norm_{p,c} - S||_2, with ||.||_2 the (unsquared) l2 / Frobenius
    norm over the H x W pixels, AM^norm the COVID-channel activation map normalised to [0, 1] and S the binary
    lesion mask.  ``act_map`` (B, H, W) or (B, 1, H, W); ``mask`` same spatial size (resized by nearest otherwise).
    Returns a (B,) tensor.  Note the 1/(HW) makes the term small (at most 1/sqrt(HW)); weight it accordingly."""
    if act_map.dim() == 4:
        act_map = act_map[:, 0]
    mask = mask.to(act_map.dtype)
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.shape[-2:] != act_map.shape[-2:]:
        mask = F.interpolate(mask[:, None], size=act_map.shape[-2:], mode="nearest")[:, 0]
    h, w = act_map.shape[-2:]
    diff = (act_map - mask).flatten(1)
    # sqrt of a sum of squares: add a tiny epsilon so the gradient is finite when AM == S exactly
    return torch.sqrt((diff * diff).sum(dim=1) + 1e-12) / (h * w)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets (rows summing to 1), mean over the batch: -sum_c y_c log softmax(z)_c."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def jcs_classification_loss(logits: torch.Tensor, labels: torch.Tensor, act_map: torch.Tensor | None = None,
                            lesion_mask: torch.Tensor | None = None, lambda_seg: float = 1.0,
                            has_mask: torch.Tensor | None = None, return_parts: bool = False):
    """CE (hard labels (B,) or soft/mixed targets (B, C)) + lambda_seg * mean L_seg (JCS Eq. (4)) over the samples
    that have a pixel-level annotation.  "L_seg will not be computed if images have no ground truth pixel-level
    annotations": with ``lesion_mask=None`` the term is 0; ``has_mask`` (B,) bool selects annotated samples
    (default: all, when a mask is given).  ``act_map`` is the COVID-channel map from
    :meth:`JCSClassifier.activation_map` (normalised, differentiable)."""
    ce = soft_cross_entropy(logits, labels) if labels.dim() == 2 else F.cross_entropy(logits, labels.long())
    seg = logits.new_zeros(())
    if lesion_mask is not None:
        if act_map is None:
            raise ValueError("act_map is required when lesion_mask is given")
        sel = (torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if has_mask is None
               else has_mask.to(torch.bool).to(logits.device))
        if bool(sel.any()):
            seg = l_seg(act_map[sel], lesion_mask[sel]).mean()
    total = ce + lambda_seg * seg
    return (total, {"ce": ce.detach(), "seg": seg.detach()}) if return_parts else total


def _np_rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    return np.random.default_rng(rng)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.5, rng: Any = None, num_classes: int = 2,
          generator: Any = None):
    """Image mixing, JCS Eq. (3): x^m_ij = lam x_i + (1 - lam) x_j, y^m_ij = lam y_i + (1 - lam) y_j, with
    lam ~ Beta(alpha, alpha), alpha = 0.5 (JCS §IV).  Partners j != i: a random single cycle over the batch (a
    derangement) for B >= 2.  ``rng``/``generator``: numpy Generator, torch.Generator or int seed.
    Returns ``(x_mixed, y_soft (B, num_classes), lam, partner_index)``; train with :func:`soft_cross_entropy`."""
    g = _np_rng(generator if generator is not None else rng)
    b = x.shape[0]
    lam = float(g.beta(alpha, alpha)) if alpha > 0 else 1.0
    if b >= 2:
        order = g.permutation(b)
        partner = np.empty(b, dtype=np.int64)
        partner[order] = order[np.roll(np.arange(b), -1)]  # order[k] is mixed with order[k+1]
    else:
        partner = np.zeros(b, dtype=np.int64)
    idx = torch.as_tensor(partner, device=x.device)
    y_hot = y.to(x.dtype) if y.dim() == 2 else F.one_hot(y.long(), num_classes).to(x.dtype)
    x_m = lam * x + (1.0 - lam) * x[idx]
    y_m = lam * y_hot + (1.0 - lam) * y_hot[idx]
    return x_m, y_m, lam, idx


# ----------------------------------------------------------------------------------------- patient-level decision
def _slice_positive(slice_probs: Any, slice_threshold: float) -> np.ndarray:
    p = np.asarray(slice_probs, dtype=float)
    if p.ndim == 2:  # (N, 2) class probabilities: infected channel
        p = p[:, COVID_CLASS]
    return p.reshape(-1) > slice_threshold


def patient_positive(slice_probs: Any, slice_threshold: float = 0.5, count_threshold: int = 25) -> bool:
    """JCS §III-A1 / §IV: a slice is infected when P(COVID) > P(uninfected), i.e. P(COVID) > 0.5 for 2 classes;
    the patient is positive when the number of infected slices is *larger than* ``count_threshold`` (the paper
    reports sens 95.0% / spec 93.0% at threshold 25 on COVID-CS)."""
    return bool(_slice_positive(slice_probs, slice_threshold).sum() > count_threshold)


def threshold_tradeoff(patient_slice_probs: Sequence[Any], labels: Sequence[int], count_thresholds: Sequence[int],
                       slice_threshold: float = 0.5) -> list[dict[str, float]]:
    """Sensitivity / specificity for each count threshold (JCS Table IV).  One row per threshold:
    ``{"count_threshold", "sensitivity", "specificity", "tp", "fn", "tn", "fp"}``; NaN when a class is absent."""
    counts = np.array([_slice_positive(p, slice_threshold).sum() for p in patient_slice_probs])
    y = np.asarray(labels).astype(bool)
    if len(counts) != len(y):
        raise ValueError("one label per patient required")
    rows = []
    for k in count_thresholds:
        pred = counts > k
        tp, fn = int((pred & y).sum()), int((~pred & y).sum())
        tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
        rows.append({"count_threshold": k,
                     "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
                     "specificity": tn / (tn + fp) if tn + fp else float("nan"),
                     "tp": tp, "fn": fn, "tn": tn, "fp": fp})
    return rows


# ---------------------------------------------------------------------------------------------------- builders
@register("jcs_classifier")
def jcs_classifier(num_classes: int = 2, in_channels: int = 3, **kw: Any) -> JCSClassifier:
    """Res2Net-50 v1b 26w4s classifier as in the paper."""
    kw.setdefault("layers", (3, 4, 6, 3))
    return JCSClassifier(num_classes=num_classes, in_channels=in_channels, **kw)


@register("jcs_classifier_cpu")
def jcs_classifier_cpu(num_classes: int = 2, in_channels: int = 1, **kw: Any) -> JCSClassifier:
    """CPU-sized variant: one block per stage, channels / 4 (same block design, scale 4, base width 26)."""
    kw.setdefault("layers", (1, 1, 1, 1))
    kw.setdefault("widths_divisor", 4)
    return JCSClassifier(num_classes=num_classes, in_channels=in_channels, **kw)
