"""The one training loop (KD, from scratch, pruned fine-tuning): :func:`run_loop`, one
rank's part of it, wherever :func:`evaluation.fitting.fit` runs it (Ray Train workers or
this process). Each worker streams its share of the shards
(:class:`evaluation.loader.ShardDataset`); rank 0 evaluates on the real test set every
``eval_every`` epochs and after the last, and after every epoch hands a checkpoint
(model, optimizer, schedule, history) to its :class:`Worker`'s ``report``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from evaluation.attention import AttentionTransfer
from evaluation.loader import ShardDataset, ShardRef
from evaluation.views import blur, mix, recolour
from pipeline.models.accuracy import classifier_accuracy

CHECKPOINT_FILE = "state.pt"


@dataclass
class TrainJob:
    """Everything a Ray Train worker needs (pickled into the trainer's config)."""

    model: nn.Module  # the student, or the pruned teacher, before training
    teacher: nn.Module | None  # online KD targets; None: stored logits or hard labels only
    shards: list[ShardRef]
    test: tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, H, W), labels (N,)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    num_classes: int
    epochs: int
    batch_size: int  # global, split over the workers
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    temperature: float = 5.0
    alpha: float = 0.0  # 0: hard labels only
    attention: float = 0.0  # attention transfer's weight β (0: off); needs the teacher
    stored_logits: bool = False
    shuffle_buffer: int = 1000
    loader_workers: int = 1
    augment: bool = True
    mixup: float = 0.0  # Beta(mixup, mixup) batch mixing (targets from the mixed images)
    colour: float = 0.0  # recolour's strength (targets from the recoloured images)
    blur: float = 0.0  # blur's largest sigma in pixels (targets from the blurred images)
    jpeg: int = 0  # lowest JPEG quality of the loader's re-encoding; 0: off
    jpeg_teacher: str = "view"  # the teacher answers the re-encoded view or the stored image
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1  # epochs between test-set evaluations; the last epoch always is one


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    mixed: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Hinton KD: ``alpha`` T² KL(teacher_T ‖ student_T) + (1 - ``alpha``) CE(labels).

    ``mixed`` = (the other images' labels, λ) for a mixed batch: the hard term is
    λ CE(labels) + (1 - λ) CE(other labels); the teacher's logits are already those of
    the mixed images."""
    hard = F.cross_entropy(student, labels)
    if mixed is not None:
        other, lam = mixed
        hard = lam * hard + (1 - lam) * F.cross_entropy(student, other)
    if teacher is None or alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def evaluate(model: nn.Module, job: TrainJob, device: torch.device | None = None) -> dict:
    """Top-1 and per-class accuracy of ``model`` on the job's real test set (default: CPU)."""
    images, labels = job.test
    return classifier_accuracy(model, images, labels, job.mean, job.std, job.num_classes, device)


def schedule_factor(job: TrainJob, epoch: int) -> float:
    """The learning-rate multiplier for ``epoch`` (0-based)."""
    if job.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / job.epochs))
    return job.gamma ** sum(epoch >= round(m * job.epochs) for m in job.milestones)


@dataclass
class Worker:
    """Where :func:`run_loop` runs: a Ray Train worker, or this process
    (``runtime.executor: inline``)."""

    rank: int
    world: int
    device: torch.device
    saved: dict[str, Any] | None  # the last checkpoint's contents, to resume from
    prepare: Callable[[nn.Module], nn.Module]  # onto the device (DDP under Ray)
    report: Callable[[dict[str, Any], str | None], None]  # metrics, the checkpoint's folder


def run_loop(job: TrainJob, worker: Worker) -> None:
    """Train ``job.model`` for the epochs the checkpoint has not done yet: one rank's share
    of every epoch; rank 0 evaluates and hands each epoch's checkpoint to ``worker.report``."""
    rank, world, device, saved = worker.rank, worker.world, worker.device, worker.saved
    torch.manual_seed(job.seed + rank)
    model = job.model
    state = {"epoch": 0, "history": [], "best": None, "resumed_from": []}
    if saved is not None:
        model.load_state_dict(saved["model"])
        state = saved["state"]
        state["resumed_from"].append(state["epoch"])
    model = worker.prepare(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay
    )
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])  # moves its state to the device
    teacher = job.teacher.to(device).eval() if job.teacher is not None else None
    transfer = None
    if job.attention:
        if teacher is None:
            raise ValueError("train.attention needs the teacher run on every batch")
        plain = model.module if world > 1 else model
        shape = (len(job.mean), job.image_size, job.image_size)
        transfer = AttentionTransfer(plain, teacher, shape)
    per_worker = max(1, -(-job.batch_size // world))
    dataset = ShardDataset(
        job.shards,
        job.mean,
        job.std,
        image_size=job.image_size,
        rank=rank,
        world_size=world,
        shuffle_buffer=job.shuffle_buffer,
        logits=job.stored_logits,
        augment=job.augment,
        jpeg=job.jpeg,
        jpeg_teacher=job.jpeg_teacher,
        seed=job.seed,
        storage_options=job.storage_options,
        batch_size=per_worker,
    )
    for epoch in range(state["epoch"], job.epochs):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = job.lr * schedule_factor(job, epoch)
        dataset.set_epoch(epoch)
        # batches of the planned sizes: the same step count on every rank, no sample dropped
        loader = DataLoader(dataset, batch_size=None, num_workers=job.loader_workers)
        steps = dataset.steps()
        loss_sum, seen = _epoch(model, teacher, loader, optimizer, job, device, steps, transfer)
        loss_sum, seen = _summed(loss_sum, seen, world, device)
        entry = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_seen": seen,  # over all ranks: the epoch's samples, each once
            "seconds": time.perf_counter() - started,
        }
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                if (epoch + 1) % job.eval_every == 0 or epoch + 1 == job.epochs:
                    result = evaluate(model.module if world > 1 else model, job, device)
                    entry.update(test_accuracy=result["accuracy"], per_class=result["per_class"])
                    best = state["best"]
                    if best is None or result["accuracy"] > best["test_accuracy"]:
                        state["best"] = {"epoch": epoch + 1, "test_accuracy": result["accuracy"]}
                state["history"].append(entry)
                state["epoch"] = epoch + 1
                plain = model.module if world > 1 else model
                torch.save(
                    {
                        "model": {k: v.cpu() for k, v in plain.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "state": state,
                    },
                    os.path.join(folder, CHECKPOINT_FILE),
                )
            metrics = {k: v for k, v in entry.items() if k != "per_class"}
            worker.report(metrics, folder if rank == 0 else None)


def _epoch(model, teacher, loader, optimizer, job: TrainJob, device, steps: int, transfer=None):
    model.train()
    loss_sum, seen, taken = 0.0, 0, 0
    with transfer.tapped() if transfer is not None else nullcontext() as attention:
        for batch in loader:
            loss = _step(model, teacher, attention, batch, optimizer, job, device)
            taken += 1
            loss_sum += loss * len(batch[1])
            seen += len(batch[1])
    if taken != steps:  # the other ranks would wait for this one forever
        raise RuntimeError(f"the loader yielded {taken} batches, {steps} were planned")
    return loss_sum, seen


def _step(model, teacher, attention, batch, optimizer, job: TrainJob, device) -> float:
    """One optimiser step on ``batch``; its mean loss. ``attention``: the attention-transfer
    term of the step's forward passes (or None)."""
    images, labels = batch[0].to(device), batch[1].to(device)
    images = blur(recolour(images, job.colour, job.mean, job.std), job.blur)
    images, mixed = mix(images, labels, job.mixup)
    if job.stored_logits:
        targets = batch[2].to(device)
    elif teacher is not None:
        seen_by_teacher = batch[2].to(device) if len(batch) > 2 else images
        with torch.no_grad():
            targets = teacher(seen_by_teacher)
    else:
        targets = None
    loss = kd_loss(model(images), targets, labels, job.temperature, job.alpha, mixed)
    if attention is not None:
        loss = loss + job.attention * attention()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _summed(loss_sum: float, seen: int, world: int, device: torch.device) -> tuple[float, int]:
    """The epoch's loss sum and sample count over all ranks."""
    if world == 1:
        return loss_sum, seen
    import torch.distributed as dist

    totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals[0].item(), round(totals[1].item())
