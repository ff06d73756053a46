"""Attention transfer in KD (no Ray): the paper's loss, levels paired by feature-map size
without touching the student's batch-norm statistics, a student that learns the teacher's
maps through the training loop, and the config that turns it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evaluation_support import write_sized_shards
from test_evaluation_kd import config_for

from evaluation.attention import AttentionTransfer, attention_loss, attention_map
from evaluation.config import parse_eval_config
from evaluation.inputs import prepare
from evaluation.kd import kd_targets, student_job
from evaluation.loader import ShardDataset
from evaluation.training import Worker, run_loop
from pipeline.models.archs import build_architecture

SHAPE = (3, 32, 32)


def test_attention_loss_is_the_papers() -> None:
    torch.manual_seed(0)
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    teacher = [torch.randn(2, 16, 8, 8), torch.randn(2, 3, 4, 4)]
    maps = attention_map(student[0])
    assert maps.shape == (2, 64) and torch.allclose(maps.norm(dim=1), torch.ones(2))
    assert attention_loss(teacher, teacher).item() == 0.0
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        q_s, q_t = (s**2).mean(1).reshape(2, -1), (t**2).mean(1).reshape(2, -1)
        q_s, q_t = q_s / q_s.norm(dim=1, keepdim=True), q_t / q_t.norm(dim=1, keepdim=True)
        expected += ((q_s - q_t) ** 2).mean().item() / 2
    assert attention_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_levels_pair_by_size_and_probing_leaves_the_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    student, teacher = build_architecture("resnet20", 10), build_architecture("resnet32", 10)
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in (student, teacher)]
    transfer = AttentionTransfer(student, teacher, SHAPE)
    assert transfer.pairs == [(f"layer{i}", f"layer{i}") for i in (1, 2, 3)]
    for network, kept in zip((student, teacher), before, strict=True):
        assert network.training  # left in the mode it was in
        assert all(torch.equal(kept[k], v) for k, v in network.state_dict().items())
    # a network whose maps share no size with the student's cannot be paired
    coarse = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=11), torch.nn.Flatten())
    with pytest.raises(ValueError, match="share no spatial size"):
        AttentionTransfer(student, coarse, SHAPE)


def test_the_attention_term_moves_the_student_and_never_the_teacher() -> None:
    torch.manual_seed(0)
    student = build_architecture("resnet20", 10)
    teacher = build_architecture("resnet32", 10).eval()
    kept = [p.clone() for p in teacher.parameters()]
    transfer = AttentionTransfer(student, teacher, SHAPE)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(16, *SHAPE)
    losses = []
    with transfer.tapped() as attention:
        for _ in range(30):
            with torch.no_grad():
                teacher(images)
            student(images)
            loss = 1000 * attention()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(kept, teacher.parameters(), strict=True))
    student(images)  # the hooks are gone with the block: nothing is kept any more
    assert all(not m._forward_hooks for m in transfer.student + transfer.teacher)


def trained_maps_gap(tmp_path: Path, checkpoint: str, attention: float) -> float:
    """The attention loss, on the shards' images, of a student trained four epochs with
    ``train.attention: attention`` (seeded alike for every weight)."""
    shards = write_sized_shards(tmp_path / "run", [24, 16])
    config = config_for(tmp_path, checkpoint, shards, augment=False)
    config["train"].update(epochs=4, batch_size=8, lr=0.05, attention=attention, alpha=0.5)
    inputs = prepare(parse_eval_config(config), "kd")
    torch.manual_seed(0)
    job = student_job(inputs, build_architecture("resnet20", 10), "kd")
    reports: list[dict] = []
    worker = Worker(0, 1, torch.device("cpu"), None, lambda m: m, lambda m, _: reports.append(m))
    run_loop(job, worker)
    assert [r["samples_seen"] for r in reports] == [40] * 4
    model, teacher = job.model.eval(), inputs.teacher.model.eval()
    transfer = AttentionTransfer(model, teacher, SHAPE)
    images = torch.cat([b[0] for b in ShardDataset(job.shards, job.mean, job.std, batch_size=8)])
    with torch.no_grad(), transfer.tapped() as gap:
        model(images), teacher(images)
        return gap().item()


def test_a_student_trained_with_attention_learns_the_teachers_maps(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    without = trained_maps_gap(tmp_path / "off", teacher_checkpoint, 0.0)
    with_attention = trained_maps_gap(tmp_path / "on", teacher_checkpoint, 10000.0)
    assert with_attention < 0.5 * without


def test_attention_runs_the_teacher_even_with_stored_logits_and_never_in_scratch(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    shards = write_sized_shards(tmp_path / "run", [6, 4])
    config = config_for(tmp_path, teacher_checkpoint, shards, augment=False)
    config["train"]["attention"] = 1000
    parsed = parse_eval_config(config)
    inputs = prepare(parsed, "kd")
    job = student_job(inputs, build_architecture("resnet20", 10), "kd")
    assert job.teacher is not None and not job.stored_logits and job.attention == 1000
    assert kd_targets(parsed, "kd").endswith("its attention maps too (weight 1000)")
    scratch = student_job(inputs, build_architecture("resnet20", 10), "scratch")
    assert scratch.teacher is None and scratch.attention == 0
    config["train"]["attention"] = -1
    with pytest.raises(ValueError, match="attention is a non-negative weight"):
        parse_eval_config(config)
