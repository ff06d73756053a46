"""Pure loss functions shared by the synthesizers.

Every function takes tensors and returns a scalar tensor; weights are applied by the
caller (:class:`synthesizers.base.LossTerms`), never here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """L2 total variation of images ``x`` (B, C, H, W), as DeepInversion defines it.

    The sum of the Euclidean norms of horizontal, vertical and both diagonal
    neighbour differences, averaged over nothing: it grows with the batch.
    """
    dx = x[:, :, :, :-1] - x[:, :, :, 1:]
    dy = x[:, :, :-1, :] - x[:, :, 1:, :]
    d1 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d2 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return dx.norm() + dy.norm() + d1.norm() + d2.norm()


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the images ``x`` (B, C, H, W)."""
    return x.norm()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, K) against integer ``labels`` (B,)."""
    return F.cross_entropy(logits.float(), labels)


def statistics_distance(
    mean: torch.Tensor, var: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor
) -> torch.Tensor:
    """‖μ − μ̂‖₂ + ‖σ² − σ̂²‖₂ for channel statistics of shape (C,)."""
    return (mean - target_mean).norm() + (var - target_var).norm()


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel mean E[x] and mean of squares E[x²] of a feature map
    (B, C, H, W) -> (B, C), (B, C), in float32 whatever the autocast dtype."""
    x = x.float()
    return x.mean(dim=(2, 3)), (x * x).mean(dim=(2, 3))


class _FusedMoments(torch.autograd.Function):
    """E[x] and E[x²] over the spatial dims with a hand-written backward.

    Autograd through ``x.float()``, ``x * x`` and two means stores an fp32 copy and its
    square and runs five elementwise kernels backward; here the forward reads one fp32
    copy twice and the backward is one ``addcmul`` in ``x``'s dtype (bf16 under
    autocast, like the convolutions' backward): ∂/∂x = g₁/n + 2x·g₂/n. Only ``x`` is
    saved, which the layer that consumes it keeps anyway.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        dims = tuple(range(2, x.ndim))
        n = x[0, 0].numel()
        wide = x.float()  # one fp32 copy when x is bf16/fp16; x itself when fp32
        first = wide.mean(dim=dims)
        second = torch.linalg.vector_norm(wide, 2, dim=dims).square_().div_(n)
        return first, second

    @staticmethod
    def backward(ctx: Any, grad_first: torch.Tensor, grad_second: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        n = x[0, 0].numel()
        shape = (*x.shape[:2], *([1] * (x.ndim - 2)))  # (B, C, 1, 1)
        offset = (grad_first / n).to(x.dtype).view(shape)
        scale = (grad_second * (2.0 / n)).to(x.dtype).view(shape)
        return torch.addcmul(offset, x, scale)


def fused_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_moments` (same values within float32 rounding), faster: one
    reduction pass per moment and a single-kernel backward. (B, C, ...) -> (B, C), (B, C)."""
    if x.ndim < 3:
        raise ValueError(f"feature maps need spatial dims (B, C, H, W), got shape {tuple(x.shape)}")
    return _FusedMoments.apply(x)


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a feature map (B, C, H, W) -> (C,), (C,).

    Computed in float32 whatever the autocast dtype: the statistics are small and
    their differences are what the loss is made of.
    """
    x = x.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return mean, var
