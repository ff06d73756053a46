"""``dreamshard eval kd`` and ``dreamshard eval scratch``: train a student on the shards.

KD: Hinton's loss at temperature ``train.temperature`` against the teacher's logits, run
online or read from the shards' ``logits.npy`` (see :func:`uses_stored_logits` for when
stored logits are valid), mixed with the hard labels by ``train.alpha``. From scratch:
the hard labels only. Both evaluate on the real test set
every epoch and write the student, ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import replace
from typing import Any

from evaluation.config import EvalConfig
from evaluation.fitting import fit
from evaluation.inputs import Inputs, prepare
from evaluation.loader import ShardDataset
from evaluation.report import comparison_rows, write_bytes, write_report
from evaluation.training import TrainJob, evaluate
from evaluation.views import recalibrate
from pipeline.io.storage import join
from pipeline.models.archs import build_architecture
from pipeline.models.teachers import save_checkpoint


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
        eval_every=train.eval_every,
        batch_size=train.batch_size,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        schedule=train.schedule,
        milestones=list(train.milestones),
        gamma=train.gamma,
        temperature=train.temperature,
        alpha=alpha,
        attention=train.attention,
        stored_logits=False,
        shuffle_buffer=config.data.shuffle_buffer,
        loader_workers=config.data.loader_workers,
        augment=config.data.augment,
        mixup=config.data.mixup,
        colour=config.data.colour,
        blur=config.data.blur,
        jpeg=config.data.jpeg,
        jpeg_teacher=config.data.jpeg_teacher,
        seed=config.run.seed,
        storage_options=inputs.options,
    )
    return replace(job, **changes)


def uses_stored_logits(config: EvalConfig) -> bool:
    """Whether the KD targets are the shards' ``logits.npy`` (else the teacher is run).

    Stored logits are the teacher's answer for the stored image. With ``data.augment``
    the student sees a random crop and flip of it, and the teacher's answer for that view
    differs (a CNN's logits change under a shift or a flip; for synthetic images, whose
    class evidence sits where the inversion put it, often by much), so the stored logits
    would teach the student a target for an image it never saw. Restricting augmentation
    to what keeps the logits exact would leave only the identity. So with
    ``train.logits: stored`` and ``data.augment: true`` the teacher, which every
    evaluation loads anyway (from ``teacher`` or the run's manifest), is run on each
    augmented view, and ``logits.npy`` is not read; with ``data.augment: false`` the
    stored logits are used and the teacher is not run during training, unless
    ``train.attention`` asks for the teacher's feature maps. ``data.mixup``,
    ``data.colour``, ``data.blur`` and ``data.jpeg`` make new images too, so they run the
    teacher like augmentation does. Either way a ``stored`` run needs ``logits.npy`` in
    every shard (checked before training).
    """
    new_views = config.data.augment or makes_new_images(config)
    return config.train.logits == "stored" and not new_views and not config.train.attention


def makes_new_images(config: EvalConfig) -> bool:
    """Whether ``data.mixup``, ``data.colour``, ``data.blur`` or ``data.jpeg`` make images
    that the shards do not hold (beyond augmentation's crops and flips)."""
    data = config.data
    return bool(data.mixup or data.colour or data.blur or data.jpeg)


def kd_targets(config: EvalConfig, command: str) -> str:
    """What the student is taught, in words (for the report)."""
    if command != "kd":
        return "hard labels only"
    if uses_stored_logits(config):
        return "stored logits.npy (images unaugmented)"
    if config.data.jpeg and config.data.jpeg_teacher == "stored":
        taught = "teacher run on each stored image (cropped and flipped), the student on its JPEG"
    elif makes_new_images(config):
        taught = (
            "teacher run on each mixed, recoloured, blurred or re-encoded view the student sees"
        )
    elif config.train.logits == "stored":
        taught = "teacher run on each augmented view (stored logits describe the unaugmented image)"
    else:
        taught = "teacher run on each view the student sees"
    if config.train.attention:
        taught += f"; its attention maps too (weight {config.train.attention:g})"
    return taught


def student_job(inputs: Inputs, student, command: str) -> TrainJob:
    """The :class:`TrainJob` of ``kd`` (targets per :func:`uses_stored_logits`) or
    ``scratch`` (hard labels)."""
    config = inputs.config
    if command != "kd":
        return train_job(inputs, student, 0.0, attention=0.0)
    stored = uses_stored_logits(config)
    teacher = None if stored else copy.deepcopy(inputs.teacher.model)
    return train_job(inputs, student, config.train.alpha, teacher, stored_logits=stored)


RECALIBRATION_BATCH = 512  # samples: the variance between batch means left out is ~1/512


def recalibrated(model, job: TrainJob, strength: float) -> dict[str, Any]:
    """Recompute ``model``'s batch-norm statistics over the job's shards (unaugmented,
    recoloured at ``strength``, in batches of :data:`RECALIBRATION_BATCH`; see
    :func:`evaluation.views.recalibrate`) and score it on the test images."""
    import torch

    torch.manual_seed(job.seed)  # the recolouring's draws
    shards = ShardDataset(
        job.shards,
        job.mean,
        job.std,
        image_size=job.image_size,
        batch_size=RECALIBRATION_BATCH,
        storage_options=job.storage_options,
    )
    batches = (images for images, _ in shards)
    recalibrate(model, batches, strength, job.mean, job.std)
    return {"colour": strength, "test_accuracy": evaluate(model, job)["accuracy"]}


def train_student(config: EvalConfig, command: str) -> dict[str, Any]:
    """Train ``student.arch`` on the shards (KD, or hard labels for ``scratch``)."""
    inputs = prepare(config, command)
    spec = inputs.teacher_config
    import torch

    torch.manual_seed(config.run.seed)
    student = build_architecture(config.student.arch, spec.num_classes)
    job = student_job(inputs, student, command)
    before = evaluate(job.model, job)
    model, summary = fit(
        job, config.runtime, inputs.output, inputs.job_name(command), inputs.options
    )
    after = None
    if config.train.recalibrate is not None:  # the checkpoint holds the recalibrated model
        after = recalibrated(model, job, config.train.recalibrate)
    checkpoint = join(inputs.output, "student.pt")
    with tempfile.TemporaryDirectory() as folder:  # save_checkpoint takes no storage options
        local = os.path.join(folder, "student.pt")
        save_checkpoint(model, replace(spec, arch=config.student.arch, checkpoint=local), local)
        with open(local, "rb") as f:
            write_bytes(checkpoint, f.read(), inputs.options)
    teacher_accuracy = evaluate(inputs.teacher.model, job)["accuracy"]
    results = {
        "student": config.student.arch,
        "kd_targets": kd_targets(config, command),
        "untrained_accuracy": before["accuracy"],
        "teacher_accuracy": teacher_accuracy,
        "best": summary["best"],
        "final": summary["final"],
        "recalibrated": after,  # None: train.recalibrate off
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
