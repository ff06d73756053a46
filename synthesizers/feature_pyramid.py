"""A teacher's downsampling points and the Feature Transfer Pyramid built on them.

NaturalInversion (Kim et al., AAAI 2022) feeds the teacher's multi-scale feature maps
F = {f_1 … f_N} back into the image: f_n is taken "at the downsampling point", the
last feature map at each spatial resolution. :func:`find_pyramid` finds those points
from the module graph with one dummy forward pass, so any convolutional teacher works
(CIFAR ResNets: ``layer1`` … ``layer3``; a torchvision ResNet-18 at 224: the stem's
``relu`` at 112 and ``layer1`` … ``layer4``). Where a block widens or normalises its
input before its strided convolution (MobileNetV2's expansion, a pre-activation WRN's
BN), the level is that map, the strided convolution's input, rather than the previous
block's output; ``pyramid_layers`` in the method's config picks other modules.

:class:`FeatureTransferPyramid` is Eq. 5, read with the index of the paper's text ("the
output of the FTP block is summed with f_{N−1}"; Eq. 5 writes f_{N−l}, one level off):

    m_1 = W1_1(Φ(f_N)),   m_l = W1_l(Φ(W3_l(m_{l−1} ⊕ f_{N−l+1}))),  l = 2 … N,

Φ upsampling to the next shallower map's resolution (for m_N: the image's), W1_l a 1×1
convolution to that map's channels (for m_N: the image's), W3_l a 3×3 convolution that
keeps the channels. L = N, and m_N is an image-sized, image-channelled map.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PyramidLevel:
    """One downsampling point: the module whose output is f_n, and that output's shape."""

    name: str
    channels: int
    size: tuple[int, int]  # (H, W)


@torch.no_grad()
def find_pyramid(
    model: nn.Module, image_shape: tuple[int, int, int], names: Sequence[str] = ()
) -> list[PyramidLevel]:
    """The feature maps f_1 … f_N of ``model`` for (C, H, W) inputs, shallowest first.

    A dummy forward pass records each module's output; for every spatial size larger than
    1×1 (a 1×1 map is a pooled vector), the module that last produced a 4-D output of
    that size is its level. Only modules called once per forward pass qualify (a shared
    activation called at several points has no single output). ``names`` picks the
    modules instead (any order; sorted shallowest first); an unknown or unsuitable name is
    a ``ValueError`` listing the candidates.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    calls: Counter[str] = Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                shapes[name] = tuple(output.shape[1:])
                order.append(name)

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        model(torch.zeros(2, *image_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    candidates = [n for n in dict.fromkeys(order) if calls[n] == 1 and shapes[n][1:] != (1, 1)]
    if names:
        missing = [n for n in names if n not in candidates]
        if missing:
            raise ValueError(
                f"pyramid layers {missing} are not modules with one 4-D output per forward "
                f"pass; candidates: {', '.join(candidates)}"
            )
        chosen = list(names)
    else:
        last: dict[tuple[int, ...], str] = {}
        for name in candidates:  # in the order their forward passes ended
            last[shapes[name][1:]] = name
        chosen = list(last.values())
    if not chosen:
        raise ValueError("the teacher has no spatial feature maps for a feature pyramid")
    levels = [PyramidLevel(n, shapes[n][0], (shapes[n][1], shapes[n][2])) for n in chosen]
    return sorted(levels, key=lambda level: -level.size[0] * level.size[1])


@contextmanager
def tap_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Inside the block, ``outputs[i]`` is the last output of ``modules[i]``; the hooks
    are removed when the block exits, also on an exception."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            outputs[index] = output

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class FeatureTransferPyramid(nn.Module):
    """P: feature maps f_1 … f_N (shallowest first) -> m_N (B, C, H, W), Eq. 5."""

    def __init__(self, levels: Sequence[PyramidLevel], image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        deepest_first = list(levels)[::-1]
        channels, height, width = image_shape
        targets = [(lv.channels, lv.size) for lv in deepest_first[1:]] + [
            (channels, (height, width))
        ]
        self.sizes = [size for _, size in targets]
        # W3_l for l = 2 … N: on m_{l-1} ⊕ f_{N-l+1}, channels kept
        self.mix = nn.ModuleList(
            nn.Conv2d(lv.channels, lv.channels, 3, padding=1) for lv in deepest_first[1:]
        )
        # W1_l for l = 1 … N: to the next shallower map's channels (the image's for m_N)
        self.project = nn.ModuleList(
            nn.Conv2d(lv.channels, out, 1)
            for lv, (out, _) in zip(deepest_first, targets, strict=True)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        m: torch.Tensor | None = None
        for level, f in enumerate(reversed(features)):  # f_N first
            x = f if m is None else self.mix[level - 1](m + f)
            # W1 ∘ Φ = Φ ∘ W1: both are linear per pixel and the interpolation weights sum
            # to one, so the 1×1 convolution runs before upsampling, at the lower resolution
            x = self.project[level](x)
            if tuple(x.shape[-2:]) != self.sizes[level]:
                x = F.interpolate(x, size=self.sizes[level], mode="bilinear", align_corners=False)
            m = x
        assert m is not None
        return m
