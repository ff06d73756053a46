"""DeepInversion (Yin et al., CVPR 2020): match the teacher's batch-norm statistics.

Loss = CE(teacher(x), y) + α_f Σ_l m_l (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂)
       + α_TV R_TV(x) + α_l2 ‖x‖₂,
with μ̂_l, σ̂²_l the running statistics of BN layer l and m_l the first-layer multiplier
(m_1 = ``first_bn_multiplier``, m_l = 1 otherwise). Defaults: the public CIFAR-10
setting (batch 256, 2,000 iterations, Adam lr 0.05, α_f 10, α_TV 2.5e-5, no l2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from synthesizers.base import Synthesizer
from synthesizers.hooks import batchnorm_layers
from synthesizers.losses import cross_entropy, l2_prior, statistics_distance, total_variation
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesizerConfig


@dataclass
class DeepInversionConfig(SynthesizerConfig):
    iterations: int = 2000
    lr: float = 0.05
    ce_weight: float = 1.0
    bn_weight: float = 10.0  # α_f
    first_bn_multiplier: float = 1.0  # 10 in the ImageNet setting
    tv_weight: float = 2.5e-5  # α_TV
    l2_weight: float = 0.0  # α_l2 (1e-5 in the ImageNet setting)


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

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        return {"ce": c.ce_weight, "bn": c.bn_weight, "tv": c.tv_weight, "l2": c.l2_weight}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        multipliers = [self.config.first_bn_multiplier] + [1.0] * (len(ctx.features) - 1)
        return {
            "ce": cross_entropy(ctx.logits, ctx.labels),
            "bn": batchnorm_statistics_loss(ctx.features, multipliers),
            "tv": total_variation(ctx.inputs),
            "l2": l2_prior(ctx.inputs),
        }
