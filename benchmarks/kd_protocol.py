"""The evaluation protocol: KD of a student from a teacher on real, synthetic and noise images.

CIFAR-10 (JPEG), teacher = the shared ResNet-56, student = ResNet-20, the same number of
images and epochs for every source:

1. real: the first N/10 training images of each class (the upper bound);
2. synthetic: N images from each synthesizer (here DeepInversion, made with ``run_job``);
3. noise: N uniform-noise images labelled by the teacher (the floor).

Each source is written as shards with the teacher's logits and distilled with
``dreamshard eval kd`` (online teacher, T = 5) under Ray Train; the headline is synthetic
KD accuracy as a fraction of real KD accuracy. The defaults are the reduced smoke size for
2 CPU cores; see benchmarks/README.md for the full-size protocol.

    PYTHONPATH=$PWD python benchmarks/kd_protocol.py --images 256 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from common import CIFAR, RESNET56, cpu_name, local_ray
from quality_ladder import write_images

from evaluation.config import parse_eval_config
from evaluation.kd import train_student
from pipeline.config import TeacherConfig, parse_config
from pipeline.graph import run_job
from pipeline.io.images import open_image_folder
from pipeline.models.teachers import load_teacher

TEACHER = {
    "arch": "resnet56",
    "checkpoint": str(RESNET56),
}
DATA = str(CIFAR / "cifar10-jpeg")


def write_source(root: Path, images: torch.Tensor, labels: torch.Tensor | None, teacher) -> str:
    """uint8 (N, 3, H, W) images as shards with the teacher's logits and sidecars."""
    write_images(root, images, labels, teacher, root.name)
    return str(root)


def real_source(root: Path, count: int, teacher) -> str:
    folder = open_image_folder(f"{DATA}/train").subset(count // 10)
    images, labels = folder.load(32)
    return write_source(root / "real", images, labels, teacher)


def noise_source(root: Path, count: int, teacher, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return write_source(root / "noise", images, None, teacher)  # labelled by the teacher


def synthetic_source(root: Path, count: int, iterations: int, seed: int) -> str:
    config = parse_config(
        {
            "run": {"name": "deepinversion", "seed": seed, "output": str(root)},
            "teacher": TEACHER,
            "synthesizer": {"name": "deepinversion", "iterations": iterations},
            "plan": {"num_images": count, "batch_size": 128, "shard_size": 256},
            "filter": {"enabled": False},
            "runtime": {"executor": "ray", "num_workers": 2, "progress": False},
        }
    )
    return run_job(config)["run_url"]


def distil(root: Path, name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    config = parse_eval_config(
        {
            "run": {"name": name, "output": str(root / "eval"), "seed": args.seed},
            "data": {"shards": shards, "test": f"{DATA}/test", "test_per_class": args.test},
            "teacher": TEACHER,
            "student": {"arch": "resnet20"},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size},
            "runtime": {"num_workers": args.workers, "use_gpu": args.gpu},
        }
    )
    started = time.perf_counter()
    results = train_student(config, "kd")
    return {
        "source": name,
        "final": results["final"]["test_accuracy"],
        "best": results["best"]["test_accuracy"],
        "teacher": results["teacher_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="N images per source")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=200, help="DeepInversion iterations")
    parser.add_argument("--test", type=int, default=100, help="real test images per class")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/kd-protocol")
    parser.add_argument("--results", default="benchmarks/results/cpu-kd-protocol.json")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    teacher = load_teacher(TeacherConfig(**TEACHER))
    with local_ray("kd-protocol"):
        started = time.perf_counter()
        synthetic = synthetic_source(root, args.images, args.iterations, args.seed)
        synthesis_seconds = round(time.perf_counter() - started, 1)
        sources = {
            "real": real_source(root, args.images, teacher),
            "deepinversion": synthetic,
            "noise": noise_source(root, args.images, teacher, args.seed),
        }
        rows = [distil(root, name, url, args) for name, url in sources.items()]
    real = rows[0]["final"]
    for row in rows:
        row["fraction_of_real"] = round(row["final"] / real, 4) if real else None
    record = {
        "device": torch.cuda.get_device_name(0)
        if args.gpu
        else f"CPU, {os.cpu_count()} cores ({cpu_name()})",
        "torch": torch.__version__,
        "sizes": {**vars(args), "synthesis_seconds": synthesis_seconds},
        "rows": rows,
    }
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
