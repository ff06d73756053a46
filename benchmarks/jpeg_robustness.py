"""How much of the teacher's evidence in a ladder row's images survives JPEG.

The CIFAR-10 images here are JPEG (quality 75, 4:2:0 chroma); synthetic shards hold
lossless PNG. Each row's stored images are re-encoded at each ``--qualities`` value
(``evaluation.views.jpeg``) and the ladder's teacher is asked again: the share of images
whose argmax survives, and the mean probability of the label before and after. The
reference is the held-out training images (the last ``--holdout`` of each class, as
``kd_recipe.py``), never test images; they were compressed once already, which flatters
them at their own quality.

    python benchmarks/jpeg_robustness.py \
        --rows class-conditional-smooth@100,class-conditional-blurred@100
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from common import cpu_name, teacher_logits
from kd_recipe import holdout_folder
from quality_ladder import TEACHER, run_folder
from statistics_granularity import jpeg_kept

from evaluation.loader import load_all
from evaluation.sources import resolve_shards
from pipeline.config import TeacherConfig
from pipeline.errors import InputError
from pipeline.io.images import open_image_folder
from pipeline.models.teachers import load_teacher


def label_probability(teacher, images, labels) -> float:
    probs = teacher_logits(teacher, images).softmax(1)
    return round(float(probs.gather(1, labels.view(-1, 1)).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="class-conditional-smooth@100")
    parser.add_argument("--qualities", default="95,75,50")
    parser.add_argument("--holdout", type=int, default=100, help="training images per class")
    parser.add_argument("--work", default="outputs/quality-ladder")
    parser.add_argument("--out", default="benchmarks/results/cpu-jpeg-robustness.json")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    rows = [r for r in args.rows.split(",") if r]
    missing = [r for r in rows if not (run_folder(r, work) / "shards").is_dir()]
    if missing:
        raise InputError(f"no ladder shards for rows {missing} under {work}: run them first")
    qualities = [int(q) for q in args.qualities.split(",")]
    teacher = load_teacher(TeacherConfig(**TEACHER))
    sets = {"held-out real": open_image_folder(str(holdout_folder(work, args.holdout))).load(32)}
    for row in rows:
        sets[row] = load_all(resolve_shards(str(run_folder(row, work) / "shards")))
    record = {
        "device": f"{os.cpu_count()} CPU cores ({cpu_name()})",
        "command": f"python benchmarks/jpeg_robustness.py {shlex.join(sys.argv[1:])}",
        "rows": {},
    }
    for name, (images, labels) in sets.items():
        entry = {
            "images": len(labels),
            "label_probability": label_probability(teacher, images, labels),
        }
        for quality in qualities:
            entry[f"kept_q{quality}"] = jpeg_kept(teacher, images, quality)
        record["rows"][name] = entry
        print(name, json.dumps(entry), flush=True)
    path = Path(args.out)
    path.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Teacher's answers kept under JPEG re-encoding\n",
        f"{record['device']}. Command: `{record['command']}`.\n",
        "| images | N | p(label) | " + " | ".join(f"argmax kept, q{q}" for q in qualities) + " |",
        "|---|---:|---:|" + "---:|" * len(qualities),
    ]
    for name, entry in record["rows"].items():
        kept = " | ".join(f"{100 * entry[f'kept_q{q}']:.1f}%" for q in qualities)
        lines.append(f"| {name} | {entry['images']} | {entry['label_probability']:.3f} | {kept} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
