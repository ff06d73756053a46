"""What the loop optimises: something whose ``forward()`` returns normalised images.

Pixels by default; a method may optimise a generator instead (NaturalInversion) by
returning another :class:`Parametrisation` from ``Synthesizer.parametrise``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def normalise(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) -> the teacher's normalised input ``(x - mean) / std``,
    on the images' device. The one normaliser of every synthesizer."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class Parametrisation(nn.Module):
    """The thing optimised. ``forward()`` returns normalised images (B, C, H, W)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def project(self) -> None:
        """Constrain the parameters after an optimiser step (nothing by default)."""

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1]."""
        return (images * self.std + self.mean).clamp(0.0, 1.0)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the teacher's normalised input."""
        return normalise(images, self.mean, self.std)


@dataclass(frozen=True)
class Start:
    """Where pixel optimisation starts, in the teacher's normalised space: ``noise``,
    N(0, 1) per pixel (the papers'), or ``smooth``, N(0, 1) drawn at a quarter of each
    side, bilinearly upsampled and rescaled to unit standard deviation. At a short budget
    the per-pixel noise is still in the images at the end (their neighbour differences
    are 3x real images'); the smooth start has only low frequencies for the loss to build
    on.

    The pattern's channels correlate by ``correlation`` (0: independent, the papers'),
    each keeping unit variance: in real images colour channels vary together (within an
    image, 0.88-0.95 between CIFAR-10's channels, 95% of the variance along one direction:
    brightness), while independent channels start every image in saturated colours that
    100 class-conditional iterations leave at a correlation of 0.34-0.60. The pattern is
    multiplied by ``scale``, and ``tint`` adds one N(0, tint²) offset per image and
    channel: a colour of each image's own, which matching batch statistics does not ask
    for (from an untinted start the images of a class end with nearly one mean colour: a
    spread of 0.02-0.04 in [0, 1] units against real images' 0.13)."""

    kind: str = "noise"
    scale: float = 1.0
    tint: float = 0.0
    correlation: float = 0.0

    def draw(self, batch: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
        channels, height, width = image_shape
        if self.kind == "noise":
            pattern = torch.randn(batch, *image_shape)
        else:
            coarse = torch.randn(batch, channels, max(1, height // 4), max(1, width // 4))
            fine = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
            pattern = fine / fine.std().clamp_min(1e-6)
        start = self.scale * correlate_channels(pattern, self.correlation)
        if self.tint:
            start = start + self.tint * torch.randn(batch, channels, 1, 1)
        return start


def correlate_channels(pattern: torch.Tensor, correlation: float) -> torch.Tensor:
    """Mix the channels of ``pattern`` (B, C, H, W; independent, equal variances) so that
    every two correlate by ``correlation`` and each keeps its variance: the symmetric
    square root of the covariance (1 - ρ) I + ρ 11ᵀ, that is a I + b 11ᵀ with
    a = √(1 - ρ) and b = (√(1 + (C - 1) ρ) - a) / C."""
    if not correlation:
        return pattern
    channels = pattern.shape[1]
    a = (1 - correlation) ** 0.5
    b = ((1 + (channels - 1) * correlation) ** 0.5 - a) / channels
    return a * pattern + b * pattern.sum(1, keepdim=True)


class PixelImages(Parametrisation):
    """Pixels optimised directly, in the teacher's normalised space, started from
    ``init`` images or drawn from ``start`` and, with ``clip``, clipped to the valid range
    after each step (as DeepInversion's ImageNet script; its CIFAR script never clips)."""

    def __init__(
        self,
        batch: int,
        image_shape: tuple[int, int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        init: torch.Tensor | None = None,
        clip: bool = True,
        start: Start = Start(),
    ) -> None:
        super().__init__(mean, std)
        init = start.draw(batch, image_shape) if init is None else self.normalise(init)
        self.pixels = nn.Parameter(init)  # (B, C, H, W)
        self.clip = clip

    def forward(self) -> torch.Tensor:
        return self.pixels

    @torch.no_grad()
    def project(self) -> None:
        if self.clip:
            self.pixels.copy_(self.clipped(self.pixels))

    def clipped(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``images`` clipped to the valid [0, 1] range."""
        low, high = (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std
        return torch.maximum(torch.minimum(images, high), low)


class SpectralImages(PixelImages):
    """Pixels optimised through their 2-D Fourier coefficients (orthonormal real FFT),
    each scaled by 1 / max(f, 1)^``decay`` for its frequency f in cycles per image.

    The images start where :class:`PixelImages` would; only the optimiser's coordinates
    change. Adam moves every parameter by about the learning rate whatever its gradient's
    size, so a coefficient of frequency f moves the image by about lr / f^decay: the low
    frequencies take the steps and the fine detail, where a teacher's evidence is least
    like real images' (JPEG at quality 75 changes the teacher's answer for 28% of the
    smooth start's class-conditional images against 1% of real ones), grows slowly.
    Feature visualisation optimises in such a decorrelated space for the same reason; at
    a short budget and the same learning rate it leaves the images less formed
    (``benchmarks/README.md``). With ``clip`` the images are clipped to the valid range
    after each step and the coefficients recomputed from them."""

    def __init__(self, *args: Any, decay: float = 1.0, **kwargs: Any) -> None:
        """:class:`PixelImages`' arguments, and the ``decay`` of the coefficients' scale."""
        super().__init__(*args, **kwargs)
        height, width = self.pixels.shape[-2:]
        rows = torch.fft.fftfreq(height) * height
        columns = torch.fft.rfftfreq(width) * width
        frequency = (rows[:, None] ** 2 + columns[None, :] ** 2).sqrt()
        self.register_buffer("scale", frequency.clamp_min(1.0) ** -decay)
        pixels = self.pixels.detach()
        del self.pixels
        self.coefficients = nn.Parameter(self._coefficients(pixels))
        self.size = (height, width)

    def _coefficients(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.fft.rfft2(pixels, norm="ortho") / self.scale)

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.coefficients) * self.scale
        return torch.fft.irfft2(spectrum, s=self.size, norm="ortho")

    @torch.no_grad()
    def project(self) -> None:
        if self.clip:
            self.coefficients.copy_(self._coefficients(self.clipped(self.forward())))


def pixel_images(
    batch: int,
    image_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    init: torch.Tensor | None,
    clip: bool,
    start: Start,
    spectrum: float = 0.0,
) -> PixelImages:
    """Pixels optimised directly, or through their spectrum when ``spectrum`` > 0."""
    if spectrum:
        return SpectralImages(batch, image_shape, mean, std, init, clip, start, decay=spectrum)
    return PixelImages(batch, image_shape, mean, std, init, clip, start)
