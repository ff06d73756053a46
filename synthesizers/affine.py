"""Eval-mode batch norm as one multiply-add, for the duration of a ``with`` block.

A frozen teacher's BatchNorm in eval mode is a per-channel affine map,
y = x·s + t with s = γ/√(σ̂² + ε) and t = β − μ̂·s. On CPUs the general batch-norm
kernels cost several times one ``addcmul`` forward and one ``mul`` backward (bf16,
channels_last), and this is all the synthesis loop needs. The modules stay in place
(hooks on them still fire); only their ``forward`` is replaced inside the block, and
restored when it exits, also on an exception. Layers in training mode are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _affine_forward(module: nn.modules.batchnorm._BatchNorm):
    with torch.no_grad():
        scale = torch.rsqrt(module.running_var.float() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.float()
        shift = -module.running_mean.float() * scale
        if module.bias is not None:
            shift = shift + module.bias.float()
    # every dtype the loop computes in, cast here (bf16 under autocast: rounded as autocast
    # rounds weights), never inside the step: a compiled step that filled a cache would
    # return the cast tensors as extra outputs, and under CUDA graphs (compile on a GPU)
    # the next replay overwrites them while the cache still holds them
    cache = {
        dtype: (scale.to(dtype), shift.to(dtype))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    }

    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = (1, -1, *([1] * (x.ndim - 2)))  # (1, C, 1, 1)
        s, t = cache.get(x.dtype) or (scale.to(x.dtype), shift.to(x.dtype))
        return torch.addcmul(t.view(dims), x, s.view(dims))

    return forward


@contextmanager
def affine_batchnorm(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, each eval-mode batch-norm layer of ``layers`` computes x·s + t."""
    patched = []
    try:
        for module in layers:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
                if module.running_var is None:
                    continue  # track_running_stats=False: batch statistics even in eval
                module.forward = _affine_forward(module)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
