"""The one training loop (KD, from scratch, pruned fine-tuning), under Ray Train or inline.

:func:`fit` runs :func:`run_loop` on ``runtime.num_workers`` ``TorchTrainer`` workers
(gloo on CPU, nccl on GPU), or with ``runtime.executor: inline`` as one worker in this
process (no Ray: one GPU, debugging). Each worker streams its share of the shards
(:class:`evaluation.loader.ShardDataset`); rank 0 evaluates on the real test set every
``eval_every`` epochs and after the last, and after every epoch saves a checkpoint
(model, optimizer, schedule, history) into the run's storage. When a worker dies, Ray
Train restarts the group (``FailureConfig``) and the loop resumes from the last checkpoint,
not from epoch 0; an inline run that stops resumes from it when run again.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from evaluation.config import EvalRuntimeConfig
from evaluation.loader import ShardDataset, ShardRef
from evaluation.split import steps_per_rank
from evaluation.views import blur, mix, recolour
from pipeline.errors import InputError
from pipeline.execution.executor import connect_ray
from pipeline.io.storage import (
    atomic_open,
    exists,
    filesystem,
    join,
    protocol_of,
    read_bytes,
)
from pipeline.models.accuracy import classifier_accuracy
from pipeline.models.teachers import load_weights

log = logging.getLogger("dreamshard.evaluation")
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


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop under Ray Train."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    torch.set_num_threads(config.get("threads", 1))
    checkpoint, saved = ray.train.get_checkpoint(), None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, CHECKPOINT_FILE)
            saved = load_weights(path, f"Ray Train checkpoint {path}")

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)

    worker = Worker(
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        saved=saved,
        prepare=ray.train.torch.prepare_model,  # DDP; moves to the device
        report=report,
    )
    run_loop(config["job"], worker)


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
        loss_sum, seen = _epoch(model, teacher, loader, optimizer, job, device, dataset.steps())
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


def _epoch(model, teacher, loader, optimizer, job: TrainJob, device, steps: int):
    model.train()
    loss_sum, seen, taken = 0.0, 0, 0
    for batch in loader:
        taken += 1
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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        seen += len(labels)
    if taken != steps:  # the other ranks would wait for this one forever
        raise RuntimeError(f"the loader yielded {taken} batches, {steps} were planned")
    return loss_sum, seen


def _summed(loss_sum: float, seen: int, world: int, device: torch.device) -> tuple[float, int]:
    """The epoch's loss sum and sample count over all ranks."""
    if world == 1:
        return loss_sum, seen
    import torch.distributed as dist

    totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals[0].item(), round(totals[1].item())


def connect(runtime: EvalRuntimeConfig):
    """Ray: already initialised, ``runtime.address`` / ``RAY_ADDRESS``, or a local cluster."""
    return connect_ray(runtime.address)


def check_placement(runtime: EvalRuntimeConfig, resources: dict[str, float]) -> None:
    """:class:`InputError` when the cluster cannot place the workers (instead of hanging)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if runtime.use_gpu and gpus < runtime.num_workers:
        raise InputError(
            f"runtime.num_workers={runtime.num_workers} with use_gpu needs "
            f"{runtime.num_workers} GPUs; the Ray cluster has {gpus:g}"
        )
    needed = runtime.num_workers * runtime.cpus_per_worker
    if cpus < needed:
        raise InputError(
            f"runtime.num_workers={runtime.num_workers} x cpus_per_worker="
            f"{runtime.cpus_per_worker:g} needs {needed:g} CPUs; the Ray cluster has {cpus:g}. "
            "Lower runtime.num_workers or cpus_per_worker"
        )


def storage_for(url: str, options: dict[str, Any] | None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train from an fsspec URL."""
    if protocol_of(url) == "file":
        return os.path.abspath(url.removeprefix("file://")), None
    import pyarrow.fs

    fs, path = filesystem(url, options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit(
    job: TrainJob, runtime: EvalRuntimeConfig, storage_url: str, name: str, options=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``job`` under ``TorchTrainer`` (``runtime.executor: ray``) or in this process
    (``inline``); returns (trained model, history and best/final). Either resumes from the
    last epoch's checkpoint in ``{storage_url}/{name}``."""
    total = sum(shard.samples for shard in job.shards)
    workers = runtime.num_workers if runtime.executor == "ray" else 1
    steps_per_rank(total, workers, 1)  # InputError before any worker starts
    if runtime.executor == "inline":
        saved, where = _fit_inline(job, runtime, join(storage_url, name), options)
    else:
        saved, where = _fit_ray(job, runtime, storage_url, name, options)
    model = copy.deepcopy(job.model)
    model.load_state_dict(saved["model"])
    state = saved["state"]
    final = state["history"][-1]
    summary = {
        "history": state["history"],
        "best": state["best"],
        "final": {"epoch": final["epoch"], "test_accuracy": final["test_accuracy"]},
        # .get: a checkpoint from before samples_seen was recorded resumes too
        "samples_seen": [entry.get("samples_seen") for entry in state["history"]],
        "per_class": final["per_class"],
        "resumed_from": state["resumed_from"],
        "checkpoints": where,
    }
    return model.eval(), summary


def _fit_ray(
    job: TrainJob, runtime: EvalRuntimeConfig, storage_url: str, name: str, options
) -> tuple[dict[str, Any], str]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray = connect(runtime)
    check_placement(runtime, ray.cluster_resources())
    path, storage_fs = storage_for(storage_url, options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "threads": max(1, int(runtime.cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if runtime.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=runtime.num_workers,
            use_gpu=runtime.use_gpu,
            resources_per_worker={"CPU": runtime.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        path = os.path.join(folder, CHECKPOINT_FILE)
        return load_weights(path, f"Ray Train checkpoint {path}"), result.path


def _fit_inline(
    job: TrainJob, runtime: EvalRuntimeConfig, folder_url: str, options
) -> tuple[dict[str, Any], str]:
    """One worker in this process, on the GPU with ``use_gpu``; after every epoch the
    checkpoint replaces ``{folder_url}/state.pt`` whole, and a rerun resumes from it."""
    if runtime.use_gpu and not torch.cuda.is_available():
        raise InputError("runtime.use_gpu with runtime.executor inline: torch finds no CUDA GPU")
    url = join(folder_url, CHECKPOINT_FILE)
    saved = load_weights(read_bytes(url, options), url) if exists(url, options) else None
    device = torch.device("cuda" if runtime.use_gpu else "cpu")

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        log.info("epoch %s: %s", metrics["epoch"], metrics)
        with (
            open(os.path.join(folder, CHECKPOINT_FILE), "rb") as f,
            atomic_open(url, options) as out,
        ):
            out.write(f.read())

    # the driver's job stays untrained, as it does when Ray Train pickles it to workers
    job = replace(job, model=copy.deepcopy(job.model), teacher=copy.deepcopy(job.teacher))
    run_loop(job, Worker(0, 1, device, saved, lambda model: model.to(device), report))
    return load_weights(read_bytes(url, options), url), folder_url
