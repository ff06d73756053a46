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


def total_variation_l1(x: torch.Tensor) -> torch.Tensor:
    """L1 total variation of images ``x`` (B, C, H, W), as DeepInversion's ImageNet script
    defines it: the mean absolute difference of the same four neighbour pairs, summed."""
    dx = x[:, :, :, :-1] - x[:, :, :, 1:]
    dy = x[:, :, :-1, :] - x[:, :, 1:, :]
    d1 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d2 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return dx.abs().mean() + dy.abs().mean() + d1.abs().mean() + d2.abs().mean()


def l2_prior(x: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Euclidean norm of the images ``x`` (B, C, H, W): of the whole batch as one vector
    (DeepInversion's CIFAR script), or with ``per_image`` each image's, averaged over the
    batch (its ImageNet script)."""
    if per_image:
        return x.flatten(1).norm(dim=1).mean()
    return x.norm()


def squared_l2_prior(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂² of each image of ``x`` (B, C, H, W), averaged over the batch (IMAGINE's Eq. 2
    prior β‖x̂‖², per image like its other terms)."""
    return x.float().square().flatten(1).sum(dim=1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, K) against integer ``labels`` (B,)."""
    return F.cross_entropy(logits.float(), labels)


def statistics_distance(
    mean: torch.Tensor, var: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor
) -> torch.Tensor:
    """‖μ − μ̂‖₂ + ‖σ² − σ̂²‖₂ for channel statistics of shape (C,)."""
    return (mean - target_mean).norm() + (var - target_var).norm()


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel mean and biased variance of a feature map (B, C, H, W) ->
    (B, C), (B, C), in float32 whatever the autocast dtype.

    The variance is centred (Welford in ``var_mean``), never E[x²] − E[x]²: for features
    with a large mean and a small spread that difference of two large fp32 numbers
    loses every digit of the variance (a mean of 1,000 leaves a resolution of about
    0.06 in E[x²]), and the variance is what the statistics losses compare."""
    var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    return mean, var


class _FusedMoments(torch.autograd.Function):
    """Per-sample channel mean and variance over the spatial dims, hand-written backward.

    Autograd through ``x.float()`` and ``var_mean`` keeps an fp32 copy of ``x`` for the
    backward; here only ``x`` (which the layer that consumes it keeps anyway) and the
    (B, C) means are saved, and the backward runs in ``x``'s dtype (bf16 under autocast,
    like the convolutions' backward): ∂/∂x = g_μ/n + 2(x − μ)·g_σ²/n. Centring ``x``
    before scaling keeps that difference exact where the mean is large.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = tuple(range(2, x.ndim))
        # one fp32 copy when x is bf16/fp16 (x itself when fp32), one Welford pass
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x[0, 0].numel()
        shape = (*x.shape[:2], *([1] * (x.ndim - 2)))  # (B, C, 1, 1)
        offset = (grad_mean / n).to(x.dtype).view(shape)
        scale = (grad_var * (2.0 / n)).to(x.dtype).view(shape)
        centred = x - mean.to(x.dtype).view(shape)
        return centred.mul_(scale).add_(offset)


def fused_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_moments` (same values within float32 rounding), faster: one
    reduction pass and a backward that keeps no fp32 copy. (B, C, ...) -> (B, C), (B, C)."""
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
