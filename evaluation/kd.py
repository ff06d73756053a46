"""``dreamshard eval kd`` and ``dreamshard eval scratch``: train a student on the shards.

KD: Hinton's loss at temperature ``train.temperature`` against the teacher's logits, run
online or read from the shards' ``logits.npy``, mixed with the hard labels by
``train.alpha``. From scratch: the hard labels only. Both evaluate on the real test set
every epoch and write the student, ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import replace
from typing import Any

from evaluation.config import EvalConfig
from evaluation.inputs import Inputs, prepare
from evaluation.report import comparison_rows, write_bytes, write_report
from evaluation.training import TrainJob, evaluate, fit
from pipeline.archs import build_architecture
from pipeline.storage import join
from pipeline.teachers import save_checkpoint


def train_job(inputs: Inputs, model, alpha: float, teacher=None, **changes: Any) -> TrainJob:
    """A :class:`TrainJob` from the config's ``train`` and ``data`` sections."""
    config, spec = inputs.config, inputs.teacher_config
    train = config.train
    job = TrainJob(
        model=model,
        teacher=teacher,
        shards=inputs.shards.shards,
        test=inputs.test,
        mean=spec.mean,
        std=spec.std,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        schedule=train.schedule,
        milestones=list(train.milestones),
        gamma=train.gamma,
        temperature=train.temperature,
        alpha=alpha,
        stored_logits=False,
        shuffle_buffer=config.data.shuffle_buffer,
        loader_workers=config.data.loader_workers,
        augment=config.data.augment,
        seed=config.run.seed,
        storage_options=inputs.options,
    )
    return replace(job, **changes)


def train_student(config: EvalConfig, command: str) -> dict[str, Any]:
    """Train ``student.arch`` on the shards (KD, or hard labels for ``scratch``)."""
    inputs = prepare(config, command)
    spec = inputs.teacher_config
    import torch

    torch.manual_seed(config.run.seed)
    student = build_architecture(config.student.arch, spec.num_classes)
    if command == "kd":
        stored = config.train.logits == "stored"
        teacher = None if stored else copy.deepcopy(inputs.teacher.model)
        job = train_job(inputs, student, config.train.alpha, teacher, stored_logits=stored)
    else:
        job = train_job(inputs, student, 0.0)
    before = evaluate(job.model, job)
    model, summary = fit(
        job, config.runtime, join(inputs.output, "ray"), inputs.job_name(command), inputs.options
    )
    checkpoint = join(inputs.output, "student.pt")
    with tempfile.TemporaryDirectory() as folder:  # save_checkpoint takes no storage options
        local = os.path.join(folder, "student.pt")
        save_checkpoint(model, replace(spec, arch=config.student.arch, checkpoint=local), local)
        with open(local, "rb") as f:
            write_bytes(checkpoint, f.read(), inputs.options)
    teacher_accuracy = evaluate(inputs.teacher.model, job)["accuracy"]
    results = {
        "student": config.student.arch,
        "untrained_accuracy": before["accuracy"],
        "teacher_accuracy": teacher_accuracy,
        "best": summary["best"],
        "final": summary["final"],
        "per_class": dict(zip(inputs.classes, summary["per_class"], strict=True)),
        "history": summary["history"],
        "samples_seen": summary["samples_seen"],  # per epoch, over all ranks
        "resumed_from": summary["resumed_from"],
        "checkpoint": checkpoint,
        "shards": inputs.shards.summary(),  # count, samples, checksums
    }
    results["comparison"] = comparison_rows(inputs, command, results)
    write_report(inputs, command, results, {"student": summary["history"]})
    return results
