"""Adaptive DeepInversion: the competition term, the student distilled between batches,
determinism, and a run through the registry with a registry architecture as student."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from test_synthesizers import spec, tiny_teacher
from torch import nn

from pipeline.models.archs import build_architecture
from synthesizers import SynthesisResult, build_synthesizer
from synthesizers.adi import (
    AdaptiveDeepInversion,
    AdaptiveDeepInversionConfig,
    SmallStudent,
    jensen_shannon,
)


def adi(teacher: nn.Module | None = None, **fields) -> AdaptiveDeepInversion:
    fields = {"iterations": 2, "precision": "fp32", **fields}
    synth = build_synthesizer(
        "adi", teacher or tiny_teacher(), AdaptiveDeepInversionConfig(**fields)
    )
    assert isinstance(synth, AdaptiveDeepInversion)
    return synth


def student_state(synth: AdaptiveDeepInversion) -> dict[str, torch.Tensor]:
    assert synth.student is not None
    return {k: v.clone() for k, v in synth.student.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_jensen_shannon_is_zero_for_equal_and_at_most_log_two() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=generator) * 5
    assert float(jensen_shannon(logits, logits, 3.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(16, 10, generator=generator) * 5
    value = float(jensen_shannon(logits, other, 1.0))
    assert 0.0 < value < math.log(2)
    assert value == pytest.approx(float(jensen_shannon(other, logits, 1.0)), rel=1e-5)
    # disjoint, near one-hot distributions reach the bound
    confident = torch.eye(10)[:2] * 100  # (2, 10): class 0 and class 1
    disjoint = float(jensen_shannon(confident, confident.flip(0), 1.0))
    assert disjoint == pytest.approx(math.log(2), abs=1e-6)
    assert disjoint <= math.log(2) + 1e-6
    # a higher temperature softens both distributions: less divergence
    assert float(jensen_shannon(logits, other, 3.0)) < value


def test_identical_student_gives_competition_one() -> None:
    teacher = tiny_teacher()
    synth = adi(teacher)
    with pytest.raises(ValueError, match="not the teacher"):
        synth.attach_student(synth.teacher)
    synth.attach_student(copy.deepcopy(teacher))
    result = synth.synthesize(spec())
    assert result.losses["competition"] == pytest.approx(1.0, abs=1e-6)


def test_competition_term_is_weighted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    synth = adi(competition_weight=5.0, l2_weight=1e-3)
    with caplog.at_level(logging.INFO, logger="dreamshard.synthesizers"):
        result = synth.synthesize(spec())
    losses = result.losses
    assert set(losses) == {"ce", "bn", "tv", "l2", "competition", "total"}
    assert 1.0 - math.log(2) <= losses["competition"] <= 1.0
    c = synth.config
    expected = (
        c.ce_weight * losses["ce"]
        + c.bn_weight * losses["bn"]
        + c.tv_weight * losses["tv"]
        + c.l2_weight * losses["l2"]
        + 5.0 * losses["competition"]
    )
    assert losses["total"] == pytest.approx(expected, rel=1e-5)
    assert any("adi final" in r.message and "competition=" in r.message for r in caplog.records)


def test_competition_alone_drives_teacher_and_student_apart() -> None:
    """With every other weight 0 the images move to where the two networks disagree."""
    only = {"ce_weight": 0.0, "bn_weight": 0.0, "tv_weight": 0.0, "competition_weight": 1.0}
    first = adi(iterations=1, lr=0.1, **only).synthesize(spec())
    later = adi(iterations=10, lr=0.1, **only).synthesize(spec())
    assert later.losses["competition"] < first.losses["competition"] - 1e-4


def test_student_is_frozen_during_synthesis_and_gets_no_gradient() -> None:
    synth = adi()
    result = synth.synthesize(spec())  # the first batch, untrained default student
    assert isinstance(synth.student, SmallStudent)
    assert not synth.student.training
    assert all(not p.requires_grad and p.grad is None for p in synth.student.parameters())
    before = student_state(synth)
    synth.synthesize(spec(seed=2))
    assert same_state(before, student_state(synth))
    assert math.isfinite(result.losses["total"])


def test_after_batch_distils_only_on_accepted_images() -> None:
    synth = adi()
    result = synth.synthesize(spec())
    before = student_state(synth)
    synth.after_batch(result, torch.zeros(8, dtype=torch.bool))  # none accepted
    assert same_state(before, student_state(synth)) and synth.distill_loss is None

    keep = torch.tensor([True, False] * 4)
    synth.after_batch(result, keep)
    after = student_state(synth)
    assert not same_state(before, after)
    assert synth.student is not None and not synth.student.training
    assert all(not p.requires_grad for p in synth.student.parameters())

    # a twin that sees different pixels in the rejected slots ends in the same state
    twin = adi()
    twin_result = twin.synthesize(spec())
    assert torch.equal(twin_result.images, result.images)
    images = twin_result.images.clone()
    images[~keep] = torch.rand_like(images[~keep])
    logits = twin_result.logits.clone()
    logits[~keep] = torch.randn_like(logits[~keep])
    altered = SynthesisResult(
        images, result.labels, torch.softmax(logits, 1), logits, result.losses, 2, 0.0
    )
    twin.after_batch(altered, keep)
    assert same_state(after, student_state(twin))


def test_distillation_moves_the_student_towards_the_teacher() -> None:
    synth = adi(distill_steps=5, distill_lr=1e-2)
    result = synth.synthesize(spec())
    losses = []
    for _ in range(3):
        synth.after_batch(result, torch.ones(8, dtype=torch.bool))
        assert synth.distill_loss is not None
        losses.append(synth.distill_loss)
    assert losses[-1] < losses[0]


def test_sgd_student_optimiser_and_bad_masks() -> None:
    synth = adi(distill_optimizer="sgd", distill_lr=0.05)
    with pytest.raises(RuntimeError, match="synthesize"):
        synth.after_batch(synth_result_stub(), torch.ones(8, dtype=torch.bool))
    result = synth.synthesize(spec())
    before = student_state(synth)
    synth.after_batch(result, torch.ones(8, dtype=torch.bool))
    assert isinstance(synth.student_optimizer, torch.optim.SGD)
    assert not same_state(before, student_state(synth))
    with pytest.raises(ValueError, match=r"\(8,\) bool mask"):
        synth.after_batch(result, torch.arange(4))


def synth_result_stub() -> SynthesisResult:
    logits = torch.zeros(8, 4)
    return SynthesisResult(
        torch.zeros(8, 3, 16, 16), torch.zeros(8, dtype=torch.int64), logits, logits, {}, 0, 0.0
    )


def test_same_seed_same_images_and_same_student() -> None:
    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        synth = adi()
        images = []
        for seed in (5, 6):
            result = synth.synthesize(spec(seed=seed))
            synth.after_batch(result, result.probs.argmax(1) == result.labels)
            synth.after_batch(result, torch.ones(8, dtype=torch.bool))
            images.append(result.images)
        return images, student_state(synth)

    (first, second), state = run()
    (first_again, second_again), state_again = run()
    assert torch.equal(first, first_again) and torch.equal(second, second_again)
    assert same_state(state, state_again)
    # the distilled student changes the next batch: same seed, fresh student, other images
    fresh = adi().synthesize(spec(seed=6))
    assert not torch.equal(fresh.images, second)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="distill_optimizer must be one of adam, sgd"):
        AdaptiveDeepInversionConfig(distill_optimizer="rmsprop")
    with pytest.raises(ValueError, match="competition_weight"):
        AdaptiveDeepInversionConfig(competition_weight=-1.0)
    with pytest.raises(ValueError, match="competition_temperature"):
        AdaptiveDeepInversionConfig(competition_temperature=0.0)
    assert AdaptiveDeepInversionConfig().competition_weight == 10.0


def test_attached_student_must_match_the_teacher_classes() -> None:
    synth = adi()
    synth.attach_student(SmallStudent(num_classes=7))
    with pytest.raises(ValueError, match="7,.*4 classes"):
        synth.synthesize(spec())


def test_run_through_the_registry_with_a_registry_student() -> None:
    """Two batches end to end as a worker would run them: synthesize, filter, distil."""
    synth = adi(iterations=3, student_arch="resnet20")
    with pytest.raises(ValueError, match="student_arch is 'resnet20' but no student"):
        synth.synthesize(spec())
    torch.manual_seed(0)
    student = build_architecture(synth.config.student_arch, 4)
    synth.attach_student(student)
    before = student_state(synth)
    for seed in (1, 2):
        result = synth.synthesize(spec(seed=seed))
        assert result.images.shape == (8, 3, 16, 16) and result.probs.shape == (8, 4)
        assert all(math.isfinite(v) for v in result.losses.values())
        synth.after_batch(result, result.probs.max(1).values >= 0.0)
    assert synth.student is student  # the attached module itself is trained
    assert not same_state(before, student_state(synth))
