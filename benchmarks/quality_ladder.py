"""The quality ladder: what a student learns from each method's images, against real data.

Protocol (benchmarks/README.md): teacher = the shared CIFAR-10 ResNet-56; student =
ResNet-20 from scratch, distilled with one recipe for every row (``dreamshard eval kd``:
online teacher on each augmented view, T = 5, SGD with cosine schedule, 2 Ray Train
workers); top-1 on all 10,000 CIFAR-10 (JPEG) test images. Rows:

* ``real``: N class-balanced training images (the upper bound at equal N);
* ``noise``: N uniform-noise images labelled by the teacher (the floor);
* every method, N images each at the same iteration count: deepinversion (CIFAR preset),
  adi, class-conditional (scenario A: statistics of training images; ``-C``: one image per
  class), impression (class codes from the metadata stage), natural-inversion, imagine
  (one real seed image per class, ``metadata.scenario: seeds``),
  class-conditional-per-image (scenario A's source images, each its own row of statistics:
  ``metadata.scenario: seeds``) and class-conditional-by-class (scenario A with
  ``plan.batching: by_class``: every batch one class, N / 20 images of it).

Per row: KD top-1 per seed (final, and the best evaluated epoch), their mean, the fraction
of real at equal N, the teacher accept rate (confidence >= 0.5 and argmax = label, filter
off so every row has N images), agreement of the independent shared ResNet-20 and the
Fréchet distance / precision / recall in its features (``dreamshard eval fidelity``),
synthesis CPU-seconds per image and per accepted image. Seed images and real rows come
from the training set, never the test set.

Resumable: every finished synthesis and every finished KD seed is written to the results
file at once, and a rerun skips what is there (a row's shards are reused). The order is
every row's first seed, then every row's second, so an interrupted ladder still has a
whole column.

    python benchmarks/quality_ladder.py                       # the CPU ladder (hours)
    python benchmarks/quality_ladder.py --rows real,noise --seeds 1
    python benchmarks/quality_ladder.py --full --gpu          # 50,000 images, 2,000 iterations
    python benchmarks/quality_ladder.py --executor inline --gpu   # one GPU, no Ray
    python benchmarks/quality_ladder.py --epochs 60 --mixup 1 --rows real,class-conditional@100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    CIFAR,
    RESNET20,
    RESNET56,
    add_executor_option,
    cpu_name,
    engine,
    recognised_training_images,
    teacher_logits,
)

from evaluation.config import DataConfig, parse_eval_config
from evaluation.fidelity import fd_name, run_fidelity
from evaluation.kd import train_student
from evaluation.loader import load_all
from evaluation.sources import resolve_shards
from evaluation.views import recalibrate
from pipeline.config import TeacherConfig, parse_config
from pipeline.errors import InputError
from pipeline.graph import run_job
from pipeline.io.images import contact_sheet, open_image_folder
from pipeline.io.shards import Sample, ShardStore, Sidecar, shard_name
from pipeline.models.accuracy import classifier_accuracy, normalise
from pipeline.models.teachers import load_checkpoint, load_teacher

TEACHER = {"arch": "resnet56", "checkpoint": str(RESNET56)}
JUDGE = {"arch": "resnet20", "checkpoint": str(RESNET20), "name": "resnet20"}
TRAIN, TEST = f"{CIFAR}/cifar10-jpeg/train", f"{CIFAR}/cifar10-jpeg/test"
EPOCHS = 30  # the KD schedule of every row
# new views of the images KD may add (data.*; 0: off, the ladder's)
VIEWS = ("mixup", "blur", "jpeg")
ROWS = [
    "real",
    "noise",
    "class-conditional",
    "deepinversion",
    "adi",
    "natural-inversion",
    "impression",
    "class-conditional-C",
    "imagine",
    "class-conditional-per-image",
    "class-conditional-by-class",
    "class-conditional-smooth",
    "class-conditional-faint",
    "class-conditional-tinted",
    "class-conditional-correlated",
    "class-conditional-blurred",
]

# Rows that differ from class-conditional only in the pixels' start (chosen on held-out
# images: cpu-class-conditional-start.md): low frequencies only; at half amplitude; and
# with a colour of each image's own; with colour channels that vary together, as real
# images' do (the ladder's real training images: 0.88-0.95 within an image). The last
# starts smooth and blurs the teacher's input at every iteration (synthesizer.blur), so
# that the class evidence has to survive a low-pass (JPEG at quality 75 keeps the
# teacher's answer for 82% of such images against 72% of the smooth start's, yet on
# held-out images its students score 9 points lower: benchmarks/README.md).
STARTS: dict[str, dict[str, Any]] = {
    "class-conditional-smooth": {"init": "smooth"},
    "class-conditional-faint": {"init": "smooth", "init_scale": 0.5},
    "class-conditional-tinted": {"init": "smooth", "init_scale": 0.5, "init_tint": 0.5},
    "class-conditional-correlated": {"init": "smooth", "init_correlation": 0.9},
    "class-conditional-blurred": {"init": "smooth", "blur": 1.0},
}


def split_row(row: str, iterations: int) -> tuple[str, int]:
    """``method@iterations`` (a point of a time-to-quality curve) or ``method``."""
    method, _, budget = row.partition("@")
    return method, int(budget) if budget else iterations


def valid_row(row: str) -> bool:
    method, _, budget = row.partition("@")
    if not budget:
        return method in ROWS and "@" not in row
    return method in ROWS[2:] and budget.isdigit() and int(budget) > 0


def view_kind(view: str) -> type:
    """The number type of KD's ``data.<view>`` (int for jpeg's quality, float otherwise),
    read from its default in :class:`DataConfig`."""
    return type(DataConfig.__dataclass_fields__[view].default)


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """The KD views as options (``--jpeg 50``), typed by :func:`view_kind`, and the KD
    loss's attention transfer (``--attention 1000``); read them back with
    :func:`chosen_views` and :func:`chosen_loss`."""
    for view in VIEWS:
        parser.add_argument(f"--{view}", type=view_kind(view), default=0, help=f"KD's data.{view}")
    parser.add_argument("--attention", type=float, default=0, help="KD's train.attention")


def chosen_views(args: argparse.Namespace) -> dict[str, float]:
    """The views :func:`add_view_options` parsed that are on (0 is off)."""
    return {view: getattr(args, view) for view in VIEWS if getattr(args, view)}


def chosen_loss(args: argparse.Namespace) -> dict[str, float]:
    """The ``train.*`` KD settings :func:`add_view_options` parsed that are on."""
    return {"attention": args.attention} if args.attention else {}


def choose_recipe(args: argparse.Namespace) -> None:
    """``args.views``, ``args.loss`` and the recipe's key ``args.schedule`` from the options
    of :func:`add_view_options` and ``--epochs``."""
    args.views, args.loss = chosen_views(args), chosen_loss(args)
    args.schedule = schedule_suffix(args.epochs, {**args.views, **args.loss})


def schedule_suffix(epochs: int, views: dict[str, float] | None = None) -> str:
    """What a KD recipe other than the ladder's (another schedule; new views of the
    images, ``data.mixup``, ``data.blur`` or ``data.jpeg``; ``train.attention``) adds to a
    student's folder and key (``-e60``, ``-e60-mixup1``), so that it never resumes or
    overwrites a student of another recipe."""
    suffix = "" if epochs == EPOCHS else f"-e{epochs}"
    return suffix + "".join(f"-{k}{v:g}" for k, v in sorted((views or {}).items()) if v)


def run_folder(row: str, work: Path) -> Path:
    """Where a row's shards go (``method-i100`` for ``method@100``)."""
    return work / "runs" / row.replace("@", "-i")


def method_config(row: str, args: argparse.Namespace, work: Path, teacher: Any) -> dict[str, Any]:
    """The run config of a method row (filter off: every row stores N images)."""
    per_class = args.images // 10
    name = row
    row, iterations = split_row(row, args.iterations)
    method = "class-conditional" if row.startswith("class-conditional") else row
    # fp32 on every machine: precision auto autocasts to bf16 on CPUs with native bf16,
    # and a row must not change with the machine it was synthesized on
    synthesizer: dict[str, Any] = {"name": method, "iterations": iterations, "precision": "fp32"}
    metadata: dict[str, Any] | None = None
    plan = {"num_images": args.images, "batch_size": args.batch, "shard_size": 2 * args.batch}
    if row.startswith("class-conditional"):
        synthesizer["lr"] = 0.1  # the reduced budget's setting (cpu-class-conditional.md)
    synthesizer.update(STARTS.get(row, {}))
    classes = ("class-conditional", "impression", "class-conditional-by-class")
    if row in (*classes, *STARTS):
        metadata = {"source": TRAIN, "max_per_class": args.statistics_per_class}
        if row == "class-conditional-by-class":  # two shards (one per worker), one class a batch
            plan.update(batching="by_class", shard_size=args.images // 2)
    elif row == "class-conditional-C":
        folder = seed_folder(work, classes=True, teacher=teacher)
        metadata = {"source": str(folder), "scenario": "C"}
    elif row == "class-conditional-per-image":
        folder = per_image_folder(work, args.statistics_per_class)
        metadata = {"source": str(folder), "scenario": "seeds"}  # a row per image
    elif row == "imagine":
        folder = seed_folder(work, classes=False, teacher=teacher)
        metadata = {"source": str(folder), "scenario": "seeds", "variations": per_class}
        plan.pop("num_images")  # variations x seeds
    elif row in ("deepinversion", "adi"):
        synthesizer["preset"] = "cifar"
    data: dict[str, Any] = {
        "run": {"name": run_folder(name, work).name, "seed": 0, "output": str(work / "runs")},
        "teacher": TEACHER,
        "synthesizer": synthesizer,
        "plan": plan,
        "filter": {"enabled": False},
        "runtime": {"executor": args.executor, "progress": False},
    }
    if metadata:
        data["metadata"] = metadata
    return data


def seed_folder(work: Path, classes: bool, teacher: Any) -> Path:
    """One training image per class: the first by name that the teacher puts in its class
    (scenario C and IMAGINE need seeds the teacher recognises; the training set's first
    dog is not one), as class folders (scenario C) or a flat folder (scenario seeds)."""
    root = work / ("seeds-C" if classes else "seeds")
    if root.exists():
        return root
    folder, chosen = recognised_training_images(teacher, per_class=1, candidates=10)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for label, paths in chosen.items():
        name = folder.classes[label]
        if not paths:
            raise InputError(f"the teacher recognises none of the first 10 {name} images")
        target, file = (partial / name, "seed.jpg") if classes else (partial, f"{name}.jpg")
        target.mkdir(parents=True, exist_ok=True)
        (target / file).write_bytes(folder.read(paths[0]))
    partial.rename(root)
    return root


def per_image_folder(work: Path, per_class: int) -> Path:
    """Scenario A's source images (the first ``per_class`` training images of each class)
    as one flat folder, named so that the classes take turns (a batch of the plan's
    rows holds every class)."""
    root = work / f"per-image-{per_class}"
    if root.exists():
        return root
    folder = open_image_folder(TRAIN).subset(per_class)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rank: dict[int, int] = {}
    for path, label in folder.files:
        rank[label] = rank.get(label, 0) + 1
        (partial / f"{rank[label]:05d}-{label:02d}.jpg").write_bytes(folder.read(path))
    partial.rename(root)
    return root


def write_images(
    run: Path, images: torch.Tensor, labels: torch.Tensor | None, teacher, row: str
) -> None:
    """uint8 (N, 3, H, W) images as shards with the teacher's logits (a real/noise row);
    ``labels`` None: the teacher's own answers (from the same forward pass)."""
    logits = teacher_logits(teacher, images)
    if labels is None:
        labels = logits.argmax(1)
    confidence = logits.softmax(1).gather(1, labels.view(-1, 1)).squeeze(1)
    store = ShardStore(str(run))
    for index, start in enumerate(range(0, len(labels), 260)):
        samples = [
            Sample(
                f"{index:06d}-{i - start:05d}",
                images[i].permute(1, 2, 0).numpy(),
                int(labels[i]),
                {"source": row, "confidence": float(confidence[i]), "seed": i},
                logits[i].numpy().astype(np.float16),
            )
            for i in range(start, min(start + 260, len(labels)))
        ]
        store.write(shard_name("train", index), samples, "seed")
    (run / "done.json").write_text(json.dumps({"images": len(labels)}) + "\n")


def make_source(row: str, args: argparse.Namespace, work: Path, teacher) -> dict[str, Any]:
    """Write the row's shards (skipped when they are there) and return its synthesis facts."""
    run = run_folder(row, work)
    if row in ("real", "noise"):
        if not (run / "done.json").exists():
            if row == "real":
                images, labels = open_image_folder(TRAIN).subset(args.images // 10).load(32)
            else:
                generator = torch.Generator().manual_seed(0)
                size = (args.images, 3, 32, 32)
                images = torch.randint(0, 256, size, generator=generator, dtype=torch.uint8)
                labels = None  # the teacher's answers
            write_images(run, images, labels, teacher, row)
        return synthesis_facts(run, None)
    started = time.perf_counter()
    run_job(parse_config(method_config(row, args, work, teacher)))
    return synthesis_facts(run, round(time.perf_counter() - started, 1))


def synthesis_facts(run: Path, wall: float | None) -> dict[str, Any]:
    """A row's run folder and synthesis CPU-seconds (its sidecars' sum: 0 for real and
    noise, whose shards record none)."""
    sidecars = [Sidecar.load(str(p)) for p in sorted((run / "shards").glob("*.json"))]
    cpu = sum(s.synthesis_seconds or 0 for s in sidecars)
    return {"run": str(run), "synthesis_cpu_seconds": round(cpu, 1), "wall_seconds": wall}


def remeasure(row: str, record: dict[str, Any], args: argparse.Namespace, work: Path, teacher):
    """Measure a finished row again from its shards (after a change to ``measure``),
    keeping its KD results."""
    entry = record["rows"][row]
    facts = synthesis_facts(run_folder(row, work), entry["synthesis_wall_seconds"])
    fresh = measure(row, facts, args, work, teacher)
    record["rows"][row] = {**fresh, **{k: v for k, v in entry.items() if k.startswith("kd_")}}


def eval_data(run: str, args: argparse.Namespace, name: str, seed: int, out: Path) -> dict:
    return {
        "run": {"name": name, "output": str(out), "seed": seed},
        "data": {"shards": f"{run}/shards", "test": TEST, "loader_workers": 0, **args.views},
        "teacher": TEACHER,
        "student": {"arch": "resnet20"},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.kd_batch,
            "eval_every": args.eval_every,
            **args.loss,
        },
        "fidelity": {"networks": [JUDGE], "max_images": args.images, "tsne": False},
        "runtime": {"executor": args.executor, "num_workers": args.workers, "use_gpu": args.gpu},
    }


def accepted_by(teacher: Any, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Images the pipeline's filter would keep as stored: the teacher's probability of the
    label >= 0.5 (then also its argmax), on the 8-bit images."""
    probs = teacher_logits(teacher, images).softmax(1)
    return int((probs.gather(1, labels.view(-1, 1)) >= 0.5).sum())


def measure(
    row: str, facts: dict[str, Any], args: argparse.Namespace, work: Path, teacher: Any
) -> dict:
    """Accept rate, judge agreement, FD / precision / recall and a contact sheet."""
    run = facts["run"]
    config = parse_eval_config(eval_data(run, args, f"{Path(run).name}-fidelity", 0, work / "eval"))
    fidelity = run_fidelity(config)
    judge = fidelity["networks"][0]
    cpu = facts["synthesis_cpu_seconds"]
    images_u8, labels = load_all(resolve_shards(f"{run}/shards"))
    images, accepted = len(labels), accepted_by(teacher, images_u8, labels)
    rows = [
        [image.permute(1, 2, 0).numpy() for image in images_u8[labels == c][:8]] for c in range(10)
    ]
    sheet = Path(args.results).with_name(f"{Path(args.results).stem}-{Path(run).name}.png")
    sheet.write_bytes(contact_sheet(rows, 32, 8))
    return {
        "source": row,
        "images": images,
        "accept_rate": round(accepted / images, 4),
        "judge_agreement": judge["accuracy_synthetic"],
        "judge_agreement_per_class": judge["per_class_synthetic"],
        fd_name("resnet20"): round(judge[fd_name("resnet20")], 2),
        "precision": judge["precision"],
        "recall": judge["recall"],
        "synthesis_cpu_seconds_per_image": round(cpu / images, 3) if cpu else None,
        "synthesis_cpu_seconds_per_accepted": round(cpu / accepted, 3)
        if cpu and accepted
        else None,
        "synthesis_wall_seconds": facts["wall_seconds"],
        "contact_sheet": sheet.name,
        "kd_top1": [],
        "kd_top1_best": [],
        "kd_seconds": [],
    }


def distil(row: str, run: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    config = parse_eval_config(
        eval_data(run, args, f"{Path(run).name}-s{seed}{args.schedule}", seed, work / "eval")
    )
    started = time.perf_counter()
    results = train_student(config, "kd")
    return {
        "final": results["final"]["test_accuracy"],
        "best": [results["best"]["epoch"], results["best"]["test_accuracy"]],
        "teacher": results["teacher_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def load_student(path: Path) -> Any:
    """A trained student (``student.pt``), with the normalisation its checkpoint records."""
    _, meta, _ = load_checkpoint(str(path))
    fields = {k: tuple(meta[k]) for k in ("mean", "std") if k in meta}
    return load_teacher(TeacherConfig(arch=meta["arch"], checkpoint=str(path), **fields))


def student_path(work: Path, row: str, seed: int, schedule: str = "") -> Path:
    """Where the row's KD seed ``seed`` (at the schedule ``schedule_suffix`` names) saved
    its student."""
    name = f"{run_folder(row, work).name}-s{seed}{schedule}"
    return work / "eval" / name / "kd" / "student.pt"


def top1(student: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
    """A loaded student's top-1 on uint8 ``images``."""
    spec = student.config
    scored = classifier_accuracy(
        student.model, images, labels, spec.mean, spec.std, spec.num_classes
    )
    return round(scored["accuracy"], 4)


def recalibrated(
    student: Any, images: torch.Tensor, strength: float, only: tuple[str, ...] = ()
) -> Any:
    """``student`` with the batch norms named by ``only`` (all when empty) recomputed over
    uint8 ``images`` recoloured at ``strength`` (one batch: exact; seed 0)."""
    spec = student.config
    torch.manual_seed(0)  # the recolouring's draws
    batch = [normalise(images, spec.mean, spec.std)]
    recalibrate(student.model, batch, strength, spec.mean, spec.std, only)
    return student


def recalibrated_top1(
    row: str,
    seeds: int,
    strength: float,
    work: Path,
    test: tuple[torch.Tensor, torch.Tensor],
    schedule: str = "",
) -> list[float]:
    """Each KD seed's student recalibrated over its row's images at ``strength``, top-1 on
    the test images."""
    images, _ = load_all(resolve_shards(f"{run_folder(row, work)}/shards"))
    students = [load_student(student_path(work, row, seed, schedule)) for seed in range(seeds)]
    return [top1(recalibrated(student, images, strength), *test) for student in students]


def summarise(record: dict[str, Any]) -> None:
    """Means and fractions of real (from the seeds done so far). Recalibrated rows are
    compared with real's better mean, recalibrated or not (the strongest real baseline)."""
    rows = record["rows"]
    for row in rows.values():
        for key in ("kd_top1", "kd_top1_recalibrated"):
            values = row.get(key)
            row[f"{key}_mean"] = round(float(np.mean(values)), 4) if values else None
    real = rows.get("real", {})
    real_mean = real.get("kd_top1_mean")
    best_real = max(real.get(k) or 0.0 for k in ("kd_top1_mean", "kd_top1_recalibrated_mean"))
    for row in rows.values():
        mean, after = row["kd_top1_mean"], row["kd_top1_recalibrated_mean"]
        row["fraction_of_real"] = round(mean / real_mean, 3) if mean and real_mean else None
        fraction = round(after / best_real, 3) if after and best_real else None
        row["fraction_of_real_recalibrated"] = fraction


def table(record: dict[str, Any]) -> str:
    protocol = record["protocol"]
    lines = [
        "# Quality ladder",
        "",
        f"Device: {protocol['device']}; torch {protocol['torch']}. Teacher {protocol['teacher']}"
        f" (test top-1 {protocol.get('teacher_top1', '?')}), student {protocol['student']}, "
        f"KD {protocol['epochs']} epochs, batch {protocol['batch_size']}, "
        f"{protocol['test_images']} test images; {protocol['iterations']} synthesis iterations; "
        f"judge: {protocol['judge']}. Rows and seeds accumulate over resumed runs; the "
        f"latest: `{protocol['command']}`.",
        "",
        "| source | images | KD top-1 (final, per seed) | mean | fraction of real "
        "| best epoch top-1 | accept rate | judge agreement | FD (ResNet-20) | precision "
        "| recall | CPU-s / image | CPU-s / accepted | recalibrated (per seed) | mean "
        "| fraction of real |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    for row in record["rows"].values():
        seeds = ", ".join(pct(v) for v in row["kd_top1"]) or "–"
        best = ", ".join(f"{pct(b[1])} (ep {b[0]})" for b in row["kd_top1_best"]) or "–"
        fraction = row.get("fraction_of_real")
        lines.append(
            f"| {row['source']} | {row['images']} | {seeds} | {pct(row.get('kd_top1_mean'))} "
            f"| {'–' if fraction is None else f'{fraction:.2f}'} | {best} "
            f"| {pct(row['accept_rate'])} | {pct(row['judge_agreement'])} "
            f"| {row[fd_name('resnet20')]} | {row['precision']:.3f} | {row['recall']:.3f} "
            f"| {row['synthesis_cpu_seconds_per_image'] or '–'} "
            f"| {row['synthesis_cpu_seconds_per_accepted'] or '–'} "
            f"| {', '.join(pct(v) for v in row.get('kd_top1_recalibrated', [])) or '–'} "
            f"| {pct(row.get('kd_top1_recalibrated_mean'))} "
            f"| {row.get('fraction_of_real_recalibrated') or '–'} |"
        )
    if "recalibration_colour" in protocol:
        lines += [
            "",
            f"Recalibrated: each student's batch norms recomputed over its row's images "
            f"recoloured at strength {protocol['recalibration_colour']} (`train.recalibrate`; "
            f"strength chosen on held-out training images, `benchmarks/student_bn_shift.py`); "
            f"its fraction of real is against real's better mean, recalibrated or not.",
        ]
    return "\n".join(lines) + "\n"


def save(record: dict[str, Any], args: argparse.Namespace) -> None:
    summarise(record)
    path = Path(args.results)
    path.write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(table(record))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows; METHOD@ITERATIONS is a time-to-quality point "
        "(default: every row, or none with --remeasure)",
    )
    parser.add_argument("--images", type=int, default=1040, help="N per row (10 classes)")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=130, help="synthesis batch")
    parser.add_argument("--statistics-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    add_view_options(parser)
    parser.add_argument("--kd-batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="GPUs for synthesis and KD")
    add_executor_option(parser)
    parser.add_argument(
        "--remeasure",
        default="",
        help="comma-separated finished rows to measure again from their shards (KD kept)",
    )
    parser.add_argument(
        "--recalibrate",
        type=float,
        default=None,
        help="after KD: every finished student's batch norms recomputed over its row's images "
        "recoloured at this strength (train.recalibrate), scored on the test images",
    )
    parser.add_argument(
        "--synthesize-only",
        action="store_true",
        help="write the rows' shards and stop (no measurement, no KD, no test image read): "
        "the shards that benchmarks/kd_recipe.py compares on held-out training images",
    )
    parser.add_argument("--full", action="store_true", help="paper scale: 50,000 images, ...")
    parser.add_argument("--work", default="outputs/quality-ladder")
    parser.add_argument("--results", default="benchmarks/results/quality-ladder.json")
    args = parser.parse_args()
    if args.full:  # the papers' scale: a GPU cluster's job
        args.images, args.iterations, args.batch, args.epochs = 50000, 2000, 256, 200
        args.kd_batch, args.eval_every, args.statistics_per_class = 128, 10, 5000
    choose_recipe(args)
    if args.rows is None:
        args.rows = "" if args.remeasure else ",".join(ROWS)
    args.rows = [r for r in args.rows.split(",") if r]
    args.remeasure = [r for r in args.remeasure.split(",") if r]
    unknown = {r for r in args.rows + args.remeasure if not valid_row(r)}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; valid: {', '.join(ROWS)}")
    if args.images % 10:
        parser.error("--images must be a multiple of 10 (class-balanced rows)")
    return args


def main() -> None:
    args = arguments()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    record: dict[str, Any] = (
        json.loads(results.read_text()) if results.exists() else {"protocol": {}, "rows": {}}
    )
    record["protocol"] = {
        "teacher": "resnet56 (shared CIFAR-10 checkpoint)",
        "student": "resnet20 (from scratch)",
        "judge": "resnet20 (shared CIFAR-10 checkpoint, never trained by this project)",
        "epochs": args.epochs,
        **({"views": args.views} if args.views else {}),
        **({"train": args.loss} if args.loss else {}),
        "batch_size": args.kd_batch,
        "eval_every": args.eval_every,
        "test_images": 10000,
        "images": args.images,
        "iterations": args.iterations,
        "statistics_per_class": args.statistics_per_class,
        "device": f"{os.cpu_count()} CPU cores ({cpu_name()})"
        if not args.gpu
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/quality_ladder.py", *sys.argv[1:]]),
    }
    for row in args.remeasure:
        if row not in record["rows"]:
            raise InputError(f"--remeasure {row}: {results} has no such row yet")
    with engine(args.executor, "ladder"):
        teacher = load_teacher(TeacherConfig(**TEACHER))
        for row in args.remeasure:
            remeasure(row, record, args, work, teacher)
            save(record, args)
            print(json.dumps({"remeasured": row, "accept": record["rows"][row]["accept_rate"]}))
        if args.synthesize_only:  # shards for kd_recipe's held-out choices; no test image
            for row in args.rows:
                print(json.dumps({"synthesized": row, **make_source(row, args, work, teacher)}))
            return
        for seed in range(args.seeds):
            for row in args.rows:
                entry = record["rows"].get(row)
                if entry is None or entry["images"] != args.images:
                    facts = make_source(row, args, work, teacher)
                    entry = record["rows"][row] = measure(row, facts, args, work, teacher)
                    save(record, args)
                    print(json.dumps({k: v for k, v in entry.items() if "kd" not in k}), flush=True)
                if len(entry["kd_top1"]) > seed:
                    continue
                run = str(run_folder(row, work))
                result = distil(row, run, seed, args, work)
                entry["kd_top1"].append(result["final"])
                entry["kd_top1_best"].append(result["best"])
                entry["kd_seconds"].append(result["seconds"])
                record["protocol"]["teacher_top1"] = result["teacher"]
                save(record, args)
                print(json.dumps({"row": row, "seed": seed, **result}), flush=True)
    if args.recalibrate is not None:
        record["protocol"]["recalibration_colour"] = args.recalibrate
        test = open_image_folder(TEST).load(32)
        for row, entry in record["rows"].items():
            done = entry.get("kd_top1_recalibrated", [])
            if entry["kd_top1"] and len(done) < len(entry["kd_top1"]):
                seeds = len(entry["kd_top1"])
                entry["kd_top1_recalibrated"] = recalibrated_top1(
                    row, seeds, args.recalibrate, work, test, args.schedule
                )
                save(record, args)
                print(json.dumps({"row": row, "recalibrated": entry["kd_top1_recalibrated"]}))
    print(table(record))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:  # e.g. a row's shards incomplete: named, exit 2
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
