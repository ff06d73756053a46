"""Where the training loop runs: :func:`fit` runs :func:`evaluation.training.run_loop`
on ``runtime.num_workers`` Ray Train workers (``TorchTrainer``; gloo on CPU, nccl on GPU),
or with ``runtime.executor: inline`` as one worker in this process (no Ray: one GPU,
debugging). Under Ray Train a worker that dies makes the group restart
(``FailureConfig``) from the last checkpoint, not from epoch 0; an inline run that stops
resumes from its checkpoint when run again.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from evaluation.config import EvalRuntimeConfig
from evaluation.split import steps_per_rank
from evaluation.training import CHECKPOINT_FILE, TrainJob, Worker, run_loop
from pipeline.errors import InputError
from pipeline.execution.executor import connect_ray
from pipeline.io.storage import atomic_open, exists, filesystem, join, protocol_of, read_bytes
from pipeline.models.teachers import load_weights

log = logging.getLogger("dreamshard.evaluation")


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
    job: TrainJob, runtime: EvalRuntimeConfig, output: str, name: str, options=None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``job`` under ``TorchTrainer`` (``runtime.executor: ray``) or in this process
    (``inline``); returns (trained model, history and best/final). Either resumes from the
    last epoch's checkpoint in ``{output}/{runtime.executor}/{name}``."""
    total = sum(shard.samples for shard in job.shards)
    workers = runtime.num_workers if runtime.executor == "ray" else 1
    steps_per_rank(total, workers, 1)  # InputError before any worker starts
    storage_url = join(output, runtime.executor)
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
