"""Other CIFAR classifiers in common use as teachers and students: VGG-11 with batch
norm, MobileNetV2 (stride-1 stem) and Wide ResNet 40-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VGGCifar(nn.Module):
    """VGG with batch norm for 32×32 inputs and a single linear classifier."""

    def __init__(self, plan: list[int | str], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


def vgg11_bn_cifar(num_classes: int) -> VGGCifar:
    return VGGCifar([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        self.block = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(True),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    # (expansion, out_planes, blocks, stride); the first strides are 1 for 32×32 inputs
    PLAN = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True)
        )
        layers, channels = [], 32
        for expansion, out_planes, blocks, stride in self.PLAN:
            for block in range(blocks):
                layers.append(
                    InvertedResidual(channels, out_planes, expansion, stride if block == 0 else 1)
                )
                channels = out_planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(True)
        )
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.layers(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def mobilenetv2_cifar(num_classes: int) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes)


class WideBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths[1:]):
            for block in range(n):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(WideBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn40_2(num_classes: int) -> WideResNet:
    return WideResNet(40, 2, num_classes)
