"""The shared optimisation loop every synthesizer runs.

A method subclasses :class:`Synthesizer` and fills in only what is its own: the loss
terms (:meth:`Synthesizer.loss_terms`) with their weights, and where it differs, the
thing optimised (:meth:`Synthesizer.parametrise`: pixels by default, a generator for
NaturalInversion), the stages (IMAGINE runs two), the layers whose statistics it reads,
and an auxiliary network trained alternately (:meth:`Synthesizer.after_step`).
The base owns seeding, mixed precision, channels_last, augmentation, the hooks, the
optimiser and its cosine schedule, the sum of the weighted terms and their logging.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from synthesizers.hooks import capture_statistics
from synthesizers.parametrisation import Parametrisation, PixelImages
from synthesizers.precision import autocast_dtype
from synthesizers.spec import (
    Stage,
    StepContext,
    SynthesisResult,
    SynthesisSpec,
    SynthesizerConfig,
)

log = logging.getLogger("dreamshard.synthesizers")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: only the input is optimised."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one place where loss terms are summed. A term without a weight is an error."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"loss terms without a weight: {', '.join(missing)}")
    total = None
    for name, value in terms.items():
        weight = weights[name]
        if weight == 0.0:
            continue
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("every loss term has weight 0: nothing to optimise")
    return total


class Synthesizer:
    """Base class: builds from a frozen teacher and a config, owns the loop."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SynthesizerConfig]] = SynthesizerConfig
    uses_metadata: ClassVar[bool] = False  # needs per-target statistics (the metadata stage)
    needs_batchnorm: ClassVar[bool] = False  # reads BN running statistics (no fused teacher)

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
        if config.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.dtype = autocast_dtype(config.precision, self.device)

    # ---- what a method fills in -------------------------------------------------
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
        init = spec.guidance.get("init_images")
        return PixelImages(len(spec.labels), spec.image_shape, spec.mean, spec.std, init)

    def optimizer(self, parametrisation: Parametrisation, stage: Stage) -> torch.optim.Optimizer:
        parameters = [p for p in parametrisation.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.Adam(parameters, lr=self.config.lr, betas=self.config.betas, **fused)

    def prepare(self, spec: SynthesisSpec) -> None:
        """Per-request setup (auxiliary networks, guidance checks); nothing by default."""

    def after_step(self, ctx: StepContext) -> None:
        """Runs after each image step: train an auxiliary network alternately here."""

    def after_batch(self, result: SynthesisResult, accepted: torch.Tensor) -> None:
        """Runs once the filter has judged a batch: ``accepted`` is a (B,) bool mask of
        the samples of ``result`` that were kept. ADI distils its student on them here."""

    # ---- the loop -----------------------------------------------------------------
    def augment(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Random jitter (a roll by up to ``jitter`` pixels) and a random flip."""
        limit = self.config.jitter
        if limit:
            dx, dy = rng.randint(-limit, limit), rng.randint(-limit, limit)
            images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        if self.config.flip and rng.random() < 0.5:
            images = torch.flip(images, dims=(3,))
        return images

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
            final, iterations = self._optimise(spec, parametrisation, labels, rng)
            images, logits = self._verdict(parametrisation)
        losses = {name: float(value) for name, value in final.items()}
        log.info("%s final %s", self.name, _format_terms(losses))
        return SynthesisResult(
            images=images,
            labels=spec.labels.clone(),
            probs=torch.softmax(logits, dim=1),
            logits=logits,
            losses=losses,
            iterations=iterations,
            seconds=time.perf_counter() - start,
        )

    def _optimise(
        self,
        spec: SynthesisSpec,
        parametrisation: Parametrisation,
        labels: torch.Tensor,
        rng: random.Random,
    ) -> tuple[dict[str, torch.Tensor], int]:
        final: dict[str, torch.Tensor] = {}
        done = 0
        with capture_statistics(self.feature_layers(), self.feature_side) as features:
            for stage in self.stages():
                weights = self.weights(stage)
                optimizer = self.optimizer(parametrisation, stage)
                schedule = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda i, n=stage.iterations: 0.5 * (1 + math.cos(math.pi * i / n))
                )
                for iteration in range(stage.iterations):
                    images = parametrisation()
                    inputs = self.augment(images, rng)
                    logits = self.teacher_forward(inputs)
                    ctx = StepContext(
                        spec, stage, iteration, labels, images, inputs, logits, features
                    )
                    terms = self.loss_terms(ctx)
                    total = weighted_total(terms, weights)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    schedule.step()
                    parametrisation.project()
                    self.after_step(ctx)
                    done += 1
                    final = {**{k: v.detach() for k, v in terms.items()}, "total": total.detach()}
                    every = self.config.log_every
                    if every and (iteration + 1) % every == 0:
                        log.info(
                            "%s %s %d/%d %s",
                            self.name,
                            stage.name,
                            iteration + 1,
                            stage.iterations,
                            _format_terms(final),
                        )
        return final, done

    @torch.no_grad()
    def _verdict(self, parametrisation: Parametrisation) -> tuple[torch.Tensor, torch.Tensor]:
        """Images quantised to 8 bits (as stored) and the teacher's fp32 logits on them."""
        images = parametrisation.to_unit(parametrisation().detach())
        images = (images * 255.0).round() / 255.0
        logits = self.teacher(parametrisation.normalise(images))
        return images.float().cpu(), logits.float().cpu()


def _format_terms(terms: dict[str, Any]) -> str:
    return " ".join(f"{name}={float(value):.4g}" for name, value in terms.items())
