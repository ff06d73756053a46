"""NaturalInversion (Kim et al., AAAI 2022): a generator per batch, the Feature Transfer
Pyramid and Adaptive Channel Scaling (Eq. 5–8, Algorithm 1).

Instead of pixels, each batch optimises a conditional generator G, the pyramid P
(:mod:`synthesizers.feature_pyramid`) and per-sample channel scales α:

    x̂ = G(z|y),   m_N = P(f_1(x̂) … f_N(x̂)),   Î = α ⊗ (m_N ⊕ x̂)   (B, C, H, W)

with z ~ N(0, 1) drawn once per batch and concatenated with the one-hot target y,
f_n the teacher's feature maps at its downsampling points, α ∈ R^{B×C×1×1}. The loss
is DeepInversion's on Î (Eq. 8): CE(T(Î), y) + α_BN R_BN(Î) + α_TV R_TV(Î) + α_l2 ‖Î‖₂.
One-to-one: G, P and α are drawn afresh for every batch from the batch's seed.

Switches (the paper's Table 3): ``one_to_one`` false builds G and P on the first batch
and keeps training them on every later one (z and α, which belong to a batch's images,
are still drawn per batch; Adam's state restarts each batch), so the images then depend
on the order in which a worker receives its batches. ``ftp`` false drops P (Î = α ⊗ x̂)
and the extra teacher pass; ``acs`` false fixes α = 1. ``competition_weight`` > 0 is
the paper's "A-ours": ADI's competition term against a student distilled between
batches (:class:`synthesizers.adi.StudentCompetition`; ``student_arch`` as for ADI).

Defaults: the paper's public CIFAR-10 setting (batch 256 is the plan's batch size):
2,000 iterations, Adam lr 1e-3 for G (``lr``), 5e-4 for P, 0.05 for α, BN weight 10,
l2 1.5e-5. For CIFAR-100 set ``iterations: 4000`` and ``bn_weight: 3``. Three settings the
paper does not state are taken from the authors' code (github.com/kdst-team/NaturalInversion,
``NaturalInversion.py``): TV weight 6e-3 (its ``--var_scale`` default), α drawn from
N(5, 1) per image and channel (``torch.nn.init.normal_(alpha, 5.0, 1)``), and P fed the
teacher's features of a detached copy of x̂ computed under ``no_grad`` (``input_for_f``),
so G learns only through its own output and P only through its weights.

Our choices where the paper is silent (its appendix with the networks is not in our copy):

* x̂, m_N and Î live in the teacher's normalised input space, the "channel scale range
  of normalised data" that α is meant to learn. Stored images are Î mapped back to
  [0, 1] and clipped, as for every method. (The authors' script saves each image
  min-max rescaled instead, so α's scale never shows there; here an α that stays near 5
  saturates the stored pixels, and the BN term must pull it toward the data's range.)
* G follows the generator of DAFL (Chen et al. 2019, which the paper compares with): a
  linear map of [z, y] to 2·``generator_width`` channels at H/2^k, k upsampling blocks
  (nearest ×2, 3×3 conv, BN, LeakyReLU 0.2; the last one ``generator_width`` wide), a
  3×3 conv to C channels, tanh, and a BN without affine parameters. k = 2 for 32×32
  images (start 8×8), more for larger ones (224: k = 5, start 7×7). ``latent_dim`` 100.
* P's feature maps come from a no-grad teacher pass on x̂ itself (the authors' script
  passes the jittered and flipped x̂), in the loop's precision. P has no nonlinearity
  (Eq. 5 has none) and upsamples bilinearly.
* Adam betas and the cosine schedule are the loop's, for all three parameter groups
  (the authors' script: Adam's default betas, a constant rate).

Each iteration runs the teacher twice with FTP on (features of x̂, then the loss on Î).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synthesizers.adi import CompetitionConfig, StudentCompetition
from synthesizers.base import Synthesizer
from synthesizers.deepinversion import batchnorm_statistics_loss
from synthesizers.feature_pyramid import (
    FeatureTransferPyramid,
    PyramidLevel,
    find_pyramid,
    tap_outputs,
)
from synthesizers.hooks import batchnorm_layers
from synthesizers.loop import adam
from synthesizers.losses import cross_entropy, l2_prior, total_variation
from synthesizers.parametrisation import Parametrisation
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesisSpec, SynthesizerConfig

ALPHA_MEAN = 5.0  # α's initial mean (standard deviation 1), the authors' code


@dataclass
class NaturalInversionConfig(CompetitionConfig, SynthesizerConfig):
    iterations: int = 2000  # 4,000 for CIFAR-100
    lr: float = 1e-3  # η_G, the generator's
    ftp_lr: float = 5e-4  # η_P
    alpha_lr: float = 0.05  # η_α
    ce_weight: float = 1.0
    bn_weight: float = 10.0  # 3 for CIFAR-100
    tv_weight: float = 6e-3  # the authors' --var_scale (the paper gives no value)
    l2_weight: float = 1.5e-5
    one_to_one: bool = True  # a fresh G, P and α per batch
    ftp: bool = True  # the Feature Transfer Pyramid
    acs: bool = True  # Adaptive Channel Scaling (α learnable; false: α = 1)
    latent_dim: int = 100
    generator_width: int = 64
    pyramid_layers: tuple[str, ...] = ()  # teacher module names; empty: found automatically
    competition_weight: float = 0.0  # > 0: the ADI combination ("A-ours")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ftp_lr", "alpha_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("latent_dim", "generator_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.student_arch and self.competition_weight == 0:
            raise ValueError(
                "student_arch is set but competition_weight is 0: the student is used only "
                "by the competition term (the ADI combination)"
            )


class Generator(nn.Module):
    """G(z|y): [z, one-hot y] (B, latent + K) -> normalised images (B, C, H, W)."""

    def __init__(
        self, latent_dim: int, num_classes: int, image_shape: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        channels, height, image_width = image_shape
        self.num_classes = num_classes
        self.size = (height, image_width)
        steps = max(2, round(math.log2(max(min(height, image_width) / 8, 1))))
        self.start = (math.ceil(height / 2**steps), math.ceil(image_width / 2**steps))
        self.project = nn.Linear(latent_dim + num_classes, 2 * width * math.prod(self.start))
        self.input_norm = nn.BatchNorm2d(2 * width)
        layers: list[nn.Module] = []
        inside = 2 * width
        for step in range(steps):
            out = width if step == steps - 1 else 2 * width
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(inside, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            inside = out
        self.blocks = nn.Sequential(*layers)
        self.output = nn.Sequential(
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = F.one_hot(labels, self.num_classes).to(z.dtype)  # (B, K)
        x = self.project(torch.cat([z, y], dim=1)).view(len(z), -1, *self.start)
        x = self.blocks(self.input_norm(x))  # (B, width, start · 2^steps)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.output(x)


class NaturalImages(Parametrisation):
    """Î = α ⊗ (m_N ⊕ G(z|y)) (Eq. 7): normalised images (B, C, H, W) in float32.

    ``features`` maps x̂ to the teacher's feature maps f_1 … f_N (a teacher forward pass:
    the teacher is not a submodule, so it is neither moved nor optimised with these)."""

    def __init__(
        self,
        generator: Generator,
        pyramid: FeatureTransferPyramid | None,
        features: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        labels: torch.Tensor,
        latent: torch.Tensor,
        acs: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        autocast: Callable,
    ) -> None:
        super().__init__(mean, std)
        self.generator = generator
        self.pyramid = pyramid
        self.register_buffer("z", latent)  # (B, latent_dim)
        self.register_buffer("labels", labels)  # (B,)
        shape = (len(labels), len(mean), 1, 1)
        # α ~ N(5, 1) as in the authors' code, drawn from the batch's seed
        self.alpha = nn.Parameter(torch.randn(shape) + ALPHA_MEAN) if acs else None  # (B, C, 1, 1)
        self.features = features
        self.autocast = autocast

    def forward(self) -> torch.Tensor:
        with self.autocast():
            x = self.generator(self.z, self.labels)  # x̂
            if self.pyramid is not None:
                # P reads the teacher's features of a detached x̂, as the authors do: no
                # graph through the teacher's first pass, and G's gradient comes only
                # through its own output in m_N ⊕ x̂
                with torch.no_grad():
                    features = self.features(x.detach())
                x = x + self.pyramid(features)  # m_N ⊕ x̂
        x = x.float()
        return x if self.alpha is None else self.alpha * x

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimised parameters by component: generator, pyramid, alpha."""
        groups = {"generator": list(self.generator.parameters())}
        if self.pyramid is not None:
            groups["pyramid"] = list(self.pyramid.parameters())
        if self.alpha is not None:
            groups["alpha"] = [self.alpha]
        return groups


@register("natural-inversion")
class NaturalInversion(StudentCompetition, Synthesizer):
    config_class = NaturalInversionConfig
    config: NaturalInversionConfig
    needs_batchnorm = True

    def setup(self) -> None:
        super().setup()
        self.bn_layers = batchnorm_layers(self.teacher)  # the base checked there are some
        # per image shape: the pyramid levels and the teacher's number of classes
        self.geometry: dict[tuple[int, ...], tuple[list[PyramidLevel], int]] = {}
        # one_to_one off: the G and P every batch of an image shape trains on
        self.shared: dict[tuple[int, ...], tuple[Generator, FeatureTransferPyramid | None]] = {}

    def competing(self) -> bool:
        return self.config.competition_weight > 0

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return self.bn_layers

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        own = {"ce": c.ce_weight, "bn": c.bn_weight, "tv": c.tv_weight, "l2": c.l2_weight}
        return {**own, **self.competition_weights()}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {
            "ce": cross_entropy(ctx.logits, ctx.labels),
            "bn": batchnorm_statistics_loss(ctx.features, [1.0] * len(ctx.features)),
            "tv": total_variation(ctx.inputs),
            "l2": l2_prior(ctx.inputs),
            **self.competition_terms(ctx),
        }

    @torch.no_grad()
    def prepare(self, spec: SynthesisSpec) -> None:
        super().prepare(spec)
        shape = tuple(spec.image_shape)
        if shape not in self.geometry:
            c = self.config
            levels = find_pyramid(self.teacher, spec.image_shape, c.pyramid_layers) if c.ftp else []
            classes = self.teacher(torch.zeros(2, *shape, device=self.device)).shape[1]
            self.geometry[shape] = (levels, classes)

    def parametrise(self, spec: SynthesisSpec) -> NaturalImages:
        c = self.config
        shape = tuple(spec.image_shape)
        levels, classes = self.geometry[shape]
        networks = self.shared.get(shape) if not c.one_to_one else None
        if networks is None:  # drawn from the batch's seed (the loop seeded the RNG)
            generator = Generator(c.latent_dim, classes, spec.image_shape, c.generator_width)
            pyramid = FeatureTransferPyramid(levels, spec.image_shape) if c.ftp else None
            networks = (generator, pyramid)
            if not c.one_to_one:
                self.shared[shape] = networks
        latent = torch.randn(len(spec.labels), c.latent_dim)  # z, once per batch
        return NaturalImages(
            *networks,
            self.pyramid_features(levels),
            spec.labels,
            latent,
            c.acs,
            spec.mean,
            spec.std,
            self.autocast,
        )

    def pyramid_features(
        self, levels: Sequence[PyramidLevel]
    ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """x̂ -> [f_1 … f_N]: one teacher pass with the levels' outputs tapped."""
        modules = dict(self.teacher.named_modules())
        taps = [modules[level.name] for level in levels]

        def features(images: torch.Tensor) -> list[torch.Tensor]:
            with tap_outputs(taps) as outputs:
                self.teacher_forward(images)
            missing = [
                level.name for level, out in zip(levels, outputs, strict=True) if out is None
            ]
            if missing:
                raise RuntimeError(f"pyramid layers {missing} produced no output")
            return [out for out in outputs if out is not None]

        return features

    def optimizer(self, parametrisation: Parametrisation, stage: Stage) -> torch.optim.Optimizer:
        assert isinstance(parametrisation, NaturalImages)
        c = self.config
        rates = {"generator": c.lr, "pyramid": c.ftp_lr, "alpha": c.alpha_lr}
        groups = [
            {"params": params, "lr": rates[name]}
            for name, params in parametrisation.parameter_groups().items()
        ]
        return adam(groups, c.lr, c.betas, c.fused_optimizer)  # one Adam, a rate per group
