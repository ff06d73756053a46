"""IMAGINE's parts that are not the loop: the default layers Φ of a teacher, guidance
images and region masks brought to the teacher's geometry, and the per-sample
distribution-matching distance (Eq. 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthesizers.hooks import LayerStatistics

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (N, C) mean, std


def default_layers(model: nn.Module) -> list[str]:
    """Φ for ``model`` when ``layers`` is not set (the rules of the module docstring)."""
    modules = dict(model.named_modules())
    stages = []
    while f"layer{len(stages) + 1}" in modules:
        stages.append(f"layer{len(stages) + 1}")
    if stages and "conv1" in modules:
        if "maxpool" in modules and "fc" in modules:  # torchvision ImageNet ResNet
            return ["conv1", *[f"{s}.{len(modules[s]) - 1}" for s in stages[:3]]]
        return ["bn1" if "bn1" in modules else "conv1", *stages]
    return downsampling_ends(model)


def downsampling_ends(model: nn.Module) -> list[str]:
    """The last conv/BN before every strided conv or pooling layer, and the last one."""
    ends: list[str] = []
    previous = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            strided = isinstance(module, nn.modules.conv._ConvNd) and max(module.stride) > 1
            if strided and previous:
                ends.append(previous)
            previous = name
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and previous:
            ends.append(previous)
    if previous:
        ends.append(previous)
    if not ends:
        raise ValueError("the teacher has no convolutions: name the layers (synthesizer.layers)")
    return list(dict.fromkeys(ends))


@dataclass
class Reference:
    """Images whose statistics x̂ matches at ``layers``: row ``index[b]`` for sample b."""

    name: str
    images: torch.Tensor  # (N, C, H, W) normalised
    layers: list[str]
    index: torch.Tensor  # (B,) int64


def as_images(
    value: Any, name: str, shape: tuple[int, int, int], batch: int | None = None
) -> torch.Tensor:
    """Guidance images in [0, 1] as float (N, C, H, W) of the teacher's ``shape``: a
    single (C, H, W) image gets a batch dim, greyscale becomes RGB, other sizes are
    resized; another channel count is a ValueError naming ``name``."""
    if not isinstance(value, torch.Tensor) or value.ndim not in (3, 4):
        raise ValueError(f"guidance[{name!r}] must be a (C, H, W) or (N, C, H, W) tensor")
    images = value.float().unsqueeze(0) if value.ndim == 3 else value.float()
    channels, height, width = shape
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != channels:
        raise ValueError(
            f"guidance[{name!r}] has {images.shape[1]} channels; the teacher takes {channels}: "
            f"give an RGB or greyscale image"
        )
    if batch is not None and len(images) not in (1, batch):
        raise ValueError(f"guidance[{name!r}] has {len(images)} images for {batch} samples")
    if tuple(images.shape[-2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images


def sample_statistics_distance(
    matched: Statistics, reference: Statistics, layers: list[str], index: torch.Tensor
) -> torch.Tensor:
    """Eq. 5 per sample b against reference row ``index[b]``, summed over ``layers``,
    averaged over the batch."""
    total = None
    for name in layers:
        mean, std = matched[name]
        target_mean, target_std = (t[index] for t in reference[name])
        distance = (mean - target_mean).norm(dim=1) + (std - target_std).norm(dim=1)
        total = distance if total is None else total + distance
    assert total is not None
    return total.mean()


def mean_std(record: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) channel mean and standard deviation of each sample."""
    mean, var = record.per_sample()
    return mean, (var + 1e-8).sqrt()


def region_mask(
    value: Any, name: str, shape: tuple[int, int, int], batch: int, device: torch.device
) -> torch.Tensor:
    """A 0/1 region mask as float (B, 1, H, W) (from (H, W), (1, H, W) or (N, 1, H, W))."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"a counterfactual needs guidance[{name!r}]: a 0/1 mask, 1 in the region")
    mask = value.float()
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] != 1 or len(mask) not in (1, batch):
        raise ValueError(f"guidance[{name!r}] must be (H, W), (1, H, W) or (B, 1, H, W)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"guidance[{name!r}] must hold only 0 and 1")
    if tuple(mask.shape[-2:]) != tuple(shape[1:]):
        mask = F.interpolate(mask, size=shape[1:], mode="nearest")
    return mask.expand(batch, -1, -1, -1).to(device)
