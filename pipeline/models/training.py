"""Teacher training and evaluation on class-folder images held in memory.

SGD with Nesterov momentum, a one-cycle (or cosine) schedule, random crop (4-pixel
zero padding) and horizontal flip, channels_last and bf16 autocast where the device
supports it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, TeacherConfig
from pipeline.models.accuracy import classifier_accuracy, normalise
from pipeline.models.archs import build_architecture
from synthesizers.precision import autocast_dtype

log = logging.getLogger("dreamshard.train")


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine
    precision: str = "auto"
    seed: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.schedule not in ("onecycle", "cosine"):
            raise ValueError(f"schedule must be onecycle or cosine, got {self.schedule!r}")


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, pad: int = 4
) -> torch.Tensor:
    """Per-sample random crop from a zero-padded copy and random flip; (B, C, H, W).
    The one training augmentation (teacher training, the evaluation loader)."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(batch):
        y, x = offsets[i].tolist()
        crop = padded[i, :, y : y + height, x : x + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def train_teacher(
    config: TrainConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict]:
    """Train ``config.arch`` on uint8 images (N, 3, H, W) with integer labels (N,)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_architecture(config.arch, num_classes).to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    if config.schedule == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, config.lr, total_steps=total_steps
        )
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    dtype = autocast_dtype(config.precision, torch.device("cpu"))
    history = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        seen, loss_sum = 0, 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = normalise(random_crop_flip(images[index], generator), config.mean, config.std)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(batch).float(), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(index)
            loss_sum += loss.item() * len(index)
        entry = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "seconds": time.perf_counter() - start,
        }
        if test is not None:
            entry["test_accuracy"] = classifier_accuracy(
                model, *test, config.mean, config.std, num_classes
            )["accuracy"]
        history.append(entry)
        log.info("epoch %d/%d %s", epoch + 1, config.epochs, entry)
    return model.eval(), {"history": history, "seconds": time.perf_counter() - start}


def teacher_config_for(
    config: TrainConfig, num_classes: int, image_size: int, checkpoint: str
) -> TeacherConfig:
    return TeacherConfig(
        arch=config.arch,
        checkpoint=checkpoint,
        num_classes=num_classes,
        image_size=image_size,
        mean=config.mean,
        std=config.std,
    )
