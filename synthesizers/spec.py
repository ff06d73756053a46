"""The data a synthesizer takes and returns, and the config fields every method shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from synthesizers.hooks import LayerStatistics
from synthesizers.parametrisation import Start

SCHEDULES = ("cosine", "constant")
INITS = ("noise", "smooth")


def lr_factor(iteration: int, iterations: int, schedule: str, warmup: int) -> float:
    """The learning rate of ``iteration`` (from 0) of a stage, as a fraction of ``lr``:
    a linear warm-up over the first ``warmup`` iterations ((i + 1) / warmup), then cosine
    to 0 over the remaining ones, or constant (DeepInversion's ``lr_cosine_policy``)."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(iterations - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (iteration - warmup) / span))


# A setting that is on, off or decided by the machine. Declared as a Literal so that the
# config parser can take YAML's bare on/off (booleans in YAML 1.1) back as "on"/"off".
Switch = Literal["auto", "on", "off"]


@dataclass
class SynthesizerConfig:
    """Fields every method shares. A method's own dataclass extends it with the paper's
    defaults for its own terms."""

    iterations: int = 2000
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)
    lr_schedule: str = "cosine"  # cosine (to 0 over each stage) | constant
    warmup: int = 0  # iterations of linear learning-rate warm-up at the start of each stage
    precision: str = "auto"  # auto | bf16 | fp16 (with loss scaling) | fp32
    channels_last: bool = True
    jitter: int = 2  # random translation in pixels, each iteration
    flip: bool = True  # random horizontal flip, each iteration
    # per-image Gaussian blur of the teacher's input, sigma ~ U(0, blur) pixels, each
    # iteration (0: off, the papers'): class evidence has to survive a low-pass
    blur: float = 0.0
    clip: bool = True  # pixels projected into the valid [0, 1] range after each step
    # the pixels' start: noise (N(0, 1) per pixel, the papers') | smooth (the same noise
    # drawn at a quarter of the side and upsampled: low frequencies only)
    init: str = "noise"
    init_scale: float = 1.0  # the start's pattern multiplied by this
    init_tint: float = 0.0  # std of one colour offset per image and channel added to it
    init_correlation: float = 0.0  # correlation between the start's colour channels
    # optimise the pixels through their Fourier coefficients, frequency f's scaled by
    # 1 / max(f, 1)^spectrum (low frequencies move first); 0: the pixels (the papers')
    spectrum: float = 0.0
    log_every: int = 0  # log every term every N iterations; 0 logs only the end
    # Speed switches: each changes how fast the loop runs, never what it computes
    # (tests/test_performance.py checks each against the plain path).
    fused_moments: bool = True  # one-pass feature moments with a hand-written backward
    fused_optimizer: bool = True  # Adam's fused kernel (foreach where there is none)
    affine_batchnorm: bool = True  # eval-mode BN of the frozen teacher as one multiply-add
    compile: Switch = "auto"  # torch.compile the teacher-plus-loss step
    cuda_graphs: bool = True  # with compile on a GPU: replay the step as a CUDA graph
    # Early stopping (off: paper-faithful runs do every iteration): stop a batch when
    # every image already passes the filter (SynthesisSpec.min_confidence) and the
    # total loss fell by less than early_stop_tolerance (relative) since the last check.
    early_stop: bool = False
    early_stop_every: int = 50  # iterations between checks (each costs one forward)
    early_stop_tolerance: float = 0.01
    # Return the batch's iterate with the lowest total loss (of the last stage) instead of
    # the last one, as both authors' CIFAR scripts mean to (DeepInversion's and
    # NaturalInversion's keep one best batch, not one best image).
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be non-negative, got {self.jitter}")
        if not 0 <= self.blur <= 4:
            raise ValueError(f"blur is a largest sigma in [0, 4] pixels (0: off), got {self.blur}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if self.init_tint < 0:
            raise ValueError(f"init_tint must be non-negative, got {self.init_tint}")
        if not 0 <= self.init_correlation < 1:
            raise ValueError(f"init_correlation must be in [0, 1), got {self.init_correlation}")
        if not 0 <= self.spectrum <= 4:
            raise ValueError(f"spectrum must be a decay in [0, 4] (0: pixels), got {self.spectrum}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be non-negative, got {self.warmup}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.early_stop_every < 1:
            raise ValueError(f"early_stop_every must be at least 1, got {self.early_stop_every}")
        if not 0.0 <= self.early_stop_tolerance < 1.0:
            raise ValueError(
                f"early_stop_tolerance must be in [0, 1), got {self.early_stop_tolerance}"
            )

    def start(self) -> Start:
        """The pixels' start that the ``init`` fields describe."""
        return Start(self.init, self.init_scale, self.init_tint, self.init_correlation)


# Every speed switch off: fp32, NCHW, plain moments, per-tensor Adam, the library's batch
# norm, eager. The reference the switches are tested and benchmarked against.
PLAIN_PATH: dict[str, Any] = {
    "precision": "fp32",
    "channels_last": False,
    "fused_moments": False,
    "fused_optimizer": False,
    "affine_batchnorm": False,
    "compile": "off",
}


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
    # The filter's confidence threshold τ; early stopping needs it (None: never stop early).
    min_confidence: float | None = None

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
    # Early-stopping checks, in order: iteration, seconds since start, the fraction of
    # the batch that passed the filter, and the total loss (empty when no check ran).
    checks: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


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
