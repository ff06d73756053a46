"""The data a synthesizer takes and returns, and the config fields every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from synthesizers.hooks import LayerStatistics


@dataclass
class SynthesizerConfig:
    """Fields every method shares. A method's own dataclass extends it with the paper's
    defaults for its own terms."""

    iterations: int = 2000
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)
    precision: str = "auto"  # auto | bf16 | fp32
    channels_last: bool = True
    jitter: int = 2  # random translation in pixels, each iteration
    flip: bool = True  # random horizontal flip, each iteration
    log_every: int = 0  # log every term every N iterations; 0 logs only the end

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be non-negative, got {self.jitter}")


@dataclass
class SynthesisSpec:
    """One request: which classes, what image geometry, which seed, what guidance.

    ``mean`` and ``std`` are the teacher's input normalisation: the teacher sees
    ``(image - mean) / std`` for an image in [0, 1].
    """

    labels: torch.Tensor  # (B,) int64 target classes
    image_shape: tuple[int, int, int]  # (C, H, W)
    seed: int
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    guidance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.labels.numel() == 0:
            raise ValueError("labels must be a non-empty 1-D tensor of class indices")
        channels = self.image_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per channel")


@dataclass
class SynthesisResult:
    """Images in [0, 1] (quantised to 8 bits, as they will be stored) and what the
    teacher thinks of them."""

    images: torch.Tensor  # (B, C, H, W) float32 on the CPU, multiples of 1/255
    labels: torch.Tensor  # (B,) int64 target classes
    probs: torch.Tensor  # (B, K) teacher softmax on ``images``
    logits: torch.Tensor  # (B, K) teacher logits on ``images``
    losses: dict[str, float]  # final unweighted value of every term, and "total"
    iterations: int
    seconds: float


@dataclass(frozen=True)
class Stage:
    """A phase of the optimisation with its own length (and, through
    :meth:`Synthesizer.weights`, its own weights)."""

    name: str
    iterations: int


@dataclass
class StepContext:
    """What one iteration produced, handed to :meth:`Synthesizer.loss_terms`."""

    spec: SynthesisSpec
    stage: Stage
    iteration: int
    labels: torch.Tensor  # (B,)
    images: torch.Tensor  # (B, C, H, W) normalised, before augmentation
    inputs: torch.Tensor  # (B, C, H, W) normalised, as the teacher saw them
    logits: torch.Tensor  # (B, K)
    features: list[LayerStatistics]
