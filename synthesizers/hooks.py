"""Forward hooks that capture feature statistics, registered inside a ``with`` block.

A hook keeps only per-sample channel moments of a layer's input or output (two
(B, C) tensors per layer: mean and centred variance). The statistics every method
needs derive from them: the batch's (DeepInversion), each class's within the batch
(class-conditional), each image's (impression codes). The autograd graph keeps what
the backward pass needs, and nothing else is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from synthesizers.losses import sample_moments

SIDES = ("input", "output")


@dataclass
class LayerStatistics:
    """The moments one hook saw on the last forward pass.

    ``sample`` holds each sample's channel mean and (biased, centred) variance, each
    (B, C) in float32. The properties and methods below combine them over samples with
    the parallel (Chan et al.) formula, exact for equal-sized maps: the variance of a
    group is the mean of its samples' variances plus the variance of their means. No
    statistic is ever E[x²] − E[x]², which cancels catastrophically in float32 for
    features with a large mean and a small spread.
    """

    name: str
    module: nn.Module
    sample: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sample is None:
            raise RuntimeError(f"layer {self.name!r} has not seen a forward pass yet")
        return self.sample

    @property
    def mean(self) -> torch.Tensor:
        """(C,) channel mean over the batch."""
        return self._sample()[0].mean(dim=0)

    @property
    def var(self) -> torch.Tensor:
        """(C,) biased channel variance over the batch."""
        mean, var = self._sample()
        centre = mean.mean(dim=0)
        return var.mean(dim=0) + (mean - centre).square().mean(dim=0)

    def per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) channel mean and variance of each sample on its own."""
        return self._sample()

    def per_class(
        self, labels: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, C) mean and variance over each class's samples in the batch, and the
        (K,) sample counts. Classes without samples get zeros (and count 0)."""
        mean, var = self._sample()
        counts = torch.bincount(labels, minlength=num_classes).to(mean.dtype)
        one_hot = torch.nn.functional.one_hot(labels, num_classes).to(mean.dtype)  # (B, K)
        scale = 1.0 / counts.clamp_min(1.0)
        class_mean = (one_hot.t() @ mean) * scale[:, None]  # (K, C)
        spread = (mean - class_mean[labels]).square()  # (B, C) around the own class's mean
        class_var = (one_hot.t() @ (var + spread)) * scale[:, None]
        return class_mean, class_var, counts


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.BatchNorm2d`` of ``model`` in forward-registration order.

    Only the 2-D kind, as the authors' DeepInversion and NaturalInversion hooks: the
    statistics are per channel over batch and space, which a BatchNorm1d on pooled
    vectors (or a 3-D one) does not have in the same form."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution of ``model`` in forward-registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
    ]


def named_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules called ``names``; an unknown name is a ``KeyError`` listing valid ones."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules or not name]
    if missing:
        valid = [n for n, m in modules.items() if n and not list(m.children())]
        shown = ", ".join(valid[:40]) + (" …" if len(valid) > 40 else "")
        raise KeyError(f"no layer named {', '.join(map(repr, missing))}; valid layers: {shown}")
    return [(name, modules[name]) for name in names]


@contextmanager
def capture_statistics(
    layers: Sequence[tuple[str, nn.Module]],
    side: str = "input",
    moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = sample_moments,
) -> Iterator[list[LayerStatistics]]:
    """Record the per-sample channel moments of each layer's ``side`` ("input" or
    "output") on every forward pass.

    Yields one :class:`LayerStatistics` per layer, refreshed by each forward pass.
    The hooks are removed when the block exits, also on an exception.
    """
    if side not in SIDES:
        raise ValueError(f"side must be input or output, got {side!r}")
    records = [LayerStatistics(name, module) for name, module in layers]
    handles = []

    def make_hook(record: LayerStatistics) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            record.sample = moments(inputs[0] if side == "input" else output)

        return hook

    try:
        for record in records:
            handles.append(record.module.register_forward_hook(make_hook(record)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def capture_input_statistics(
    layers: Sequence[tuple[str, nn.Module]],
) -> AbstractContextManager[list[LayerStatistics]]:
    """:func:`capture_statistics` of each layer's input."""
    return capture_statistics(layers, "input")
