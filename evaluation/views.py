"""New views of the training images for the student (mixup, per-image recolouring,
blurring and JPEG re-encoding), and its batch norms' statistics recomputed over such
views after training."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.models.accuracy import normalise
from synthesizers.loop import gaussian_blur


def mix(
    images: torch.Tensor, labels: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, float] | None]:
    """Mixup: λ x + (1 - λ) x[perm] with λ ~ Beta(``alpha``, ``alpha``) (0: unchanged).

    Teacher targets are computed on the mixed images (function matching: the student
    learns the teacher's function between the images too, which a small synthetic set
    alone does not cover)."""
    if alpha <= 0 or len(images) < 2:
        return images, None
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(images), device=images.device)
    return lam * images + (1 - lam) * images[perm], (labels[perm], lam)


def recolour(
    images: torch.Tensor,
    strength: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """Per-image global photometric shifts of normalised images (B, 3, H, W) (0: unchanged).

    In [0, 1] pixel units, each image's contrast about its own mean is scaled by
    U(1 - s, 1 + s), a brightness offset N(0, (s/2)²) and a per-channel offset
    N(0, (s/5)²) are added, and the result is clipped to [0, 1]. Synthetic images share
    one mean colour and brightness (they meet the teacher's statistics with texture
    within each image, not with differences between images), which real images do not;
    a student distilled on them normalises real images with the wrong statistics
    (``benchmarks/student_bn_shift.py``). Teacher targets are computed on the recoloured
    images, as for mixup."""
    if strength <= 0:
        return images
    shape = (len(images), 1, 1, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    pixels = images * std_t + mean_t
    centre = pixels.mean((1, 2, 3), keepdim=True)
    contrast = 1 + strength * (2 * torch.rand(shape, device=images.device) - 1)
    offset = strength / 2 * torch.randn(shape, device=images.device)
    offset = offset + strength / 5 * torch.randn(len(images), 3, 1, 1, device=images.device)
    pixels = ((pixels - centre) * contrast + centre + offset).clamp(0, 1)
    return normalise(pixels, mean, std)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-image Gaussian blur of (B, C, H, W) images with σ ~ U(0, ``sigma``) pixels each
    (0: unchanged), reflect-padded, one separable kernel per image.

    The kernel sums to one, so blurring normalised images equals normalising blurred
    pixels. Synthetic images meet the teacher's statistics with texture: their
    neighbouring pixels differ about three times as much as real images' (0.19 against
    0.057 in [0, 1] units, ``benchmarks/README.md``). Teacher targets are computed on the
    blurred images, as for mixup, so the student also learns the teacher's function on
    smoother images than the set holds."""
    if sigma <= 0:
        return images
    return gaussian_blur(images, sigma * torch.rand(len(images), device=images.device))


JPEG_BEST = 95  # the highest quality a ``data.jpeg`` view draws


def jpeg(
    image: torch.Tensor, lowest: int, generator: torch.Generator, highest: int = JPEG_BEST
) -> torch.Tensor:
    """One uint8 image (3, H, W) encoded as JPEG and decoded again, at a quality drawn
    uniformly from [``lowest``, ``highest``] (``lowest`` 0: unchanged), with PIL's default
    4:2:0 chroma subsampling.

    Synthetic images are stored losslessly; real photographs, and the CIFAR-10 JPEG test
    images (quality 75, 4:2:0), carry the codec's blocking, ringing and halved colour
    resolution, which a student of clean images never saw. Teacher targets are computed on
    the re-encoded image, as for the other views."""
    if lowest <= 0:
        return image
    quality = int(torch.randint(lowest, highest + 1, (1,), generator=generator))
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    strength: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    only: tuple[str, ...] = (),
) -> None:
    """Recompute the running statistics of ``model``'s batch norms (those whose names start
    with one of ``only``; all when empty) over normalised image ``batches``, each
    recoloured at ``strength`` first (:func:`recolour`; 0: as they are): the average of
    the batches' means and variances (exact for one batch; with several, the variance
    between batch means is left out). The other layers normalise with what they have; the
    model is left in eval mode.

    A student distilled on synthetic images keeps their statistics, which differ from real
    images' in how much images differ from one another in contrast and colour; recomputing
    them over recoloured training images, with no real image, moves them towards real
    ones (``benchmarks/student_bn_shift.py``)."""
    chosen = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not only or n.startswith(only))
    ]
    if not chosen:
        raise ValueError(f"no batch norm layer to recalibrate (names starting with {only})")
    model.eval()
    momenta = [m.momentum for m in chosen]
    for module in chosen:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the batches
        module.train()
    for batch in batches:
        model(recolour(batch, strength, mean, std))
    for module, momentum in zip(chosen, momenta, strict=True):
        module.momentum = momentum
    model.eval()
