"""DeepInversion against class-conditional inversion in scenarios A, B and C.

The question of "You Get What You Sow" (Table 2): do networks other than the teacher
recognise the synthesized images? On the shared CIFAR-10 ResNet-56 teacher, each method
synthesizes the same number of images with the same iterations, batch and seed:

* ``deepinversion``: the teacher's BN running statistics;
* ``cc-A``: class-conditional, metadata from CIFAR-10 (JPEG) training images
  (``--train-per-class`` per class: a reduced stand-in for the whole training set);
* ``cc-B``: class-conditional, 50 seed images per class (training images the teacher
  classifies correctly; the metadata stage's inference check drops the others);
* ``cc-C``: class-conditional, one seed image per class.

Reported per method: the teacher-confidence accept rate at τ = 0.9 (confidence ≥ τ and
argmax = target), the top-1 accuracy of the independent shared ResNet-20 on the stored
images, the mean teacher confidence, and synthesis seconds per image. A contact sheet
(the run's ``preview.png``) is copied per method.

Run from the repository root (the whole pipeline, inline executor, no filter)::

    python benchmarks/class_conditional_quality.py [--images 200] [--iterations 200] \
        [--batch 100] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from common import CIFAR, RESNET20, RESNET56, predict, recognised_training_images

from pipeline.config import TeacherConfig, parse_config
from pipeline.graph import run_job
from pipeline.io.images import decode
from pipeline.models.teachers import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--methods", default="deepinversion,cc-A,cc-B,cc-C")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds_b, seeds_c = make_seed_folders(work)
    sources = {
        "cc-A": {"source": f"{CIFAR}/cifar10-jpeg/train", "max_per_class": args.train_per_class},
        "cc-B": {"source": str(seeds_b), "scenario": "B"},
        "cc-C": {"source": str(seeds_c), "scenario": "C"},
    }
    judge = load_teacher(TeacherConfig(arch="resnet20", checkpoint=str(RESNET20)))
    rows = []
    for method in args.methods.split(","):
        synthesizer = {
            "name": "deepinversion" if method == "deepinversion" else "class-conditional"
        }
        synthesizer.update(iterations=args.iterations, lr=args.lr)
        data = {
            "run": {"name": method, "seed": 0, "output": str(work / "out")},
            "teacher": {"arch": "resnet56", "checkpoint": str(RESNET56)},
            "synthesizer": synthesizer,
            "plan": {
                "num_images": args.images,
                "batch_size": args.batch,
                "shard_size": args.images,
            },
            "filter": {"enabled": False, "max_attempts": 1},
            "runtime": {"executor": "inline", "progress": False},
        }
        if method in sources:
            data["metadata"] = sources[method]
        start = time.perf_counter()
        manifest = run_job(parse_config(data))
        wall = time.perf_counter() - start
        run = work / "out" / method
        rows.append(measure(method, run, manifest, judge, args.tau, wall))
        shutil.copy(run / "preview.png", out / f"cpu-class-conditional-{method}.png")
        print(json.dumps(rows[-1]), flush=True)
        write(out, args, rows)  # after every method: a partial table survives an interruption
    print(table(json.loads((out / "cpu-class-conditional.json").read_text())))
    shutil.rmtree(work)


def write(out: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    result = {
        "benchmark": "class_conditional_quality",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "teacher": "resnet56 (shared CIFAR-10 checkpoint)",
        "judge": "resnet20 (shared CIFAR-10 checkpoint, independent of the teacher)",
        "settings": vars(args),
        "rows": rows,
    }
    (out / "cpu-class-conditional.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cpu-class-conditional.md").write_text(table(result))


def make_seed_folders(work: Path) -> tuple[Path, Path]:
    """50 and 1 correctly classified training images per class, as class folders."""
    teacher = load_teacher(TeacherConfig(arch="resnet56", checkpoint=str(RESNET56)))
    folder, chosen = recognised_training_images(teacher, per_class=50, candidates=80)
    b, c = work / "seeds-b", work / "seeds-c"
    for label, paths in chosen.items():
        for root, limit in ((b, 50), (c, 1)):
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            for path in paths[:limit]:
                (root / str(label) / path.rsplit("/", 1)[-1]).write_bytes(folder.read(path))
    return b, c


def measure(method: str, run: Path, manifest: dict, judge, tau: float, wall: float) -> dict:
    samples = list(
        wds.WebDataset(sorted(str(p) for p in run.glob("shards/*.tar")), shardshuffle=False)
    )
    infos = [json.loads(s["json"]) for s in samples]
    labels = torch.tensor([info["label"] for info in infos])
    confidence = torch.tensor([info["confidence"] for info in infos])
    arrays = [decode(s["png"], s["__key__"]) for s in samples]
    images = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])
    judged = torch.tensor(predict(judge, images))
    sidecars = [json.loads(p.read_text()) for p in run.glob("shards/*.json")]
    synthesis = sum(s["synthesis_seconds"] for s in sidecars)
    # every image is stored (filter off), with the teacher's logits on the stored pixels
    logits = torch.stack([torch.from_numpy(np.load(io.BytesIO(s["logits.npy"]))) for s in samples])
    passed = (confidence >= tau) & (logits.argmax(1) == labels)
    return {
        "method": method,
        "images": len(samples),
        "accept_rate_tau": round(float(passed.float().mean()), 4),
        "teacher_mean_confidence": round(float(confidence.mean()), 4),
        "independent_resnet20_top1": round(float((judged == labels).float().mean()), 4),
        "synthesis_seconds_per_image": round(synthesis / len(samples), 4),
        "wall_seconds": round(wall, 1),
        "metadata": manifest.get("metadata"),
    }


def table(result: dict) -> str:
    lines = [
        "# DeepInversion vs class-conditional inversion (scenarios A, B, C)",
        "",
        f"Device: {result['device']}; torch {result['torch']}. Teacher: {result['teacher']}; "
        f"judge: {result['judge']}. Settings: {json.dumps(result['settings'])}.",
        "",
        "| method | images | accept rate (τ = 0.9) | teacher mean confidence "
        "| independent ResNet-20 top-1 | synthesis s / image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['images']} | {row['accept_rate_tau']:.1%} "
            f"| {row['teacher_mean_confidence']:.3f} | {row['independent_resnet20_top1']:.1%} "
            f"| {row['synthesis_seconds_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
