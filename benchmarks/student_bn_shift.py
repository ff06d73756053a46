"""How much of a ladder student's gap to real is in its batch-norm statistics.

A student distilled on synthetic images normalises every layer with running statistics
of those images. If the synthetic images differ from real ones in what those statistics
measure (contrast, colour, texture energy), the student meets real images with the wrong
normalisation even where its weights are right. This diagnostic takes the quality
ladder's trained students (``student.pt`` of every row and KD seed, nothing retrained)
and scores each on held-out training images with its batch-norm statistics:

- ``stored``: as trained (the ladder's own figure, on held-out images);
- ``own``: recomputed on the row's own images, without augmentation (a control for the
  recomputation itself; the stored statistics are a running average over the augmented
  views of training);
- ``real``: recomputed on real training images that no ladder row reads;
- ``real-stem``: the same, for the stem and the first stage only (``bn1``, ``layer1``):
  low-level image statistics against what the deeper layers carry.
- ``own-colourS`` (``--colour``): recomputed on the row's own images, each recoloured at
  strength S (``data.colour``'s per-image contrast, brightness and colour shifts): the
  data-free recalibration ``train.recalibrate`` offers, its strength chosen here;
- ``balanced``: statistics as stored, each class's logit shifted by the constant that
  makes the student's mean probability of every class over the held-out images equal
  (:func:`balancing_bias`; no label read, the slice is class-balanced): how much of the
  gap is a skewed class prior on real images rather than features. The table also gives
  each row's share of held-out images predicted per class (as stored, mean over seeds).

``real``, ``real-stem`` and ``balanced`` use real images, which a data-free method does
not have: they measure where the gap is, not a method. Evaluation: the last ``--holdout`` training
images of each class (the KD recipe benchmark's slice); recomputation: the ``--calibrate``
training images of each class before that slice. No test image is read.

    python benchmarks/student_bn_shift.py [--rows real,class-conditional@100] [--colour 0.2,0.4]
        [--epochs 60 --ladder benchmarks/results/quality-ladder-e60.json]  # longer-KD students
        [--jpeg 50 --ladder benchmarks/results/quality-ladder-e60-jpeg50.json]  # a KD view's
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import common  # noqa: F401  (paths and environment first)
import torch
from common import cpu_name, teacher_logits
from kd_recipe import holdout_folder
from quality_ladder import (
    EPOCHS,
    TRAIN,
    add_view_options,
    choose_recipe,
    load_student,
    recalibrated,
    run_folder,
    student_path,
    top1,
)

from evaluation.loader import load_all
from evaluation.sources import resolve_shards
from pipeline.errors import InputError
from pipeline.io.images import open_image_folder

VARIANTS = ("stored", "own", "real", "real-stem", "balanced")
STEM = ("bn1", "layer1.")


def calibration_images(per_class: int, holdout: int) -> torch.Tensor:
    """The ``per_class`` training images of each class (by name) just before the last
    ``holdout``: read by no ladder row (real uses the first 104, the statistics the first
    100) and not by the evaluation slice."""
    folder = open_image_folder(TRAIN)
    chosen = []
    for label in range(len(folder.classes)):
        files = [(p, o) for p, o in folder.files if o == label]
        chosen += files[-(holdout + per_class) : -holdout]
    return replace(folder, files=chosen).load(32)[0]


def balancing_bias(logits: torch.Tensor) -> torch.Tensor:
    """The per-class logit shift ``b`` (summing to 0) under which the mean softmax
    probability of every class over ``logits`` (N, K) is 1/K: the minimiser of the convex
    mean_x logsumexp(z_x + b) - mean_k b_k, whose gradient is that mean minus 1/K."""
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    z = logits.double()
    optimiser = torch.optim.LBFGS([bias], max_iter=200, tolerance_grad=1e-10)

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.logsumexp(z + bias, 1).mean() - bias.mean()
        loss.backward()
        return loss

    optimiser.step(objective)
    with torch.no_grad():
        return (bias - bias.mean()).float()


def score(
    path: Path,
    own: torch.Tensor,
    real: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    colours: list[float],
) -> dict[str, Any]:
    """The student at ``path`` on the held-out images, per variant (a fresh load each),
    and the share of them it puts in each class (as stored)."""
    results: dict[str, Any] = {}
    for variant in variants(colours):
        student = load_student(path)
        if variant == "balanced":
            logits = teacher_logits(student, test[0])
            shifted = logits + balancing_bias(logits)
            results[variant] = round(float((shifted.argmax(1) == test[1]).float().mean()), 4)
            counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            results["predicted"] = [round(float(c) / len(logits), 4) for c in counts]
            continue
        if variant.startswith("own-colour"):
            recalibrated(student, own, float(variant.removeprefix("own-colour")))
        elif variant == "own":
            recalibrated(student, own, 0.0)
        elif variant == "real":
            recalibrated(student, real, 0.0)
        elif variant == "real-stem":
            recalibrated(student, real, 0.0, STEM)
        results[variant] = top1(student, *test)
    return results


def variants(colours: list[float]) -> list[str]:
    return [*VARIANTS, *(f"own-colour{c:g}" for c in colours)]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="", help="ladder rows (default: every finished row)")
    parser.add_argument("--holdout", type=int, default=100, help="evaluation images per class")
    parser.add_argument("--calibrate", type=int, default=100, help="real images per class")
    parser.add_argument(
        "--colour", default="", help="comma-separated strengths: own images, recoloured"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="the students' KD schedule")
    add_view_options(parser)  # the students' KD views, as the ladder's options name them
    parser.add_argument("--work", default="outputs/quality-ladder")
    parser.add_argument("--ladder", default="benchmarks/results/quality-ladder.json")
    parser.add_argument("--results", default="benchmarks/results/cpu-student-bn-shift.json")
    args = parser.parse_args()
    try:
        args.colours = [float(v) for v in args.colour.split(",") if v]
    except ValueError:
        parser.error(f"--colour takes comma-separated numbers, got {args.colour!r}")
    choose_recipe(args)
    return args


def table(record: dict[str, Any]) -> str:
    names = variants(record["colours"])
    lines = [
        "# Ladder students' batch-norm statistics: stored, own images, real images",
        "",
        record["protocol"],
        "",
        "| row | ladder KD (test, per seed) | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for row, entry in record["rows"].items():
        cells = [", ".join(f"{100 * seed[v]:.1f}%" for seed in entry["seeds"]) for v in names]
        ladder = ", ".join(f"{100 * v:.1f}%" for v in entry["ladder_kd"])
        lines.append(f"| {row} | {ladder} | " + " | ".join(cells) + " |")
    classes = record["classes"]
    lines += [
        "",
        "Share of the held-out images each row's students put in each class (as stored, "
        "mean over seeds; the slice holds 10% of each):",
        "",
        "| row | " + " | ".join(classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for row, entry in record["rows"].items():
        shares = torch.tensor([seed["predicted"] for seed in entry["seeds"]]).mean(0)
        lines.append(f"| {row} | " + " | ".join(f"{100 * v:.0f}%" for v in shares) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    work = Path(args.work).resolve()
    ladder = json.loads(Path(args.ladder).read_text())["rows"]
    rows = args.rows.split(",") if args.rows else [r for r in ladder if ladder[r]["kd_top1"]]
    unknown = [r for r in rows if r not in ladder or not ladder[r]["kd_top1"]]
    if unknown:
        raise InputError(f"rows {unknown} have no KD result in {args.ladder}: run them first")
    test = holdout_folder(work, args.holdout)
    folder = open_image_folder(str(test))
    held_out = folder.load(32)
    real = calibration_images(args.calibrate, args.holdout)
    record: dict[str, Any] = {
        "protocol": (
            f"Device: {os.cpu_count()} CPU cores ({cpu_name()}). Every KD seed's student of "
            f"the quality ladder (ResNet-20 distilled from ResNet-56, nothing retrained), "
            f"top-1 on the last {args.holdout} training images of each class "
            f"({len(held_out[1])} images) with its batch-norm statistics as stored, "
            f"recomputed on its row's own images, on {len(real)} real training images no row "
            f"reads ({args.calibrate} per class, just before the held-out slice), and on those "
            f"for the stem and first stage only; own-colourS: recomputed on its own images "
            f"recoloured at strength S (`data.colour`'s shifts, seed 0); balanced: as stored, "
            f"class logits shifted to equal mean probabilities over the held-out images. "
            f"KD {args.epochs} epochs{''.join(f', data.{k}: {v}' for k, v in args.views.items())}"
            f"{''.join(f', train.{k}: {v:g}' for k, v in args.loss.items())}. "
            f"Command: "
            f"`python benchmarks/student_bn_shift.py {shlex.join(sys.argv[1:])}`."
        ),
        "colours": args.colours,
        "classes": folder.classes,
        "rows": {},
    }
    for row in rows:
        run = run_folder(row, work)
        own, _ = load_all(resolve_shards(f"{run}/shards"))
        seeds = []
        for seed in range(len(ladder[row]["kd_top1"])):
            path = student_path(work, row, seed, args.schedule)
            seeds.append(score(path, own, real, held_out, args.colours))
        record["rows"][row] = {"ladder_kd": ladder[row]["kd_top1"], "seeds": seeds}
        print(row, seeds, flush=True)
    results = Path(args.results)
    results.write_text(json.dumps(record, indent=1) + "\n")
    results.with_suffix(".md").write_text(table(record))


if __name__ == "__main__":
    main()
