"""CIFAR ResNets.

``resnet20`` … ``resnet110``: He et al.'s CIFAR ResNet (3 stages of 16/32/64 channels,
option-A shortcuts that subsample and zero-pad, no parameters), with the module names
of the widely used akamaster/pytorch_resnet_cifar10 checkpoints (``conv1``, ``bn1``,
``layer1.0.conv1`` …, ``linear``) so that they load with ``strict=True``.

``resnet18_cifar`` / ``resnet34_cifar``: the ImageNet ResNet-18/34 with a 3×3 stride-1
stem and no max-pool, 1×1-conv shortcuts (``shortcut.0`` conv, ``shortcut.1`` BN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad the new channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, option: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stem, ``len(blocks)`` stages of basic blocks, global average pool, ``linear``."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, option: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if stage == 0 else 2
            layers = []
            for block in range(count):
                layers.append(BasicBlock(in_planes, width, stride if block == 0 else 1, option))
                in_planes = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.linear = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            out = getattr(self, f"layer{stage + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, C)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int) -> CifarResNet:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n + 2 layers, option-A shortcuts."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], [16, 32, 64], num_classes, option="A")


def resnet_cifar_variant(blocks: list[int], num_classes: int) -> CifarResNet:
    """ResNet-18/34 adapted to 32×32 inputs (3×3 stem, no max-pool)."""
    return CifarResNet(blocks, [64, 128, 256, 512], num_classes, option="B")
