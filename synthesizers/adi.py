"""Adaptive DeepInversion (Yin et al., CVPR 2020, Sec. 3.3): DeepInversion plus a
competition term that makes the images ones on which a student disagrees with the teacher.

Loss = DeepInversion's terms + α_c R_compete(x̂),
R_compete(x̂) = 1 − JS(p_T(x̂/T) ‖ p_S(x̂/T)),
with p_T, p_S the teacher's and the student's softmax at temperature T and JS the
Jensen–Shannon divergence in nats (0 for equal distributions, at most log 2). The
student is a network the synthesizer holds: frozen (eval mode, no parameter gradients)
while a batch is optimised, so only the images follow the competition gradient, and
distilled on the filter's accepted images between batches (:meth:`after_batch`: a few
steps of KL(p_T ‖ p_S) at temperature against the teacher's logits on those images).
The student therefore changes during a run, and so does what "disagreement" means.

Defaults: DeepInversion's CIFAR-10 setting plus α_c = 10, the CIFAR-10 ADI weight our
issue quotes from the paper, and T = 3, the temperature hard-coded in the authors'
public CIFAR-10 script. That script ships other weights (``cig_scale`` defaults to 0,
i.e. plain DeepInversion, ``get_images`` to 0.01; the ImageNet example uses 0.2), and
differs in two details we do not copy: it clips the probabilities to [0.01, 0.99] and
clamps the divergence to [0, 1] (which zeroes the gradient at the bounds). The
distillation schedule between batches (``distill_*``) is ours: the paper distils its
student alongside synthesis but gives no per-batch schedule.

The default student (:class:`SmallStudent`) is a small CIFAR-sized CNN built on the
first request, seeded by ``student_seed``; :meth:`AdaptiveDeepInversion.attach_student`
replaces it with any classifier (e.g. one from the pipeline's architecture registry).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthesizers.deepinversion import DeepInversion, DeepInversionConfig
from synthesizers.loop import freeze
from synthesizers.parametrisation import normalise
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesisResult, SynthesisSpec

log = logging.getLogger("dreamshard.synthesizers")

OPTIMIZERS = ("adam", "sgd")


@dataclass
class CompetitionConfig:
    """The competition term and its student: ADI's own fields, shared by every method
    that can add the term (a method's config lists this class before its other bases)."""

    competition_weight: float = 10.0  # α_c
    competition_temperature: float = 3.0  # T of the JS term
    distill_steps: int = 5  # student updates after each batch; 0 keeps the student fixed
    distill_optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    distill_lr: float = 1e-3
    distill_temperature: float = 3.0  # T of the KD loss
    student_width: int = 32  # channels of the default student's first stage
    student_seed: int = 0  # initial weights of the default student
    # An architecture name for the student, built by the caller (synthesizers cannot
    # import the pipeline's registry) and handed over with attach_student(); "" means
    # the default SmallStudent. Set but not attached is an error, never a silent default.
    student_arch: str = ""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the method's other config bases check their own fields
            parent()
        if self.competition_weight < 0:
            raise ValueError(f"competition_weight must be >= 0, got {self.competition_weight}")
        for name in ("competition_temperature", "distill_temperature", "distill_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.distill_optimizer not in OPTIMIZERS:
            raise ValueError(
                f"distill_optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.distill_optimizer!r}"
            )
        if self.student_width < 1:
            raise ValueError(f"student_width must be at least 1, got {self.student_width}")


@dataclass
class AdaptiveDeepInversionConfig(CompetitionConfig, DeepInversionConfig):
    """DeepInversion's fields, then the competition's."""


def jensen_shannon(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of JS(softmax(a/T) ‖ softmax(b/T)) in nats, in [0, log 2].

    ``logits_a``, ``logits_b``: (B, K). Computed in float32 from log-probabilities.
    """
    log_a = F.log_softmax(logits_a.float() / temperature, dim=1)
    log_b = F.log_softmax(logits_b.float() / temperature, dim=1)
    log_mix = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - math.log(2.0)  # log M
    kl_a = F.kl_div(log_mix, log_a, reduction="batchmean", log_target=True)  # KL(a ‖ M)
    kl_b = F.kl_div(log_mix, log_b, reduction="batchmean", log_target=True)  # KL(b ‖ M)
    return 0.5 * (kl_a + kl_b)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's KD loss: T² · KL(p_T ‖ p_S) at temperature T, averaged over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature * temperature


class SmallStudent(nn.Module):
    """Three conv-BN-ReLU-max-pool stages (width, 2·width, 4·width channels), global
    average pool, linear: about 0.1 M parameters at width 32, quick on a CPU."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(3):
            out = width * 2**stage
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (B, 4·width)
        return self.classifier(out)


class StudentCompetition:
    """The competition term and the student it is measured against, for any synthesizer
    whose config is a :class:`CompetitionConfig`: list this class before the method's
    other base, and merge :meth:`competition_terms` and :meth:`competition_weights` into
    the method's own. It builds or checks the student in :meth:`prepare` and distils it
    in :meth:`after_batch`, whenever :meth:`competing` says so."""

    # what the synthesizer this class is mixed into provides
    name: str
    config: CompetitionConfig
    teacher: nn.Module
    device: torch.device
    autocast: Any

    def setup(self) -> None:
        super().setup()  # the synthesizer's own, next in the MRO after this mixin
        self.student: nn.Module | None = None
        self.student_checked = False  # output shape checked against the teacher's
        self.student_optimizer: torch.optim.Optimizer | None = None
        self.normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.distill_loss: float | None = None  # last KD loss of after_batch

    def competing(self) -> bool:
        """Whether the term, the student and its distillation are on (always, for ADI)."""
        return True

    # ---- the student ----------------------------------------------------------------
    def attach_student(self, student: nn.Module) -> None:
        """Use ``student`` (any classifier with the teacher's classes) from now on; its
        optimiser state starts afresh."""
        if student is self.teacher:  # its forward would overwrite the teacher's BN statistics
            raise ValueError("the ADI student must be a module of its own, not the teacher")
        self.student = freeze(student).to(self.device)
        if self.config.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.student_checked = False
        self.student_optimizer = None

    def prepare(self, spec: SynthesisSpec) -> None:
        super().prepare(spec)
        if self.competing():
            self.prepare_student(spec)

    @torch.no_grad()
    def prepare_student(self, spec: SynthesisSpec) -> None:
        """Build the default student on the first request; check an attached one."""
        self.normalisation = (spec.mean, spec.std)
        if self.student is not None and self.student_checked:
            return
        probe = torch.zeros(2, *spec.image_shape, device=self.device)
        classes = self.teacher(probe).shape[1]
        if self.student is None:
            if self.config.student_arch:
                raise ValueError(
                    f"student_arch is {self.config.student_arch!r} but no student was "
                    f"attached: build it and call attach_student() before synthesize()"
                )
            with torch.random.fork_rng(devices=[]):  # leaves the request's RNG stream alone
                torch.manual_seed(self.config.student_seed)
                student = SmallStudent(classes, spec.image_shape[0], self.config.student_width)
            self.attach_student(student)
        assert self.student is not None
        found = self.student(probe).shape
        if found != (2, classes):
            raise ValueError(
                f"the ADI student returns {tuple(found[1:])} outputs for a "
                f"{spec.image_shape} image; the teacher has {classes} classes"
            )
        self.student_checked = True

    def student_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        assert self.student is not None
        with self.autocast():
            return self.student(inputs)

    # ---- the loss ---------------------------------------------------------------------
    def competition_weights(self) -> dict[str, float]:
        """The term's weight, to merge into the method's :meth:`weights` (none when off)."""
        return {"competition": self.config.competition_weight} if self.competing() else {}

    def competition_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The term, to merge into the method's :meth:`loss_terms` (none when off)."""
        if not self.competing():
            return {}
        student_logits = self.student_forward(ctx.inputs)  # frozen: gradients reach x only
        divergence = jensen_shannon(ctx.logits, student_logits, self.config.competition_temperature)
        return {"competition": 1.0 - divergence}

    # ---- distillation between batches ------------------------------------------------
    def optimizer_for_student(self) -> torch.optim.Optimizer:
        if self.student_optimizer is None:
            assert self.student is not None
            parameters = list(self.student.parameters())
            c = self.config
            if c.distill_optimizer == "sgd":
                self.student_optimizer = torch.optim.SGD(parameters, lr=c.distill_lr, momentum=0.9)
            else:
                self.student_optimizer = torch.optim.Adam(parameters, lr=c.distill_lr)
        return self.student_optimizer

    def after_batch(self, result: SynthesisResult, accepted: torch.Tensor) -> None:
        """Distil the student on the accepted images of ``result`` against the teacher's
        logits on them (``result.logits``): ``distill_steps`` full-batch steps in train
        mode, then frozen again. No accepted image: nothing changes."""
        if not self.competing():
            return
        if self.student is None or self.normalisation is None:
            raise RuntimeError("after_batch needs a batch from synthesize() first")
        batch = len(result.labels)
        if accepted.dtype != torch.bool or tuple(accepted.shape) != (batch,):
            raise ValueError(
                f"accepted must be a ({batch},) bool mask, got {accepted.dtype} "
                f"{tuple(accepted.shape)}"
            )
        accepted = accepted.cpu()
        if not accepted.any() or self.config.distill_steps == 0:
            return
        inputs = normalise(result.images[accepted], *self.normalisation).to(self.device)
        targets = result.logits[accepted].to(self.device)  # (N, K) teacher logits
        if self.config.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer = self.optimizer_for_student()
        self.student.train().requires_grad_(True)
        try:
            for _ in range(self.config.distill_steps):
                loss = distillation_loss(
                    self.student_forward(inputs), targets, self.config.distill_temperature
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            freeze(self.student)
            optimizer.zero_grad(set_to_none=True)
        self.distill_loss = float(loss.detach())
        log.info(
            "%s student distilled on %d images, kd=%.4g", self.name, len(inputs), self.distill_loss
        )


@register("adi")
class AdaptiveDeepInversion(StudentCompetition, DeepInversion):
    config_class = AdaptiveDeepInversionConfig
    config: AdaptiveDeepInversionConfig

    def weights(self, stage: Stage) -> dict[str, float]:
        return {**super().weights(stage), **self.competition_weights()}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {**super().loss_terms(ctx), **self.competition_terms(ctx)}
