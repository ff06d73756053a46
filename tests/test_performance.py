"""Speed switches never change the maths; early stopping stops only when it should.

Each switch of ``SynthesizerConfig`` is turned on alone against the plain path (fp32,
NCHW, plain moments, per-tensor Adam, eager) on a tiny BN teacher, and the final loss
terms must agree within a tolerance that fits the switch (float32 rounding for exact
rewrites, a few percent for reduced precision).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_synthesizers import tiny_teacher

import synthesizers.base
from synthesizers import Stage, SynthesisSpec, build_synthesizer
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig
from synthesizers.losses import fused_sample_moments, sample_moments
from synthesizers.precision import compile_enabled
from synthesizers.spec import PLAIN_PATH as PLAIN

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def spec(
    seed: int = 1, min_confidence: float | None = None, classes: tuple[int, ...] = (0, 1, 2, 3)
) -> SynthesisSpec:
    labels = torch.tensor(classes * (8 // len(classes)))
    return SynthesisSpec(labels, (3, 16, 16), seed, MEAN, STD, min_confidence=min_confidence)


def losses(iterations: int = 4, **switches: object) -> dict[str, float]:
    config = DeepInversionConfig(iterations=iterations, **{**PLAIN, **switches})
    return build_synthesizer("deepinversion", tiny_teacher(), config).synthesize(spec()).losses


def assert_close(actual: dict[str, float], expected: dict[str, float], rtol: float) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert math.isclose(actual[name], value, rel_tol=rtol, abs_tol=1e-6), (name, actual)


@pytest.mark.parametrize(
    ("switch", "value", "rtol"),
    [
        ("fused_moments", True, 1e-4),
        ("fused_optimizer", True, 1e-4),
        ("affine_batchnorm", True, 1e-4),
        ("channels_last", True, 1e-4),
        ("precision", "bf16", 5e-2),
        ("precision", "fp16", 5e-2),
    ],
)
def test_each_switch_gives_the_plain_loss(switch: str, value: object, rtol: float) -> None:
    plain = losses()
    assert_close(losses(**{switch: value}), plain, rtol)
    assert plain["total"] < losses(iterations=1)["total"]  # the comparison is not vacuous


def test_every_switch_on_together_gives_the_plain_loss() -> None:
    optimised = {**PLAIN, "precision": "bf16", "channels_last": True}
    optimised |= {"fused_moments": True, "fused_optimizer": True, "affine_batchnorm": True}
    assert_close(losses(**optimised), losses(), 5e-2)


def test_compiled_step_gives_the_eager_loss() -> None:
    assert_close(losses(iterations=3, compile="on"), losses(iterations=3), 1e-3)


class TwoStageDeepInversion(DeepInversion):
    """Python-side per-step logic: two stages with their own weights, an after_step."""

    def stages(self) -> list[Stage]:
        return [Stage("warm", 2), Stage("main", 2)]

    def weights(self, stage: Stage) -> dict[str, float]:
        return {**super().weights(stage), "tv": 0.0 if stage.name == "warm" else 1e-3}

    def after_step(self, ctx) -> None:
        self.steps.append((ctx.stage.name, ctx.iteration, float(ctx.logits.detach().float().sum())))


def test_compiled_step_keeps_stages_and_after_step() -> None:
    runs = []
    for mode in ("on", "off"):
        config = DeepInversionConfig(**{**PLAIN, "compile": mode})
        synth = TwoStageDeepInversion(tiny_teacher(), config)
        synth.steps = []
        runs.append((synth.synthesize(spec()).losses, synth.steps))
    (compiled, compiled_steps), (eager, eager_steps) = runs
    assert_close(compiled, eager, 1e-3)
    assert [s[:2] for s in compiled_steps] == [s[:2] for s in eager_steps]
    assert [s[:2] for s in eager_steps] == [("warm", 0), ("warm", 1), ("main", 0), ("main", 1)]
    for (_, _, a), (_, _, b) in zip(compiled_steps, eager_steps, strict=True):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)  # after_step saw the logits


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog) -> None:
    def broken(step, **options):
        def run(*args):
            raise RuntimeError("cannot compile this")

        return run

    monkeypatch.setattr(synthesizers.base.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="dreamshard.synthesizers"):
        assert_close(losses(compile="on"), losses(), 1e-6)
    assert "running eagerly" in caplog.text


def test_compile_auto_is_on_for_cuda_and_for_long_cpu_runs() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_enabled("auto", cuda, 10) is True
    assert compile_enabled("auto", cpu, 60) is False
    assert compile_enabled("auto", cpu, 2000) is True
    assert compile_enabled("on", cpu, 2) is True
    assert compile_enabled("off", cuda, 2000) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moments_match_plain_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 5, 6, 7) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(4, 5), torch.randn(4, 5)
    results = []
    for moments in (sample_moments, fused_sample_moments):
        leaf = x.clone().requires_grad_()
        first, second = moments(leaf)
        ((first * weights[0]).sum() + (second * weights[1]).sum()).backward()
        assert first.dtype == second.dtype == torch.float32
        results.append((first, second, leaf.grad.float()))
    (first, second, grad), (fused_first, fused_second, fused_grad) = results
    torch.testing.assert_close(fused_first, first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_second, second, rtol=1e-5, atol=1e-5)
    # The fused backward runs in x's dtype, as autocast's other backward kernels do:
    # in bf16 the gradient agrees to bf16 rounding of its largest term.
    scale = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(fused_grad, grad, rtol=scale, atol=scale * grad.abs().max())
    with pytest.raises(ValueError, match="spatial"):
        fused_sample_moments(torch.randn(4, 5))


def test_early_stop_stops_only_when_every_image_passes_and_the_loss_plateaus() -> None:
    teacher = tiny_teacher()
    with torch.no_grad():  # sharper logits; the random teacher can reach classes 1 and 2
        teacher[-1].weight.mul_(20)
    config = DeepInversionConfig(  # cross-entropy alone: the teacher agrees within ~50 steps
        iterations=100, lr=0.1, bn_weight=0.0, tv_weight=0.0, early_stop=True
    )
    config.early_stop_every, config.early_stop_tolerance = 5, 0.5
    synth = build_synthesizer("deepinversion", teacher, config)
    threshold = 0.3
    result = synth.synthesize(spec(min_confidence=threshold, classes=(1, 2)))
    assert result.stopped_early and result.iterations < 100
    assert result.iterations == result.checks[-1]["iteration"]
    for before, check in zip([None, *result.checks], result.checks, strict=False):
        previous = math.inf if before is None else before["total"]
        holds = check["accepted"] == 1.0 and previous - check["total"] <= 0.5 * abs(previous)
        assert holds == (check is result.checks[-1])  # it stopped at the first check that held
    confidence, predicted = result.probs.max(dim=1)
    assert bool(((confidence >= threshold) & (predicted == result.labels)).all())


def test_early_stop_never_fires_while_some_image_fails() -> None:
    config = DeepInversionConfig(iterations=30, early_stop=True, early_stop_every=5)
    synth = build_synthesizer("deepinversion", tiny_teacher(), config)
    result = synth.synthesize(spec(min_confidence=1.0))  # no image reaches confidence 1
    assert not result.stopped_early and result.iterations == 30
    assert [c["iteration"] for c in result.checks] == [5, 10, 15, 20, 25]
    assert all(c["accepted"] < 1.0 for c in result.checks)


def test_early_stop_is_off_by_default_and_needs_a_threshold() -> None:
    teacher = tiny_teacher()
    default = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=10))
    assert DeepInversionConfig().early_stop is False
    assert default.synthesize(spec(min_confidence=0.0)).checks == []
    on = DeepInversionConfig(iterations=10, early_stop=True, early_stop_every=2)
    unthresholded = build_synthesizer("deepinversion", teacher, on).synthesize(spec())
    assert unthresholded.checks == [] and unthresholded.iterations == 10


def test_config_validates_the_switches() -> None:
    with pytest.raises(ValueError, match="compile"):
        DeepInversionConfig(compile="sometimes")
    with pytest.raises(ValueError, match="early_stop_every"):
        DeepInversionConfig(early_stop_every=0)
    with pytest.raises(ValueError, match="early_stop_tolerance"):
        DeepInversionConfig(early_stop_tolerance=1.5)


def test_worker_hands_the_filter_threshold_to_the_synthesizer(make_config) -> None:
    from pipeline.stages.synthesis import ShardWorker

    on = make_config(filter={"enabled": True, "min_confidence": 0.7})
    assert ShardWorker(on).spec([0, 1], 3).min_confidence == 0.7
    off = make_config(filter={"enabled": False})
    assert ShardWorker(off).spec([0, 1], 3).min_confidence is None


def test_affine_batchnorm_is_undone_after_synthesis() -> None:
    teacher = tiny_teacher()
    synth = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=1))
    synth.synthesize(spec())
    assert all("forward" not in vars(module) for module in teacher.modules())
