"""DeepInversion (Yin et al., CVPR 2020): match the teacher's batch-norm statistics.

Loss = CE(teacher(x), y) + α_f Σ_l m_l (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂)
       + α_TV R_TV(x) [+ α_TV1 R_TV1(x)] + α_l2 ‖x‖₂,
with μ̂_l, σ̂²_l the running statistics of BN layer l and m_l the first-layer multiplier
(m_1 = ``first_bn_multiplier``, m_l = 1 otherwise).

``preset`` picks one of the authors' two public scripts (github.com/NVlabs/DeepInversion):

- ``cifar`` (the default; ``cifar10/deepinversion_cifar10.py`` with its README's "paper
  parameters"): Adam with its default betas (0.9, 0.999) at a constant lr 0.05, jitter
  ±2 without flips, no clipping, α_f 10, α_TV 2.5e-5, l2 of the whole batch with weight 0.
- ``imagenet`` (``imagenet_inversion.py`` and ``deepinversion.py``, setting 1, with its
  README's lr 0.25 and r_feature 0.01): Adam betas (0.5, 0.9), a 100-iteration linear
  warm-up then cosine (``lr_cosine_policy(lr, 100, iterations)``), jitter ±30 and flips,
  pixels clipped to the valid range, α_f 0.01 with m_1 = 10, α_TV 1e-4, the TV-l1 term
  (weight 0 by the script's default), and the l2 of each image averaged over the batch
  with weight 1e-5.

The rule: a preset field left at None takes the preset's value when the config is built;
a value given explicitly (YAML, ``--set``, a keyword) wins. The built config holds the
resolved values, so a manifest records what ran; ``dataclasses.replace`` keeps them, so to
switch presets build a new config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from synthesizers.base import Synthesizer
from synthesizers.hooks import batchnorm_layers
from synthesizers.losses import (
    cross_entropy,
    l2_prior,
    statistics_distance,
    total_variation,
    total_variation_l1,
)
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesizerConfig

PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {
        "lr": 0.05,
        "betas": (0.9, 0.999),
        "lr_schedule": "constant",
        "warmup": 0,
        "jitter": 2,
        "flip": False,
        "clip": False,
        "bn_weight": 10.0,
        "first_bn_multiplier": 1.0,
        "tv_weight": 2.5e-5,
        "tv_l1_weight": 0.0,
        "l2_weight": 0.0,
        "l2_per_image": False,
    },
    "imagenet": {
        "lr": 0.25,
        "betas": (0.5, 0.9),
        "lr_schedule": "cosine",
        "warmup": 100,
        "jitter": 30,
        "flip": True,
        "clip": True,
        "bn_weight": 0.01,
        "first_bn_multiplier": 10.0,
        "tv_weight": 1e-4,
        "tv_l1_weight": 0.0,
        "l2_weight": 1e-5,
        "l2_per_image": True,
    },
}


@dataclass
class DeepInversionConfig(SynthesizerConfig):
    """None means "from ``preset``" (see the module docstring and :data:`PRESETS`)."""

    preset: str = "cifar"  # cifar | imagenet
    iterations: int = 2000
    # The shared fields a preset sets, re-declared as optional: None until __post_init__
    # fills it in from the preset, a value afterwards.
    lr: float | None = None
    betas: tuple[float, float] | None = None
    lr_schedule: str | None = None
    warmup: int | None = None
    jitter: int | None = None
    flip: bool | None = None
    clip: bool | None = None
    ce_weight: float = 1.0
    bn_weight: float | None = None  # α_f
    first_bn_multiplier: float | None = None  # m_1
    tv_weight: float | None = None  # α_TV (L2 total variation)
    tv_l1_weight: float | None = None  # α_TV1 (L1 total variation, the ImageNet script's)
    l2_weight: float | None = None  # α_l2
    l2_per_image: bool | None = None  # ‖x‖₂ per image, averaged (else of the whole batch)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()  # the shared fields' checks, on the resolved values


def batchnorm_statistics_loss(features: list, multipliers: list[float]) -> torch.Tensor:
    """Σ_l m_l (‖μ_l − running_mean_l‖₂ + ‖σ²_l − running_var_l‖₂) over BN inputs."""
    total = features[0].mean.new_zeros(())
    for record, multiplier in zip(features, multipliers, strict=True):
        bn = record.module
        total = total + multiplier * statistics_distance(
            record.mean, record.var, bn.running_mean, bn.running_var
        )
    return total


@register("deepinversion")
class DeepInversion(Synthesizer):
    config_class = DeepInversionConfig
    config: DeepInversionConfig
    needs_batchnorm = True

    def setup(self) -> None:
        super().setup()
        self.bn_layers = batchnorm_layers(self.teacher)  # the base checked there are some

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return self.bn_layers

    def uses_tv_l1(self) -> bool:
        """The TV-l1 term is computed (and logged) with the ImageNet preset or any weight."""
        return self.config.preset == "imagenet" or bool(self.config.tv_l1_weight)

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        weights = {"ce": c.ce_weight, "bn": c.bn_weight, "tv": c.tv_weight, "l2": c.l2_weight}
        if self.uses_tv_l1():
            weights["tv_l1"] = c.tv_l1_weight
        return weights

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        multipliers = [self.config.first_bn_multiplier] + [1.0] * (len(ctx.features) - 1)
        terms = {
            "ce": cross_entropy(ctx.logits, ctx.labels),
            "bn": batchnorm_statistics_loss(ctx.features, multipliers),
            "tv": total_variation(ctx.inputs),
            "l2": l2_prior(ctx.inputs, bool(self.config.l2_per_image)),
        }
        if self.uses_tv_l1():
            terms["tv_l1"] = total_variation_l1(ctx.inputs)
        return terms
