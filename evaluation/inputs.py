"""Everything an evaluation command checks before it trains: shards, teacher, test set,
student. Each mistake is an :class:`InputError` naming the field or URL (exit code 2)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from evaluation.config import EvalConfig
from evaluation.loader import ShardSet, probe, resolve_shards
from evaluation.sources import first_sample
from pipeline.config import TeacherConfig, build
from pipeline.errors import InputError
from pipeline.io.images import open_image_folder
from pipeline.io.storage import absolute, check_writable, join
from pipeline.models.archs import build_architecture
from pipeline.models.teachers import Teacher, load_teacher

log = logging.getLogger("dreamshard.evaluation")


@dataclass
class Inputs:
    config: EvalConfig
    shards: ShardSet
    teacher: Teacher | None
    test: tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, H, W), labels (N,)
    classes: list[str]  # the test set's class folder names
    output: str  # {run.output}/{run.name}/{command}

    @property
    def options(self) -> dict[str, Any]:
        return self.config.run.storage_options

    @property
    def teacher_config(self) -> TeacherConfig:
        return self.teacher.config if self.teacher else self.config.teacher

    def job_name(self, command: str, *parts: Any) -> str:
        """A Ray Train run name: same config, same name (a rerun resumes), else a new one."""
        text = json.dumps([self.config.to_dict(), command, *parts], sort_keys=True, default=str)
        return f"{command}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def teacher_config(config: EvalConfig, shards: ShardSet) -> TeacherConfig:
    """The config's teacher section, else the one in the run's manifest."""
    if config.teacher is not None:
        return replace(config.teacher, checkpoint=absolute(config.teacher.checkpoint))
    teacher = shards.manifest.get("config", {}).get("teacher")
    if not teacher:
        raise InputError(
            "teacher: not given, and the shards have no run manifest to take it from; "
            "add a teacher section (arch, checkpoint, num_classes, image_size, mean, std)"
        )
    return build(TeacherConfig, teacher, "teacher (from the run's manifest)")


def check_stored_logits(shards: ShardSet, options: dict[str, Any] | None) -> None:
    """:class:`InputError` naming the first shard whose first sample has no ``logits.npy``
    (only the head of each tar is read)."""
    for shard in shards.shards:
        sample = first_sample(shard, options)
        if "logits.npy" not in sample:
            raise InputError(
                f"train.logits is stored but shard {shard.url} holds no logits.npy (sample "
                f"{sample.get('__key__', b'?').decode()}); use train.logits=online, or "
                "shards written with plan.store_logits"
            )


def prepare(config: EvalConfig, command: str, student: bool = True) -> Inputs:
    """Resolve and check every input of ``command``; nothing is written yet."""
    options = config.run.storage_options
    if not config.data.test:
        raise InputError("data.test is required: class folders of real test images (a URL)")
    output = absolute(config.run.output)
    check_writable(output, options)
    shards = resolve_shards(config.data.shards, options, config.data.allow_incomplete)
    spec = teacher_config(config, shards)
    teacher = load_teacher(spec, options)
    found = probe(shards, options)
    if found["image_size"] != (spec.image_size, spec.image_size):
        height, width = found["image_size"]
        raise InputError(
            f"data.shards: images are {width}x{height} but the teacher and student expect "
            f"{spec.image_size}x{spec.image_size} (teacher.image_size)"
        )
    if config.train.logits == "stored" and command == "kd":
        check_stored_logits(shards, options)
    if student:
        try:
            build_architecture(config.student.arch, spec.num_classes)
        except InputError as error:
            raise InputError(f"student.arch: {error}".replace("teacher.arch: ", "")) from error
    folder = open_image_folder(config.data.test, options).subset(config.data.test_per_class)
    if len(folder.classes) != spec.num_classes:
        raise InputError(
            f"data.test: {config.data.test} has {len(folder.classes)} class folders "
            f"({', '.join(folder.classes[:5])}…) but the teacher has {spec.num_classes} classes"
        )
    test = folder.load(spec.image_size)
    run_output = join(output, config.run.name, command)
    log.info(
        "%d shards (%d samples), %d test images", len(shards.shards), shards.samples, len(test[1])
    )
    return Inputs(config, shards, teacher, test, folder.classes, run_output)
