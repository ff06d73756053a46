"""The class-conditional synthesizer (Eq. 4–7) on a tiny teacher, with BN and without."""

from __future__ import annotations

import pytest
import torch
from test_synthesizers import MEAN, STD, metadata_guidance, spec, tiny_teacher
from torch import nn

from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.class_conditional import ClassConditionalConfig, conditional_statistics_loss
from synthesizers.hooks import capture_statistics


def bn_free_teacher(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def test_layers_default_to_bn_inputs_or_conv_outputs_and_names_are_checked() -> None:
    with_bn = build_synthesizer("class-conditional", tiny_teacher())
    assert [n for n, _ in with_bn.feature_layers()] == ["1", "4"]
    assert with_bn.feature_side == "input"
    fused = build_synthesizer("class-conditional", bn_free_teacher())
    assert [n for n, _ in fused.feature_layers()] == ["0", "2"]
    assert fused.feature_side == "output"
    named = build_synthesizer(
        "class-conditional", tiny_teacher(), ClassConditionalConfig(layers=["3"])
    )
    assert named.feature_side == "output"
    with pytest.raises(KeyError, match="valid layers"):
        build_synthesizer("class-conditional", tiny_teacher(), ClassConditionalConfig(layers=["x"]))


def test_loss_is_zero_when_each_class_matches_its_own_statistics() -> None:
    teacher = tiny_teacher()
    layers = [("1", teacher[1]), ("4", teacher[4])]
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 1, 3, 3, 3])
    with torch.no_grad(), capture_statistics(layers, "input") as records:
        teacher(x)
        own = {r.name: r.per_class(labels, 4)[:2] for r in records}
        assert conditional_statistics_loss(records, own, labels) < 1e-5
        shifted = {name: (mean + 1.0, var) for name, (mean, var) in own.items()}
        # each layer has 8 channels: ‖1‖₂ = √8 per present class, averaged, summed over 2 layers
        expected = 2 * 8**0.5
        assert conditional_statistics_loss(records, shifted, labels) == pytest.approx(
            expected, rel=1e-4
        )
        # a class absent from the batch does not count, whatever its statistics
        own["1"][0][2] += 100.0
        assert conditional_statistics_loss(records, own, labels) < 1e-5


@pytest.mark.parametrize("make_teacher", [tiny_teacher, bn_free_teacher])
def test_optimisation_pulls_each_class_toward_its_statistics(make_teacher) -> None:
    teacher = make_teacher()
    config = ClassConditionalConfig(iterations=60, lr=0.1, jitter=0, flip=False)
    synth = build_synthesizer("class-conditional", teacher, config)
    guidance = metadata_guidance(synth)
    short = build_synthesizer("class-conditional", teacher, ClassConditionalConfig(iterations=1))
    first = spec()
    first.guidance.update(guidance)
    request = spec()
    request.guidance.update(guidance)
    before = short.synthesize(first).losses
    after = synth.synthesize(request).losses
    assert set(after) == {"ce", "cc", "tv", "l2", "total"}
    assert after["cc"] < 0.5 * before["cc"]
    assert after["total"] < before["total"]


def test_statistics_index_groups_samples_by_seed_not_by_class() -> None:
    synth = build_synthesizer(
        "class-conditional", tiny_teacher(), ClassConditionalConfig(iterations=2)
    )
    statistics = metadata_guidance(synth)["class_statistics"]
    request = SynthesisSpec(
        torch.tensor([2, 2, 2, 2]),
        (3, 16, 16),
        1,
        MEAN,
        STD,
        {"class_statistics": statistics, "statistics_index": torch.tensor([0, 0, 1, 3])},
    )
    result = synth.synthesize(request)
    assert result.labels.tolist() == [2, 2, 2, 2]
    bad = SynthesisSpec(
        torch.tensor([0, 1]),
        (3, 16, 16),
        1,
        MEAN,
        STD,
        {"class_statistics": statistics, "statistics_index": torch.tensor([0, 9])},
    )
    with pytest.raises(ValueError, match="statistics_index"):
        synth.synthesize(bad)
    with pytest.raises(ValueError, match="class_statistics"):
        synth.synthesize(spec())
