"""Weakly supervised multi-scale CAM network of Hu et al. (2020), "Weakly Supervised Deep Learning for COVID-19
Infection Detection and Classification from CT Images" (IEEE Access; arXiv 2004.06689).

Backbone (Hu et al., Fig. 1 and "Network Architecture" section), VGG-style, fully convolutional::

    2xC(32,3,1)-MP-2xC(64,3,1)-MP-3xC(128,3,1)-MP-3xC(256,3,1)-MP-3xC(256,3,1)-MP

every convolution 3x3, stride 1 (we pad 1 so a block keeps its size), followed by batch normalisation and ReLU;
MP is non-overlapping 2x2 max pooling (floor for odd sizes). Blocks are named Conv1 ... Conv5.

Multi-scale weakly supervised head (Hu et al., "Multi-Scale Learning" section, Fig. 1): the feature maps of
Conv3, Conv4 and Conv5 each go through a 1x1 convolution to K class score maps (class activation maps), each is
reduced by global max pooling (GMP) to a (B, K) score vector, and the score vectors are summed; a softmax of the
sum is the prediction, trained with the class-balanced focal loss Eq. (1) (``pneumoct.models.losses``).

Choices the paper leaves open (documented here):

* The score maps are read from each block's output *before* that block's max pooling (the "feature maps at
  Conv3/4/5"), so the last MP of the shorthand feeds nothing and is not built. Score-map sizes for an HxW input:
  conv3 (H/4, W/4), conv4 (H/8, W/8), conv5 (H/16, W/16) (floored at each pooling).
* ``batch_norm=True`` follows the paper; ``batch_norm=False`` gives plain conv+bias+ReLU (useful for batch size 1).
* ``use_scales`` picks any non-empty subset of ``("conv3", "conv4", "conv5")`` (``conv1``/``conv2`` are also
  accepted): one scale is the paper's single-scale "auxiliary classifier" ablation (Table 2), all three its joint
  classifier. Only the blocks up to the deepest used one are built.
* ``cam`` returns per-scale CAMs (bilinearly upsampled, min-max normalised per image) and their pixel-wise
  product ``joint``. The paper forms its *joint saliency* (Fig. 2) as the product of multi-scale integrated
  gradients; the CAM product here is the cheap analogue of that, used for its CAM figure (Fig. 4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register

__all__ = ["MultiScaleCAMNet", "PAPER_WIDTHS", "PAPER_DEPTHS", "SCALES", "recalibrate_batchnorm"]

# Hu et al., Fig. 1 / architecture shorthand: filters per block and convolutions per block.
PAPER_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 256)
PAPER_DEPTHS: tuple[int, ...] = (2, 2, 3, 3, 3)
SCALES: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _block(c_in: int, c_out: int, n: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        # Hu et al., Fig. 1: C(d,3,1) = 3x3 conv, stride 1, + batch norm + ReLU
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, stride=1, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LocalContrastNorm(nn.Module):
    """x -> (x - local mean) / (local std + floor), box window of ``kernel`` px, no parameters.

    Real training slices here come in two looks: HU windowed to [0, 1] (DICOM studies, what ``diagnose`` sees)
    and 8-bit exports already contrast-enhanced with CLAHE (the 2D sets). Removing the local brightness and
    contrast takes away the cheapest cue that separates the two (a shortcut: every 8-bit slice has a lesion).
    """

    def __init__(self, kernel: int = 15, floor: float = 0.05) -> None:
        super().__init__()
        self.kernel, self.floor = int(kernel), float(floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel // 2
        xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        mean = self._box_mean(xp)
        var = (self._box_mean(xp * xp) - mean * mean).clamp_min(0)
        return (x - mean) / (var.sqrt() + self.floor)

    def _box_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over every k x k window (no padding), from running sums along rows then columns: the value of
        ``avg_pool2d(x, k, stride=1)`` up to float rounding (sums in float64), at O(1) instead of O(k^2) per pixel
        (the k x k pool was ~60 % of this network's CPU time)."""
        k = self.kernel
        c = F.pad(x.to(torch.float64).cumsum(2), (0, 0, 1, 0))
        rows = c[:, :, k:] - c[:, :, :-k]
        c = F.pad(rows.cumsum(3), (1, 0, 0, 0))
        return ((c[:, :, :, k:] - c[:, :, :, :-k]) / float(k * k)).to(x.dtype)


class MultiScaleCAMNet(nn.Module):
    """Hu et al. multi-scale weakly supervised classifier.

    Args:
        in_channels: input channels C (1 for a CT slice, 3 for e.g. a 3-window stack).
        num_classes: K (3 for NP/CAP/COVID-19, 2 for the binary tasks).
        widths: filters of Conv1..Conv5 (paper: 32, 64, 128, 256, 256).
        use_scales: which blocks get a 1x1-conv + GMP classifier; their scores are summed.
        depths: convolutions per block (paper: 2, 2, 3, 3, 3).
        batch_norm: batch norm after every convolution (paper: yes).
        input_norm: ``"none"`` (paper) or ``"local"``: local contrast normalisation of the input (our addition,
            see :class:`LocalContrastNorm`) so that slices windowed from HU and 8-bit exports enhanced by CLAHE look
            alike to the network.

    ``forward(x)`` with ``x`` (B, C, H, W), H and W >= 2**(deepest block index - 1):
        returns ``{"logits": (B, K), "maps": {scale: (B, K, h_s, w_s)}, "scores": {scale: (B, K)}}`` where
        ``logits = sum_s scores[s]`` and ``scores[s] = GMP(maps[s])``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths: Sequence[int] = PAPER_WIDTHS,
                 use_scales: Sequence[str] = ("conv3", "conv4", "conv5"), depths: Sequence[int] = PAPER_DEPTHS,
                 batch_norm: bool = True, input_norm: str = "none") -> None:
        super().__init__()
        if input_norm not in ("none", "local"):
            raise ValueError("input_norm must be 'none' or 'local'")
        self.input_norm = LocalContrastNorm() if input_norm == "local" else nn.Identity()
        widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError("widths and depths need one entry per block Conv1..Conv5")
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2 (use 2 score maps for a binary task)")
        if isinstance(use_scales, str):
            use_scales = (use_scales,)
        scales = tuple(dict.fromkeys(s.lower() for s in use_scales))
        if not scales or any(s not in SCALES for s in scales):
            raise ValueError(f"use_scales must be a non-empty subset of {SCALES}, got {use_scales!r}")
        self.use_scales = tuple(s for s in SCALES if s in scales)  # shallow -> deep order
        self.in_channels, self.num_classes, self.widths, self.depths = in_channels, num_classes, widths, depths
        self.n_blocks = max(SCALES.index(s) for s in self.use_scales) + 1
        self.blocks = nn.ModuleList()
        c = in_channels
        for b in range(self.n_blocks):
            self.blocks.append(_block(c, widths[b], depths[b], batch_norm))
            c = widths[b]
        self.pool = nn.MaxPool2d(2, 2)  # Hu et al., Fig. 1: non-overlapping 2x2 MP between blocks
        # Hu et al., "Multi-Scale Learning": 1x1 conv -> K class score maps at each used level
        self.heads = nn.ModuleDict({s: nn.Conv2d(widths[SCALES.index(s)], num_classes, 1) for s in self.use_scales})
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for h in self.heads.values():
            nn.init.normal_(h.weight, std=0.01)

    @property
    def min_input_size(self) -> int:
        return 2 ** (self.n_blocks - 1)

    def forward(self, x: torch.Tensor) -> dict:
        """x (B, C, H, W) -> {"logits": (B, K), "maps": {s: (B, K, h, w)}, "scores": {s: (B, K)}}."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} smaller than {self.min_input_size} px")
        maps: dict[str, torch.Tensor] = {}
        h = self.input_norm(x)
        for b, block in enumerate(self.blocks):
            if b > 0:
                h = self.pool(h)
            h = block(h)
            name = SCALES[b]
            if name in self.heads:
                maps[name] = self.heads[name](h)  # (B, K, h_s, w_s) class score map
        scores = {s: m.amax(dim=(-2, -1)) for s, m in maps.items()}  # GMP -> (B, K)
        logits = torch.stack([scores[s] for s in self.use_scales], 0).sum(0)  # scores summed over scales
        return {"logits": logits, "maps": maps, "scores": scores}

    @staticmethod
    def _normalise(m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        lo = m.flatten(1).amin(1)[:, None, None]
        hi = m.flatten(1).amax(1)[:, None, None]
        return (m - lo) / (hi - lo).clamp_min(eps)

    @torch.no_grad()
    def cam(self, x: torch.Tensor, class_idx: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Class activation maps at input resolution.

        Args:
            x: (B, C, H, W).
            class_idx: int, (B,) tensor of class indices, or None for each image's predicted class.
        Returns:
            ``{scale: (B, H, W) for each used scale, "joint": (B, H, W)}``; each per-scale map is the class's
            score map bilinearly upsampled to H x W and min-max normalised to [0, 1] per image; ``joint`` is
            their pixel-wise product (Hu et al., Fig. 2(e) analogue).
        """
        out = self.forward(x)
        b = x.shape[0]
        if class_idx is None:
            idx = out["logits"].argmax(1)
        else:
            idx = torch.as_tensor(class_idx, device=x.device).long().reshape(-1).expand(b)
        if bool((idx < 0).any()) or bool((idx >= self.num_classes).any()):
            raise ValueError("class_idx out of range")
        res: dict[str, torch.Tensor] = {}
        joint = None
        for s in self.use_scales:
            m = out["maps"][s][torch.arange(b, device=x.device), idx]  # (B, h, w)
            up = F.interpolate(m[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            up = self._normalise(up)
            res[s] = up
            joint = up if joint is None else joint * up
        res["joint"] = joint
        return res


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Re-estimate BatchNorm running statistics as a plain average over ``batches`` (iterable of (B, C, H, W)).

    With few, large-learning-rate steps (short CPU runs, tests) the exponential running averages lag the weights
    and eval-mode predictions of a GMP network can collapse to one class; one pass over training inputs fixes
    that. Leaves the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


@register("multiscale_cam")
def build_multiscale_cam(in_channels: int = 1, num_classes: int = 3,
                         use_scales: Sequence[str] = ("conv3", "conv4", "conv5"), **kwargs) -> MultiScaleCAMNet:
    """Paper configuration (Hu et al., Fig. 1): widths 32-64-128-256-256, Conv3+Conv4+Conv5 heads."""
    return MultiScaleCAMNet(in_channels=in_channels, num_classes=num_classes, widths=PAPER_WIDTHS,
                            use_scales=use_scales, **kwargs)


@register("multiscale_cam_cpu")
def build_multiscale_cam_cpu(in_channels: int = 1, num_classes: int = 3,
                             use_scales: Sequence[str] = ("conv3", "conv4", "conv5"), **kwargs) -> MultiScaleCAMNet:
    """Same topology as the paper, every width halved (16-32-64-128-128), for CPU runs and tests."""
    return MultiScaleCAMNet(in_channels=in_channels, num_classes=num_classes,
                            widths=tuple(w // 2 for w in PAPER_WIDTHS), use_scales=use_scales, **kwargs)


@register("multiscale_cam_tiny")
def build_multiscale_cam_tiny(in_channels: int = 1, num_classes: int = 2,
                              use_scales: Sequence[str] = ("conv3", "conv4", "conv5"), **kwargs) -> MultiScaleCAMNet:
    """Same topology, widths quartered (8-16-32-64-64): the bundled CPU lesion-presence model (about 12x fewer
    multiply-adds than the paper widths; a 96 x 96 slice runs in a few ms on one core)."""
    return MultiScaleCAMNet(in_channels=in_channels, num_classes=num_classes,
                            widths=tuple(w // 4 for w in PAPER_WIDTHS), use_scales=use_scales, **kwargs)
