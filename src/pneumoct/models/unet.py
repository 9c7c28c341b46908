"""Plain 2D U-Net (Ronneberger et al., MICCAI 2015) -- the segmentation baseline of the JCS comparison
(Wu et al., IEEE TIP 2021, Table VII).

Encoder: ``depth`` max-pool/2 downsamplings, each level a double (3x3 conv, BN, ReLU); widths ``base * 2**level``.
Decoder: transposed-conv x2 (or bilinear x2 + 1x1 conv when ``bilinear=True``) halving the channels, concatenation
with the skip feature, double conv.  Head: 1x1 conv to ``num_classes`` logits (1: sigmoid, >1: softmax).

``forward(x (B, C, H, W))`` with H, W divisible by ``2**depth`` -> ``{"logits": (B, K, H, W)}`` -- the same dict
key as :class:`pneumoct.models.jcs_seg.JCSSegNet`, so training code and
:func:`pneumoct.models.jcs_seg.deep_supervision_loss` handle both.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register
from .blocks import init_conv_bn

__all__ = ["DoubleConv", "UNet", "unet", "unet_cpu"]


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2: (B, cin, h, w) -> (B, cout, h, w)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 1, base: int = 32, depth: int = 4,
                 bilinear: bool = False) -> None:
        super().__init__()
        if depth < 1 or base < 1 or num_classes < 1:
            raise ValueError("depth, base and num_classes must be >= 1")
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(DoubleConv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(depth, 0, -1):
            hi, lo = widths[i], widths[i - 1]
            if bilinear:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                             nn.Conv2d(hi, lo, 1)))
            else:
                self.up.append(nn.ConvTranspose2d(hi, lo, 2, stride=2))
            self.dec.append(DoubleConv(2 * lo, lo))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        m = 2 ** self.depth
        if H % m or W % m:
            raise ValueError(f"UNet(depth={self.depth}) needs H and W divisible by {m}, got {H}x{W}")
        skips = []
        h = x
        for i, blk in enumerate(self.down):
            h = blk(h if i == 0 else self.pool(h))
            skips.append(h)
        h = skips.pop()
        for up, dec in zip(self.up, self.dec):
            h = dec(torch.cat([skips.pop(), up(h)], dim=1))
        return {"logits": self.head(h)}


@register("unet")
def unet(num_classes: int = 1, in_channels: int = 1, **kw: Any) -> UNet:
    """Standard U-Net widths: base 64, depth 4 (64..1024 channels)."""
    kw.setdefault("base", 64)
    return UNet(in_channels=in_channels, num_classes=num_classes, **kw)


@register("unet_cpu")
def unet_cpu(num_classes: int = 1, in_channels: int = 1, **kw: Any) -> UNet:
    """CPU-sized U-Net: base 16, depth 4 (16..256 channels)."""
    kw.setdefault("base", 16)
    return UNet(in_channels=in_channels, num_classes=num_classes, **kw)
