"""The plain parts of the shared loop: freezing the teacher, the optimiser, the one sum of
the weighted loss terms, the teacher input's augmentation (jitter, flip, per-image
Gaussian blur), and the record a run keeps (its final terms, early-stopping
checks, and with ``keep_best`` the lowest-loss iterate)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: only the input is optimised."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def adam(
    parameters: list[torch.Tensor], lr: float, betas: tuple[float, float], fused: bool = True
) -> torch.optim.Adam:
    """Adam with its fused kernel when ``fused`` and torch has one for the parameters'
    device (CUDA; CPU since torch 2.4), else the multi-tensor (foreach) kernel;
    ``fused=False`` is the plain per-tensor loop."""
    if not fused:
        return torch.optim.Adam(parameters, lr=lr, betas=betas, foreach=False)
    try:
        return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(parameters, lr=lr, betas=betas, foreach=True)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each of the (B, C, H, W) ``images`` blurred by a Gaussian of its own σ (``sigmas``,
    (B,), in pixels; 0 leaves an image as it is), reflect-padded, one separable kernel
    per image for all its channels. The kernel sums to one, so blurring normalised images
    equals normalising blurred pixels. Differentiable in the images."""
    batch, channels, height, width = images.shape
    largest = float(sigmas.max()) if len(sigmas) else 0.0
    if largest <= 0:
        return images
    radius = max(1, min(int(3 * largest + 0.5), height // 2 - 1, width // 2 - 1))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigmas = sigmas.to(images.device, images.dtype).view(-1, 1).clamp_min(1e-3)
    kernel = torch.exp(-(offsets**2) / (2 * sigmas**2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def jitter_flip_blur(
    images: torch.Tensor, rng: random.Random, jitter: int, flip: bool, blur: float
) -> torch.Tensor:
    """The batch rolled by up to ``jitter`` pixels, flipped with ``flip`` at random, and
    each image blurred by a Gaussian of σ ~ U(0, ``blur``) pixels (0: none), all drawn
    from ``rng``."""
    if jitter:
        dx, dy = rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if flip and rng.random() < 0.5:
        images = torch.flip(images, dims=(3,))
    if blur:
        images = gaussian_blur(images, torch.tensor([rng.uniform(0, blur) for _ in images]))
    return images


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one place where loss terms are summed. A term without a weight is an error."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"loss terms without a weight: {', '.join(missing)}")
    total = None
    for name, value in terms.items():
        weight = weights[name]
        if weight == 0.0:
            continue
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("every loss term has weight 0: nothing to optimise")
    return total


@dataclass
class LoopRecord:
    """What the loop reports back to ``synthesize``."""

    final: dict[str, torch.Tensor] = field(default_factory=dict)
    iterations: int = 0
    checks: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # terms of the kept iterate
    best_images: torch.Tensor | None = None  # (B, C, H, W) normalised, as optimised

    def keep_if_best(
        self, images: torch.Tensor, terms: dict[str, torch.Tensor], total: torch.Tensor
    ) -> None:
        """Keep ``images`` (the iterate the loss was computed on, before its step: a
        copy, since pixels are updated in place) and its terms when their total is the
        lowest so far. On the device, with ``torch.where``: no host synchronisation."""
        current = {**{k: v.detach() for k, v in terms.items()}, "total": total.detach()}
        images = images.detach()
        if self.best_images is None:  # copies: a CUDA graph's next replay reuses its outputs
            self.best = {k: v.clone() for k, v in current.items()}
            self.best_images = images.clone()
            return
        better = current["total"] < self.best["total"]  # a 0-d bool tensor
        self.best = {k: torch.where(better, v, self.best[k]) for k, v in current.items()}
        self.best_images = torch.where(better, images, self.best_images)
