"""A KD recipe choice for the quality ladder, made on held-out training images.

The ladder's student peaks early on a small synthetic set and then decays (it fits the
teacher on a narrow set of images), and normalises real images with statistics of
synthetic ones. This benchmark asks whether mixup (``data.mixup``), per-image
photometric shifts (``data.colour``), per-image blur (``data.blur``) or JPEG re-encoding
(``data.jpeg``), with the teacher
run on the new images, change that, for the real row and a method row alike, without
looking at the test set: each variant is evaluated on a held-out slice of the CIFAR-10
training images (the last ``--holdout`` images of each class by name, which neither the
ladder's real row nor its statistics use). The shards are the ladder's (run
``quality_ladder.py`` for those rows first); the KD recipe is the ladder's except for the
variant.

Resumable per (row, variant, seed): results are written as each run finishes.

    python benchmarks/kd_recipe.py --rows real,class-conditional --mixup 0,1
    python benchmarks/kd_recipe.py --rows real,class-conditional@100 --mixup 0 --colour 0.4
    python benchmarks/kd_recipe.py --rows real,class-conditional-smooth@100 --mixup 0 --epochs 60
    python benchmarks/kd_recipe.py --rows class-conditional-smooth@100 --mixup 0,1 --blur 1 \
        --epochs 60
    python benchmarks/kd_recipe.py --rows class-conditional-smooth@100,real --mixup "" \
        --jpeg 75 --epochs 60 --seeds 2 [--jpeg-teacher stored]
    python benchmarks/kd_recipe.py --rows class-conditional-smooth@100 --mixup 1 --also jpeg=50 \
        --epochs 60 --seeds 2
    python benchmarks/kd_recipe.py --rows class-conditional-smooth@100 --mixup "" --jpeg 50 \
        --also alpha=1,temperature=4 --epochs 60 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import add_executor_option, cpu_name, engine
from quality_ladder import EPOCHS, TRAIN, eval_data, run_folder, schedule_suffix, view_kind

from evaluation.config import parse_eval_config
from evaluation.kd import train_student
from pipeline.errors import InputError
from pipeline.io.images import open_image_folder

FIELDS = ("mixup", "colour", "blur", "jpeg")  # the KD views a variant can vary or add
LOSS = ("alpha", "temperature", "attention")  # train.* settings of the KD loss --also may set
# a setting's letters in a run's folder name (the first letter, where that is unique)
SHORT = {"attention": "at"}


def holdout_folder(work: Path, per_class: int) -> Path:
    """The last ``per_class`` training images of each class (by name), as class folders."""
    root = work / f"holdout-{per_class}"
    if root.exists():
        return root
    folder = open_image_folder(TRAIN)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for label, name in enumerate(folder.classes):
        files = [path for path, owner in folder.files if owner == label][-per_class:]
        (partial / name).mkdir(parents=True)
        for path in files:
            (partial / name / Path(path).name).write_bytes(folder.read(path))
    partial.rename(root)
    return root


def variant(
    field: str, value: float, also: dict[str, float], jpeg_teacher: str
) -> tuple[str, str, dict[str, Any], dict[str, float]]:
    """A variant's key tag (``jpeg50+alpha1``), its short name in folders (``j50a1``), its
    ``data.*`` settings and its ``train.*`` (KD loss) settings."""
    views: dict[str, Any] = {k: v for k, v in also.items() if k in FIELDS}
    views[field] = value
    paired = "jpeg" in views and jpeg_teacher == "stored"
    if paired:
        views["jpeg_teacher"] = "stored"
    added = sorted(also.items())
    tag = f"{field}{value:g}" + "".join(f"+{k}{v:g}" for k, v in added)
    short = f"{field[0]}{value:g}" + "".join(f"{SHORT.get(k, k[0])}{v:g}" for k, v in added)
    tag, short = (tag + "-stored", short + "s") if paired else (tag, short)
    return tag, short, views, {k: v for k, v in also.items() if k in LOSS}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="real,class-conditional")
    parser.add_argument("--mixup", default="0,1", help="comma-separated Beta parameters")
    parser.add_argument(
        "--colour", default="", help="comma-separated data.colour strengths (mixup off)"
    )
    parser.add_argument(
        "--blur", default="", help="comma-separated data.blur largest sigmas (mixup off)"
    )
    parser.add_argument(
        "--jpeg", default="", help="comma-separated data.jpeg lowest qualities (mixup off)"
    )
    parser.add_argument(
        "--also",
        default="",
        help="views or KD-loss settings every variant adds, as field=value pairs (--mixup 1 "
        "--also jpeg=50: mixup on the JPEG view; --jpeg 50 --also alpha=1: no hard-label term)",
    )
    parser.add_argument(
        "--jpeg-teacher",
        choices=("view", "stored"),
        default="view",
        help="data.jpeg_teacher for the --jpeg variants",
    )
    parser.add_argument("--holdout", type=int, default=100, help="training images per class")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help="other than the ladder's: a variant"
    )
    parser.add_argument("--kd-batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true")
    add_executor_option(parser)
    parser.add_argument("--work", default="outputs/quality-ladder")
    parser.add_argument("--results", default="benchmarks/results/cpu-kd-recipe.json")
    args = parser.parse_args()
    args.images = 10 * args.holdout  # eval_data's fidelity section (not run here)
    args.schedule = schedule_suffix(args.epochs)  # in names and keys
    args.views, args.loss = {}, {}  # eval_data's; each variant sets its own fields
    args.variants = []
    for field in FIELDS:
        text, kind = getattr(args, field), view_kind(field)
        try:
            args.variants += [(field, kind(v)) for v in text.split(",") if v]
        except ValueError:
            parser.error(f"--{field} takes comma-separated numbers, got {text!r}")
    also = {}
    for pair in (p for p in args.also.split(",") if p):
        field, _, value = pair.partition("=")
        if field not in (*FIELDS, *LOSS) or not value:
            valid = ", ".join((*FIELDS, *LOSS))
            parser.error(f"--also takes field=value pairs of {valid}: {pair!r}")
        try:
            also[field] = float(value) if field in LOSS else view_kind(field)(value)
        except ValueError:
            parser.error(f"--also {field} takes a number, got {value!r}")
    if any(field in also for field, _ in args.variants):
        parser.error("--also names a view that the variants vary")
    args.also = also
    return args


def table(record: dict[str, Any]) -> str:
    lines = [
        "# KD recipe on held-out training images",
        "",
        f"{record['protocol']}",
        "",
        "| row | variant | held-out top-1 (final, per seed) | best evaluated epoch | seconds |",
        "|---|---:|---|---|---:|",
    ]
    for key, entry in record["runs"].items():
        row, variant = key.rsplit("@", 1)
        final = ", ".join(f"{100 * v:.1f}%" for v in entry["final"])
        best = ", ".join(f"{100 * b[1]:.1f}% (ep {b[0]})" for b in entry["best"])
        seconds = ", ".join(str(s) for s in entry["seconds"])
        lines.append(f"| {row} | {variant} | {final} | {best} | {seconds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()

    work = Path(args.work).resolve()
    rows = args.rows.split(",")
    missing = [r for r in rows if not (run_folder(r, work) / "shards").is_dir()]
    if missing:
        raise InputError(f"no ladder shards for rows {missing} under {work}: run them first")
    holdout = holdout_folder(work, args.holdout)
    results = Path(args.results)
    record = json.loads(results.read_text()) if results.exists() else {"runs": {}}
    record["protocol"] = (
        f"Device: {os.cpu_count()} CPU cores ({cpu_name()}). The quality ladder's shards and KD "
        f"recipe (ResNet-56 → ResNet-20, {args.epochs} epochs, batch {args.kd_batch}, "
        f"{args.workers} Ray Train workers); evaluated on the last {args.holdout} training "
        f"images of each class ({10 * args.holdout} images, never in a ladder row). "
        f"Command: `python benchmarks/kd_recipe.py {shlex.join(sys.argv[1:])}`."
    )
    with engine(args.executor, "kd-recipe"):
        for seed in range(args.seeds):
            for row in rows:
                for field, value in args.variants:
                    tag, short, views, train = variant(field, value, args.also, args.jpeg_teacher)
                    key = f"{row}@{tag}{args.schedule}"
                    entry = record["runs"].setdefault(key, {"final": [], "best": [], "seconds": []})
                    if len(entry["final"]) > seed:
                        continue
                    name = f"recipe-{row}-{short}{args.schedule}-s{seed}"
                    data = eval_data(str(run_folder(row, work)), args, name, seed, work / "eval")
                    data["data"].update({"test": str(holdout), **views})
                    data["train"].update(train)
                    started = time.perf_counter()
                    result = train_student(parse_eval_config(data), "kd")
                    entry["final"].append(result["final"]["test_accuracy"])
                    entry["best"].append([result["best"]["epoch"], result["best"]["test_accuracy"]])
                    entry["seconds"].append(round(time.perf_counter() - started, 1))
                    results.write_text(json.dumps(record, indent=2) + "\n")
                    results.with_suffix(".md").write_text(table(record))
                    print(json.dumps({"run": key, "seed": seed, **entry}), flush=True)
    print(table(record))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
