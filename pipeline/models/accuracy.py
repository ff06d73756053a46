"""Top-1 accuracy and input normalisation: the one place that scores a classifier against
labels (teacher training and evaluation, the student after every epoch, the untrained and
pruned models, the fidelity networks)."""

from __future__ import annotations

import torch
from torch import nn


def normalise(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Images (N, 3, H, W), uint8 or float in [0, 1], to float32 in the model's
    normalisation, on their device."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 and per-class accuracy (``None`` for an absent class) of logits (N, K)."""
    labels = labels.cpu()
    correct = logits.argmax(1).cpu() == labels
    per_class = [
        correct[labels == c].float().mean().item() if (labels == c).any() else None
        for c in range(num_classes)
    ]
    return {
        "accuracy": correct.sum().item() / max(len(correct), 1),
        "per_class": per_class,
        "images": len(labels),
    }


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    device: torch.device | None = None,
    batch: int = 500,
) -> dict:
    """Top-1 and per-class accuracy of ``model`` on uint8 images (N, 3, H, W)."""
    device = device or torch.device("cpu")
    model.eval()
    logits = [
        model(
            normalise(images[start : start + batch].to(device), mean, std).contiguous(
                memory_format=torch.channels_last
            )
        ).cpu()
        for start in range(0, len(images), batch)
    ]
    return accuracy(torch.cat(logits), labels, num_classes)
