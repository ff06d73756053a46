"""IMAGINE's patch discriminator and its WGAN-GP training step.

The network is the supplement's Table 1: a head and three blocks, each a 3×3 conv
(stride 1, no padding) to ``width`` channels, batch norm and LeakyReLU(0.2), then a 1×1
conv to one channel: a map of patch scores, one per 9×9 receptive field. Its mean over
the map is D(x) (Eq. 7). "Sized for the image resolution": the convolutions are
unpadded, so an image must be larger than the receptive field (2 · blocks + 3 pixels);
the width is configurable (Table 1: 128).

Training is WGAN-GP (Gulrajani et al. 2017), which the paper names but does not detail:
L_D = E[D(fake)] − E[D(real)] + λ_GP E[(‖∇_x̃ D(x̃)‖₂ − 1)²] with x̃ = ε·real + (1 − ε)·fake,
ε ~ U[0, 1] per sample, the gradient norm taken over the whole image (as SinGAN does).
The supplement gives no λ_GP; the default is the WGAN-GP paper's 10.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from synthesizers.loop import adam


class PatchDiscriminator(nn.Module):
    """Table 1: head + ``blocks`` × (conv3×3 → BN → LeakyReLU(0.2)), then conv1×1 → 1."""

    def __init__(self, in_channels: int = 3, width: int = 128, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(1 + blocks):  # the head and the blocks share one form
            layers += [
                nn.Conv2d(channels, width, 3, stride=1),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        self.tail = nn.Conv2d(width, 1, 1, stride=1)
        self.receptive_field = 2 * (1 + blocks) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H − 2(blocks + 1), W − 2(blocks + 1)) patch scores."""
        return self.tail(self.body(x))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) D(x): the mean patch score of each image (Eq. 7)."""
        return self.forward(x).flatten(1).mean(dim=1)


def interpolate(real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """x̃ = ε·real + (1 − ε)·fake, with ``epsilon`` (B,) one mixing weight per sample."""
    weight = epsilon.view(-1, *([1] * (real.ndim - 1))).to(real.dtype)
    return weight * real + (1.0 - weight) * fake


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor
) -> torch.Tensor:
    """E[(‖∇_x̃ D(x̃)‖₂ − 1)²] on the interpolates x̃ of ``real`` and ``fake`` (B, C, H, W);
    differentiable in the critic's parameters (``create_graph``)."""
    mixed = interpolate(real.detach(), fake.detach(), epsilon).requires_grad_(True)
    scores = critic.score(mixed)
    (gradient,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def critic_loss(
    critic: PatchDiscriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    penalty_weight: float,
    epsilon: torch.Tensor,
) -> torch.Tensor:
    """The WGAN-GP critic loss E[D(fake)] − E[D(real)] + λ_GP · penalty (minimised)."""
    loss = critic.score(fake.detach()).mean() - critic.score(real.detach()).mean()
    if penalty_weight:
        loss = loss + penalty_weight * gradient_penalty(critic, real, fake, epsilon)
    return loss


def build_discriminator(
    image_shape: tuple[int, int, int], seed: int, config: Any, device: torch.device
) -> tuple[PatchDiscriminator, torch.optim.Adam]:
    """A fresh discriminator for one request (weights seeded from ``seed + 1``, leaving
    the images' random stream alone) and its Adam, from an IMAGINE config's
    ``discriminator_*`` fields; ValueError when the images are smaller than its
    receptive field."""
    size = min(image_shape[1:])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1)
        network = PatchDiscriminator(
            image_shape[0], config.discriminator_width, config.discriminator_blocks
        )
    if size <= network.receptive_field:
        raise ValueError(
            f"{size}-pixel images are too small for a {config.discriminator_blocks}-block patch "
            f"discriminator (receptive field {network.receptive_field}); lower "
            "discriminator_blocks"
        )
    network.to(device).train().requires_grad_(False)  # trained in after_step only
    optimizer = adam(
        list(network.parameters()),
        config.discriminator_lr,
        config.discriminator_betas,
        config.fused_optimizer,
    )
    return network, optimizer
