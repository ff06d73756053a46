"""Forward hooks that capture feature statistics, registered inside a ``with`` block.

The hooks keep only per-channel statistics (a few floats per layer): the autograd
graph keeps what the backward pass needs, and nothing else is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from synthesizers.losses import channel_statistics


@dataclass
class LayerStatistics:
    """The statistics one hook saw on the last forward pass."""

    name: str
    module: nn.Module
    mean: torch.Tensor | None = None  # (C,)
    var: torch.Tensor | None = None  # (C,)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` in forward-registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


@contextmanager
def capture_input_statistics(
    layers: Sequence[tuple[str, nn.Module]],
    statistics: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = channel_statistics,
) -> Iterator[list[LayerStatistics]]:
    """Record the channel mean and variance of each layer's input on every forward.

    Yields one :class:`LayerStatistics` per layer, refreshed by each forward pass.
    The hooks are removed when the block exits, also on an exception.
    """
    records = [LayerStatistics(name, module) for name, module in layers]
    handles = []

    def make_hook(record: LayerStatistics) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            record.mean, record.var = statistics(inputs[0])

        return hook

    try:
        for record in records:
            handles.append(record.module.register_forward_hook(make_hook(record)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
