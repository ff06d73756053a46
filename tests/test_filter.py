"""The filter stage: teacher confidence and argmax, an independent verifier, per-class
accept rates in sidecars and the manifest, and a class that keeps failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RESNET20, shared

from pipeline.config import FilterConfig, TeacherConfig
from pipeline.graph import run_job
from pipeline.models.archs import build_architecture
from pipeline.models.teachers import load_teacher, save_checkpoint
from pipeline.stages.synthesis import accepted
from synthesizers import SynthesisResult


def always(label: int, path: Path) -> str:
    """A ResNet-20 checkpoint that predicts ``label`` whatever the image."""
    model = build_architecture("resnet20", 10).eval()
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.bias[label] = 5.0
    save_checkpoint(model, TeacherConfig(checkpoint=str(path)), str(path))
    return str(path)


def result(labels: list[int], predicted: list[int], confidence: float) -> SynthesisResult:
    probs = torch.full((len(labels), 10), (1 - confidence) / 9)
    probs[torch.arange(len(labels)), torch.tensor(predicted)] = confidence
    return SynthesisResult(
        images=torch.rand(len(labels), 3, 32, 32),
        labels=torch.tensor(labels),
        probs=probs,
        logits=probs.log(),
        losses={},
        iterations=1,
        seconds=0.0,
    )


def test_confidence_argmax_and_verifier_each_reject(tmp_path: Path) -> None:
    batch = result([0, 1, 2, 0], predicted=[0, 1, 5, 0], confidence=0.8)
    assert accepted(batch, FilterConfig(min_confidence=0.5)).tolist() == [True, True, False, True]
    assert not accepted(batch, FilterConfig(min_confidence=0.9)).any()
    assert accepted(batch, FilterConfig(enabled=False, min_confidence=0.9)).all()
    verifier = load_teacher(TeacherConfig(checkpoint=always(0, tmp_path / "zero.pt")))
    kept = accepted(batch, FilterConfig(min_confidence=0.5), verifier)
    assert kept.tolist() == [True, False, False, True]


def test_a_verifier_that_disagrees_empties_a_class_and_the_run_says_which(
    make_config, tmp_path: Path
) -> None:
    verifier = always(0, tmp_path / "zero.pt")
    config = make_config(
        teacher={"checkpoint": str(shared(RESNET20))},
        synthesizer={"name": "deepinversion", "iterations": 30, "lr": 0.1},
        plan={"num_images": 16, "batch_size": 8, "shard_size": 16, "classes": [0, 1]},
        filter={
            "enabled": True,
            "min_confidence": 0.0,
            "max_attempts": 2,
            "verifier": {"arch": "resnet20", "checkpoint": verifier},
        },
    )
    manifest = run_job(config)
    per_class = manifest["totals"]["per_class"]
    assert per_class["1"]["written"] == 0 and per_class["1"]["passed"] == 0
    assert per_class["1"]["synthesized"] >= 8 and per_class["1"]["accept_rate"] == 0
    assert manifest["totals"]["failing_classes"]["1"]["missing"] == 8
    assert per_class["0"]["written"] >= 1  # the teacher and the verifier both see class 0
    assert manifest["totals"]["classes"] == {"0": per_class["0"]["written"]}
    sidecar = json.loads((tmp_path / "out" / "test" / "shards" / "train-000000.json").read_text())
    assert sidecar["per_class"]["1"]["missing"] == 8
    assert sidecar["attempts"] == 2 * 2  # two batches, each retried once, never looping


@pytest.mark.parametrize("field", ["arch", "checkpoint"])
def test_verifier_section_is_validated(make_config, field: str) -> None:
    from pipeline.errors import InputError

    bad = {"arch": "resnet20", "checkpoint": "x.pt", field: 3}
    with pytest.raises(InputError, match=f"filter.verifier.{field}: expected a string"):
        make_config(filter={"verifier": bad})


def test_with_the_filter_off_a_sample_stores_its_labels_probability(
    make_config, tmp_path: Path
) -> None:
    """A teacher that puts every image in class 0: class 1's samples are stored (filter
    off) with the teacher's low probability of class 1, not the high one of class 0, and
    the accept rates say what the filter would have kept."""
    config = make_config(
        teacher={"checkpoint": always(0, tmp_path / "zero.pt")},
        synthesizer={"name": "deepinversion", "iterations": 2},
        plan={"num_images": 8, "batch_size": 8, "shard_size": 8, "classes": [0, 1]},
        filter={"enabled": False},
    )
    manifest = run_job(config)
    per_class = manifest["totals"]["per_class"]
    assert per_class["0"]["written"] == per_class["1"]["written"] == 4  # every image kept
    assert (per_class["0"]["accept_rate"], per_class["1"]["accept_rate"]) == (1.0, 0.0)
    assert "failing_classes" not in manifest["totals"]
    sidecar = json.loads((tmp_path / "out" / "test" / "shards" / "train-000000.json").read_text())
    confidence = {label: [] for label in (0, 1)}
    for _key, label, value, _seed in sidecar["index"]:
        confidence[label].append(value)
    assert len(confidence[0]) == len(confidence[1]) == 4
    assert min(confidence[0]) > 0.9 and max(confidence[1]) < 0.1
