"""Class-conditional inversion ("You Get What You Sow", Wang et al., IJCAI 2021).

Loss = CE(teacher(x), y) + α_TV R_TV(x) + α_l2 ‖x‖₂
       + α_CC Σ_l (‖Mean(x_l|y) − μ̂_{l,y}‖₂ + ‖Var(x_l|y) − σ̂²_{l,y}‖₂)       (Eq. 4–7)

The statistics of layer l are taken over the samples of each target in the batch and
compared with that target's metadata (μ̂, σ̂²), collected from a training set, a few
seed images per class, or one seed (scenarios A, B, C). Layers have equal weights;
the term is averaged over the targets present in the batch, so its scale does not
grow with the number of classes per batch.

A *target* is a row of the metadata: a class, or in seed-guided runs a single seed
image (whose samples are labelled with the teacher's prediction on the seed). The
guidance is ``spec.guidance["class_statistics"] = {layer: (mean (R, C), var (R, C))}``
and optionally ``spec.guidance["statistics_index"]`` (B,), the row of each sample
(default: its label).

Layers: the inputs of every BN layer, or, for a network without BN (a BN-fused one),
the outputs of every convolution; or the modules named in ``layers``. Defaults: the
paper's CIFAR KD setting (Adam lr 0.05, 2,000 iterations, batch 200, α_TV 2.5e-5,
α_CC 1.0); its ImageNet setting is lr 0.25, α_TV 1e-4, α_l2 1e-5, α_CC 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from synthesizers.base import Synthesizer
from synthesizers.hooks import SIDES, batchnorm_layers, conv_layers, named_layers
from synthesizers.losses import cross_entropy, l2_prior, total_variation
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesisSpec, SynthesizerConfig


@dataclass
class ClassConditionalConfig(SynthesizerConfig):
    iterations: int = 2000
    lr: float = 0.05
    ce_weight: float = 1.0
    cc_weight: float = 1.0  # α_CC
    tv_weight: float = 2.5e-5  # α_TV
    l2_weight: float = 0.0  # α_l2
    layers: list[str] | None = None  # module names; None: BN inputs, else conv outputs
    side: str = "auto"  # input | output | auto (input for BN layers, else output)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.side not in ("auto", *SIDES):
            raise ValueError(f"side must be auto, input or output, got {self.side!r}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be a non-empty list of module names, or null")


def conditional_statistics_loss(
    features: list,
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rows: torch.Tensor,
) -> torch.Tensor:
    """Σ_l mean over rows r in the batch of ‖μ_l(x|r) − μ̂_{l,r}‖₂ + ‖σ²_l(x|r) − σ̂²_{l,r}‖₂."""
    present = torch.unique(rows)
    total = features[0].per_sample()[0].new_zeros(())
    for record in features:
        target_mean, target_var = targets[record.name]
        count = target_mean.shape[0]
        mean, var, _ = record.per_class(rows, count)
        distance = (mean[present] - target_mean[present]).norm(dim=1) + (
            var[present] - target_var[present]
        ).norm(dim=1)
        total = total + distance.mean()
    return total


@register("class-conditional")
class ClassConditional(Synthesizer):
    config_class = ClassConditionalConfig
    config: ClassConditionalConfig
    uses_metadata = True

    def setup(self) -> None:
        super().setup()
        self.layers, self.feature_side = self.statistics_layers(self.teacher, self.config)

    @staticmethod
    def statistics_layers(
        teacher: nn.Module, config: ClassConditionalConfig
    ) -> tuple[list[tuple[str, nn.Module]], str]:
        """The layers (and the side of them) whose per-target statistics are matched."""
        if config.layers is not None:
            layers = named_layers(teacher, config.layers)
            side = config.side
            if side == "auto":
                is_bn = all(isinstance(m, nn.modules.batchnorm._BatchNorm) for _, m in layers)
                side = "input" if is_bn else "output"
            return layers, side
        bn = batchnorm_layers(teacher)
        if bn:
            return bn, "input" if config.side == "auto" else config.side
        convs = conv_layers(teacher)
        if not convs:
            raise ValueError("the teacher has neither batch-norm nor convolution layers")
        return convs, "output" if config.side == "auto" else config.side

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return self.layers

    def prepare(self, spec: SynthesisSpec) -> None:
        statistics = spec.guidance.get("class_statistics")
        if statistics is None:
            raise ValueError(
                "class-conditional needs guidance['class_statistics'] (the metadata stage)"
            )
        missing = [name for name, _ in self.layers if name not in statistics]
        if missing:
            raise ValueError(f"the metadata has no statistics for layers {missing[:5]}")
        rows = spec.guidance.get("statistics_index", spec.labels)
        count = next(iter(statistics.values()))[0].shape[0]
        if rows.shape != spec.labels.shape or int(rows.max()) >= count or int(rows.min()) < 0:
            raise ValueError(f"statistics_index must give each sample a row in 0 … {count - 1}")
        self.targets = {
            name: (mean.to(self.device, torch.float32), var.to(self.device, torch.float32))
            for name, (mean, var) in statistics.items()
        }
        self.rows = rows.to(self.device)

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        return {"ce": c.ce_weight, "cc": c.cc_weight, "tv": c.tv_weight, "l2": c.l2_weight}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {
            "ce": cross_entropy(ctx.logits, ctx.labels),
            "cc": conditional_statistics_loss(ctx.features, self.targets, self.rows),
            "tv": total_variation(ctx.inputs),
            "l2": l2_prior(ctx.inputs),
        }
