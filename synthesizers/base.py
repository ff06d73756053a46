"""The shared optimisation loop every synthesizer runs.

A method subclasses :class:`Synthesizer` and fills in only what is its own: the loss
terms (:meth:`Synthesizer.loss_terms`) with their weights, and where it differs, the
thing optimised (:meth:`Synthesizer.parametrise`: pixels by default, a generator for
NaturalInversion), the stages (IMAGINE runs two), the layers whose statistics it reads,
and an auxiliary network trained alternately (:meth:`Synthesizer.after_step`).
The base owns seeding, mixed precision, channels_last, augmentation, the hooks, the
optimiser and its schedule (cosine or constant, an optional warm-up), the sum of the
weighted terms and their logging, the speed switches of :class:`SynthesizerConfig` (fused
moments and Adam, affine batch norm, ``torch.compile`` of
:meth:`Synthesizer.forward_loss`) and early stopping.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from synthesizers.affine import affine_batchnorm
from synthesizers.hooks import batchnorm_layers, capture_statistics
from synthesizers.loop import LoopRecord, adam, freeze, jitter_flip_blur, weighted_total
from synthesizers.losses import fused_sample_moments, sample_moments
from synthesizers.parametrisation import Parametrisation, pixel_images
from synthesizers.precision import autocast_dtype, compile_enabled, grad_scaler
from synthesizers.spec import (
    Stage,
    StepContext,
    SynthesisResult,
    SynthesisSpec,
    SynthesizerConfig,
    lr_factor,
)

log = logging.getLogger("dreamshard.synthesizers")
_NO_LOGITS = torch.empty(0)  # StepContext.logits until forward_loss sets it


class Synthesizer:
    """Base class: builds from a frozen teacher and a config, owns the loop."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SynthesizerConfig]] = SynthesizerConfig
    uses_metadata: ClassVar[bool] = False  # needs per-target statistics (the metadata stage)
    needs_batchnorm: ClassVar[bool] = False  # reads BN running statistics (no fused teacher)
    # Needs the seed images themselves (guidance["target_images"], (B, C, H, W) in [0, 1]):
    # the metadata stage of a seeds run then stores them with the statistics.
    uses_target_images: ClassVar[bool] = False
    # Config fields that are image URLs: the pipeline loads each (RGB, the teacher's size)
    # into guidance[field] as a (C, H, W) tensor in [0, 1].
    image_fields: ClassVar[tuple[str, ...]] = ()
    # Attributes a method sets during a step (activations, per-step references): set to
    # None when synthesize returns, so that no graph of the last step outlives the call.
    step_state: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        teacher: nn.Module,
        config: SynthesizerConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        if device is None:
            first = next(teacher.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.teacher = freeze(teacher).to(self.device)
        if self.needs_batchnorm and not batchnorm_layers(self.teacher):
            raise ValueError(
                f"{self.name or type(self).__name__} matches batch-norm statistics and needs "
                "a teacher with batch-norm layers; for a BN-fused network use the "
                "class-conditional synthesizer"
            )
        if config.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.dtype = autocast_dtype(config.precision, self.device)
        self._compiled: Callable[..., Any] | None = None  # see _step_function
        self.setup()

    # ---- what a method fills in -------------------------------------------------
    def setup(self) -> None:
        """A method's own construction, run once at the end of ``__init__`` (the teacher is
        frozen and on its device, ``self.config`` checked): find its layers, set its state.
        Methods override this instead of the constructor, calling ``super().setup()`` so
        that mixins (:class:`synthesizers.adi.StudentCompetition`) set theirs too."""

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Unweighted loss terms of one iteration, by name."""
        raise NotImplementedError

    def weights(self, stage: Stage) -> dict[str, float]:
        """The weight of every term in ``stage``."""
        raise NotImplementedError

    feature_side: ClassVar[str] = "input"  # which side of each feature layer is measured

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        """Layers whose ``feature_side`` statistics the loss reads (none by default)."""
        return []

    def stages(self) -> list[Stage]:
        return [Stage("main", self.config.iterations)]

    def parametrise(self, spec: SynthesisSpec) -> Parametrisation:
        init, c = spec.guidance.get("init_images"), self.config
        shape, start = spec.image_shape, c.start()
        return pixel_images(
            len(spec.labels), shape, spec.mean, spec.std, init, c.clip, start, c.spectrum
        )

    def optimizer(self, parametrisation: Parametrisation, stage: Stage) -> torch.optim.Optimizer:
        parameters = [p for p in parametrisation.parameters() if p.requires_grad]
        return adam(parameters, self.config.lr, self.config.betas, self.config.fused_optimizer)

    def prepare(self, spec: SynthesisSpec) -> None:
        """Per-request setup (auxiliary networks, guidance checks); nothing by default."""

    def after_step(self, ctx: StepContext) -> None:
        """Runs after each image step: train an auxiliary network alternately here."""

    def describe(self) -> dict[str, Any]:
        """What the last request asked of the method (its controls), recorded in each
        sample's json; nothing by default."""
        return {}

    def after_batch(self, result: SynthesisResult, accepted: torch.Tensor) -> None:
        """Runs once the filter has judged a batch: ``accepted`` is a (B,) bool mask of
        the samples of ``result`` that were kept. ADI distils its student on them here."""

    # ---- the loop -----------------------------------------------------------------
    def augment(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Random jitter, flip and blur of the teacher's input (:func:`jitter_flip_blur`)."""
        c = self.config
        return jitter_flip_blur(images, rng, c.jitter, c.flip, c.blur)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def teacher_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.teacher(inputs)

    def synthesize(self, spec: SynthesisSpec) -> SynthesisResult:
        """Optimise a batch for ``spec`` and return it with the teacher's verdict."""
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.seed)
            rng = random.Random(spec.seed)
            self.prepare(spec)
            parametrisation = self.parametrise(spec).to(self.device)
            labels = spec.labels.to(self.device)
            try:
                run = self._optimise(spec, parametrisation, labels, rng, start)
            finally:
                for name in self.step_state:
                    setattr(self, name, None)
            images, logits = self._verdict(parametrisation, run.best_images)
        losses = {name: float(value) for name, value in (run.best or run.final).items()}
        log.info("%s final %s", self.name, _format_terms(losses))
        return SynthesisResult(
            images=images.float().cpu(),
            labels=spec.labels.clone(),
            probs=torch.softmax(logits, dim=1).cpu(),
            logits=logits.cpu(),
            losses=losses,
            iterations=run.iterations,
            seconds=time.perf_counter() - start,
            checks=run.checks,
            stopped_early=run.stopped_early,
        )

    def forward_loss(
        self, ctx: StepContext, weights: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Teacher forward (sets ``ctx.logits``), loss terms and their weighted total: the
        step that ``compile`` compiles (augmentation and the optimiser stay outside).
        The context comes in built so that a compiled step is not specialised to
        ``ctx.iteration`` unless the method's loss reads it."""
        ctx.logits = self.teacher_forward(ctx.inputs)
        terms = self.loss_terms(ctx)
        return terms, weighted_total(terms, weights)

    def _step_function(self) -> Callable[..., Any]:
        """``forward_loss``, compiled once per synthesizer when ``compile`` resolves to on
        (fixed shapes per actor, so one compilation serves every batch)."""
        if self._compiled is None:
            iterations = sum(stage.iterations for stage in self.stages())
            if compile_enabled(self.config.compile, self.device, iterations):
                graphs = self.device.type == "cuda" and self.config.cuda_graphs
                mode = "reduce-overhead" if graphs else None
                self._compiled = torch.compile(self.forward_loss, mode=mode)
            else:
                self._compiled = self.forward_loss
        return self._compiled

    def _forward_loss(self, *args: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        step = self._step_function()
        if step == self.forward_loss:
            return step(*args)
        try:
            return step(*args)
        except Exception as error:  # a method torch.compile cannot trace: run eagerly
            log.warning("%s: torch.compile failed (%s); running eagerly", self.name, error)
            self._compiled = self.forward_loss
            return self.forward_loss(*args)

    def _optimise(
        self,
        spec: SynthesisSpec,
        parametrisation: Parametrisation,
        labels: torch.Tensor,
        rng: random.Random,
        start: float,
    ) -> LoopRecord:
        run = LoopRecord()
        stages = self.stages()
        scaler = grad_scaler(self.dtype, self.device)
        moments = fused_sample_moments if self.config.fused_moments else sample_moments
        affine = self.config.affine_batchnorm
        batchnorm = affine_batchnorm(list(self.teacher.modules())) if affine else nullcontext()
        with (
            batchnorm,
            capture_statistics(self.feature_layers(), self.feature_side, moments) as features,
        ):
            for number, stage in enumerate(stages):
                weights = self.weights(stage)
                optimizer = self.optimizer(parametrisation, stage)
                schedule = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, partial(lr_factor, **self._schedule(stage))
                )
                checking = (
                    self.config.early_stop
                    and spec.min_confidence is not None
                    and number == len(stages) - 1  # only the last stage ends a batch
                )
                for iteration in range(stage.iterations):
                    images = parametrisation()
                    inputs = self.augment(images, rng)
                    ctx = StepContext(
                        spec, stage, iteration, labels, images, inputs, _NO_LOGITS, features
                    )
                    terms, total = self._forward_loss(ctx, weights)
                    if self.config.keep_best and number == len(stages) - 1:
                        run.keep_if_best(images, terms, total)  # before the step moves them
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(total).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    parametrisation.project()
                    self.after_step(ctx)
                    run.iterations += 1
                    run.final = {
                        **{k: v.detach() for k, v in terms.items()},
                        "total": total.detach(),
                    }
                    every = self.config.log_every
                    if every and (iteration + 1) % every == 0:
                        log.info(
                            "%s %s %d/%d %s",
                            self.name,
                            stage.name,
                            iteration + 1,
                            stage.iterations,
                            _format_terms(run.final),
                        )
                    due = (iteration + 1) % self.config.early_stop_every == 0
                    last = iteration + 1 == stage.iterations
                    if (
                        checking
                        and due
                        and not last
                        and self._check(run, parametrisation, labels, spec.min_confidence, start)
                    ):
                        run.stopped_early = True
                        break
        return run

    def _schedule(self, stage: Stage) -> dict[str, Any]:
        c = self.config
        return {"iterations": stage.iterations, "schedule": c.lr_schedule, "warmup": c.warmup}

    def _check(
        self,
        run: LoopRecord,
        parametrisation: Parametrisation,
        labels: torch.Tensor,
        threshold: float,
        start: float,
    ) -> bool:
        """Early-stopping check: True when every image passes the filter as it would be
        stored (8-bit, fp32 teacher) and the total loss has plateaued since the last check."""
        _, logits = self._verdict(parametrisation)
        confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
        passed = float(((confidence >= threshold) & (predicted == labels)).float().mean())
        total = float(run.final["total"])
        previous = run.checks[-1]["total"] if run.checks else math.inf
        run.checks.append(
            {
                "iteration": run.iterations,
                "seconds": time.perf_counter() - start,
                "accepted": passed,
                "total": total,
            }
        )
        plateau = previous - total <= self.config.early_stop_tolerance * abs(previous)
        return passed == 1.0 and plateau

    @torch.no_grad()
    def _verdict(
        self, parametrisation: Parametrisation, normalised: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images quantised to 8 bits (as stored) and the teacher's fp32 logits on them,
        on the synthesizer's device: of ``normalised`` images (the kept best iterate) or
        of the parametrisation's current ones."""
        if normalised is None:
            normalised = parametrisation().detach()
        images = parametrisation.to_unit(normalised)
        images = (images * 255.0).round() / 255.0
        logits = self.teacher(parametrisation.normalise(images))
        return images, logits.float()


def _format_terms(terms: dict[str, Any]) -> str:
    return " ".join(f"{name}={float(value):.4g}" for name, value in terms.items())
