"""Shared ResNet building blocks (He et al., 2016), written out so the package needs no torchvision/timm.

``ResNet`` is a *trunk*: a stem (7x7/2 conv + 3x3/2 max-pool) and four stages ("ResBlock1..4"); its
``forward`` returns the list of the four stage outputs (strides 4, 8, 16, 32). There is no classifier.
Families that need to inject something between stages (e.g. M3Lung-Sys concatenates coordinate maps before
ResBlock4) call ``trunk.stem`` and ``trunk.stages[i]`` themselves and ask for ``extra_in_channels``.

Depths: 10/18/34 use :class:`BasicBlock`, 50/101/152 use :class:`Bottleneck` (torchvision's v1.5 layout:
stride on the 3x3 conv). ``widths`` are the per-stage *planes* (64,128,256,512 for the standard nets; the
output channels are ``planes * block.expansion``). No pretrained weights are downloaded here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "resnet_trunk"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1
    # (conv, batch norm) attribute pairs where the norm takes only that conv's output: foldable for inference
    # (pneumoct.models.checkpoint.fold_batch_norms)
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Bottleneck(nn.Module):
    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def init_conv_bn(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit/zero BatchNorm: the usual ResNet-family initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ResNet trunk returning the four stage outputs.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        in_channels: image channels.
        widths: planes per stage.
        extra_in_channels: channels concatenated (by the caller) to the *input* of each stage; stage ``i``'s
            first block then takes ``out_channels[i-1] + extra_in_channels[i]`` channels.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int], in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512),
                 extra_in_channels: Sequence[int] = (0, 0, 0, 0)) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or len(extra_in_channels) != 4:
            raise ValueError("layers, widths and extra_in_channels need 4 entries each")
        self.block = block
        stem_w = int(widths[0])
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_w), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        cin = stem_w
        stages = []
        self.out_channels: list[int] = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            cin += int(extra_in_channels[i])
            stages.append(self._make_stage(block, cin, int(w), int(n), stride=1 if i == 0 else 2))
            cin = int(w) * block.expansion  # type: ignore[attr-defined]
            self.out_channels.append(cin)
        self.stages = nn.ModuleList(stages)
        self._init_weights()

    @staticmethod
    def _make_stage(block: type[nn.Module], cin: int, planes: int, n: int, stride: int) -> nn.Sequential:
        cout = planes * block.expansion  # type: ignore[attr-defined]
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        mods = [block(cin, planes, stride, down)]
        mods += [block(cout, planes) for _ in range(1, max(1, n))]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        init_conv_bn(self)
        # zero-init the last BN of each residual branch (Goyal et al.): blocks start as identities
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for st in self.stages:
            x = st(x)
            outs.append(x)
        return outs


def resnet_trunk(depth: int = 50, in_channels: int = 3, width_mult: float = 1.0,
                 extra_in_channels: Sequence[int] = (0, 0, 0, 0)) -> ResNet:
    """A standard-depth trunk; ``width_mult`` scales the planes (0.5 = halved widths for CPU)."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(RESNET_SPECS)}")
    block, layers = RESNET_SPECS[depth]
    widths = tuple(max(1, int(round(w * width_mult))) for w in (64, 128, 256, 512))
    return ResNet(block, layers, in_channels, widths, extra_in_channels)
