"""Forward hooks that capture feature statistics, registered inside a ``with`` block.

A hook keeps only per-sample channel moments of a layer's input or output (two
(B, C) tensors per layer). The statistics every method needs derive from them:
the batch's (DeepInversion), each class's within the batch (class-conditional),
each image's (impression codes). The autograd graph keeps what the backward pass
needs, and nothing else is stored.
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

    ``moments`` holds the per-sample channel mean E[x] and mean of squares E[x²],
    each (B, C) in float32. The properties and methods below reduce them.
    """

    name: str
    module: nn.Module
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.moments is None:
            raise RuntimeError(f"layer {self.name!r} has not seen a forward pass yet")
        return self.moments

    @property
    def mean(self) -> torch.Tensor:
        """(C,) channel mean over the batch."""
        return self._moments()[0].mean(dim=0)

    @property
    def var(self) -> torch.Tensor:
        """(C,) biased channel variance over the batch."""
        first, second = self._moments()
        mean = first.mean(dim=0)
        return (second.mean(dim=0) - mean * mean).clamp_min(0.0)

    def per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) channel mean and variance of each sample on its own."""
        first, second = self._moments()
        return first, (second - first * first).clamp_min(0.0)

    def per_class(
        self, labels: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, C) mean and variance over each class's samples in the batch, and the
        (K,) sample counts. Classes without samples get zeros (and count 0)."""
        first, second = self._moments()
        counts = torch.bincount(labels, minlength=num_classes).to(first.dtype)
        one_hot = torch.nn.functional.one_hot(labels, num_classes).to(first.dtype)  # (B, K)
        scale = 1.0 / counts.clamp_min(1.0)
        mean = (one_hot.t() @ first) * scale[:, None]
        square = (one_hot.t() @ second) * scale[:, None]
        return mean, (square - mean * mean).clamp_min(0.0), counts


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` in forward-registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
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
            record.moments = moments(inputs[0] if side == "input" else output)

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
