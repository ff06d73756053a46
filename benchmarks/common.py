"""What every benchmark shares: the repository (and ``tests/``, for the S3 server) on
``sys.path``, Ray's environment defaults, the shared data and checkpoints, the CPU's name
for the results, and a private local Ray. A benchmark imports this module before anything
of the project's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray on loopback

SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    from synthesizers.precision import cpu_model

    return cpu_model()


@contextlib.contextmanager
def local_ray(prefix: str, num_cpus: int | None = None) -> Iterator[None]:
    """A fresh local Ray on loopback with its own temp dir (this machine may run other
    Rays), shut down and its temp dir removed on the way out."""
    import ray

    from pipeline.execution.executor import start_local_ray

    temp = tempfile.mkdtemp(prefix=f"{prefix}-ray-", dir="/tmp")
    try:
        start_local_ray(ray, _temp_dir=temp, num_cpus=num_cpus or os.cpu_count())
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def add_executor_option(parser: argparse.ArgumentParser) -> None:
    """``--executor``: the pipeline's and KD's ``runtime.executor`` for a benchmark."""
    parser.add_argument(
        "--executor",
        choices=("ray", "inline"),
        default="ray",
        help="inline: synthesis and KD in this process, no Ray (one machine, one GPU)",
    )


def engine(executor: str, prefix: str) -> contextlib.AbstractContextManager[None]:
    """A private local Ray for ``executor`` ray; nothing for inline."""
    return local_ray(prefix) if executor == "ray" else contextlib.nullcontext()


def teacher_logits(teacher: Any, images: Any) -> Any:
    """``teacher``'s (a loaded teacher) logits (N, classes) on uint8 or [0, 1] images
    (N, 3, H, W), in chunks of 256."""
    import torch

    from pipeline.models.accuracy import normalise

    mean, std = teacher.config.mean, teacher.config.std
    with torch.no_grad():
        return torch.cat([teacher.model(normalise(b, mean, std)) for b in images.split(256)])


def predict(teacher: Any, images: Any) -> list[int]:
    """The class each uint8 image (N, 3, H, W) gets from ``teacher`` (a loaded teacher)."""
    return teacher_logits(teacher, images).argmax(1).tolist()


def recognised_training_images(
    teacher: Any, per_class: int, candidates: int
) -> tuple[Any, dict[int, list[str]]]:
    """The CIFAR-10 training set's image folder and, per class, the paths of the first
    ``per_class`` of its first ``candidates`` images (by name) that ``teacher`` puts in
    their class: seeds for scenarios B/C and IMAGINE, chosen on training images only."""
    from pipeline.io.images import open_image_folder

    folder = open_image_folder(f"{CIFAR}/cifar10-jpeg/train").subset(candidates)
    images, _ = folder.load(32)
    chosen: dict[int, list[str]] = {label: [] for label in range(len(folder.classes))}
    for (path, label), guess in zip(folder.files, predict(teacher, images), strict=True):
        if guess == label and len(chosen[label]) < per_class:
            chosen[label].append(path)
    return folder, chosen
