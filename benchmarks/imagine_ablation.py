"""IMAGINE's loss ablation (supplement Table 3) at reduced scale on CIFAR-10 (JPEG).

Targets: the first test image of each of ``--targets`` classes of the shared CIFAR-10
JPEG set; y* is the shared ResNet-56 teacher's prediction on each. Each row synthesizes
``--variations`` images per target (one batch holds them all) with the same seed and
iterations:

* ``baseline``: CE + the image priors (Eq. 1, 2): λ = 0, γ = 0;
* ``+discriminator``: λ = 0, γ = 10 in stage 2 (the "baseline+D" row);
* ``+feature matching``: λ = 5, γ = 0 (the "baseline+H" row, one stage);
* ``full``: λ = 5, γ = 10 in stage 2 (IMAGINE).

Reported per row: the teacher's mean confidence in y* and its agreement with y*, the
independent shared ResNet-20's agreement with y*, diversity (mean pairwise L2 distance
between the variations of one target in ResNet-20's penultimate features), distance to
the target (mean L2 from each variation to its target, same features; and pixel RMSE
in [0, 1]), and synthesis seconds per image. The targets themselves are a reference row.
A contact sheet per row (target | variations) and one with every row side by side.

Run from the repository root::

    python benchmarks/imagine_ablation.py [--targets 8] [--variations 4] \
        [--iterations 160] [--discriminator-width 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import CIFAR, RESNET20, RESNET56, cpu_name

from pipeline.config import TeacherConfig
from pipeline.io.images import contact_sheet, open_image_folder
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import load_teacher
from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.imagine import ImagineConfig

ROWS = {
    "baseline": {"feature_weight": 0.0, "adversarial_weight": 0.0},
    "+discriminator": {"feature_weight": 0.0},
    "+feature matching": {"adversarial_weight": 0.0},
    "full": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=160, help="both stages together")
    parser.add_argument("--discriminator-width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="cpu-imagine-ablation", help="results file stem")
    args = parser.parse_args()
    args.load_average_before = list(os.getloadavg())
    args.command = " ".join(["python", *sys.argv])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(TeacherConfig(arch="resnet56", checkpoint=str(RESNET56)))
    judge = load_teacher(TeacherConfig(arch="resnet20", checkpoint=str(RESNET20)))
    targets = load_targets(args.targets)  # (T, 3, 32, 32) in [0, 1]
    normal = normaliser(teacher.config)
    with torch.no_grad():
        y_star = teacher.model(normal(targets)).argmax(dim=1)
    repeat = torch.arange(len(targets)).repeat_interleave(args.variations)  # sample -> target
    rows = [
        measure(
            "targets (reference)",
            targets,
            y_star,
            torch.arange(len(targets)),
            targets,
            teacher,
            judge,
            0.0,
        )
    ]
    sheets = {}
    for name in args.rows.split(","):
        config = ImagineConfig(
            iterations=args.iterations, discriminator_width=args.discriminator_width, **ROWS[name]
        )
        synthesizer = build_synthesizer("imagine", teacher.model, config)
        spec = SynthesisSpec(
            y_star[repeat],
            (3, 32, 32),
            args.seed,
            teacher.config.mean,
            teacher.config.std,
            {"target_images": targets[repeat]},
        )
        start = time.perf_counter()
        result = synthesizer.synthesize(spec)
        seconds = time.perf_counter() - start
        rows.append(
            measure(name, result.images, y_star[repeat], repeat, targets, teacher, judge, seconds)
        )
        rows[-1]["stages"] = [[s.name, s.iterations] for s in synthesizer.stages()]
        sheets[name] = sheet_rows(targets, result.images, args.variations)
        slug = name.strip("+").replace(" ", "-")
        (out / f"{args.name}-{slug}.png").write_bytes(
            contact_sheet(sheets[name], 32, 1 + args.variations)
        )
        print(json.dumps(rows[-1]), flush=True)
        write(out, args, rows)  # after every row: a partial table survives an interruption
    combined = [
        sum((sheets[n][t][1:] for n in sheets), sheets[next(iter(sheets))][t][:1])
        for t in range(len(targets))
    ]
    (out / f"{args.name}.png").write_bytes(
        contact_sheet(combined, 32, 1 + args.variations * len(sheets))
    )
    print(table(json.loads((out / f"{args.name}.json").read_text())))


def load_targets(count: int) -> torch.Tensor:
    """The first test image of each of the first ``count`` classes, (T, 3, 32, 32)."""
    folder = open_image_folder(f"{CIFAR}/cifar10-jpeg/test").subset(1)
    images, _ = folder.load(32)
    return images[:count].float() / 255.0


def normaliser(config: TeacherConfig):
    return lambda images: normalise(images, config.mean, config.std)


@torch.no_grad()
def features(judge, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ResNet-20's logits and penultimate features (the input of ``linear``)."""
    kept = {}
    handle = judge.model.linear.register_forward_hook(lambda m, i, o: kept.update(f=i[0]))
    try:
        logits = judge.model(normaliser(judge.config)(images))
    finally:
        handle.remove()
    return logits, kept["f"]


def measure(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_of: torch.Tensor,
    targets: torch.Tensor,
    teacher,
    judge,
    seconds: float,
) -> dict:
    with torch.no_grad():
        probs = torch.softmax(teacher.model(normaliser(teacher.config)(images)), dim=1)
    judged, feats = features(judge, images)
    _, target_feats = features(judge, targets)
    spread = []
    for t in target_of.unique():
        group = feats[target_of == t]
        if len(group) > 1:
            distances = torch.cdist(group, group)
            spread.append(distances.sum() / (len(group) * (len(group) - 1)))
    return {
        "row": name,
        "images": len(images),
        "teacher_confidence_y_star": round(float(probs.gather(1, labels[:, None]).mean()), 4),
        "teacher_agreement_y_star": round(float((probs.argmax(1) == labels).float().mean()), 4),
        "resnet20_agreement_y_star": round(float((judged.argmax(1) == labels).float().mean()), 4),
        "diversity_feature_l2": round(float(torch.stack(spread).mean()), 4) if spread else None,
        "distance_to_target_feature_l2": round(
            float((feats - target_feats[target_of]).norm(dim=1).mean()), 4
        ),
        "distance_to_target_pixel_rmse": round(
            float((images - targets[target_of]).pow(2).flatten(1).mean(1).sqrt().mean()), 4
        ),
        "synthesis_seconds_per_image": round(seconds / len(images), 3),
    }


def sheet_rows(targets: torch.Tensor, images: torch.Tensor, variations: int) -> list[list]:
    """One row per target: the target, then its variations, as uint8 (32, 32, 3)."""

    def pixels(image: torch.Tensor) -> np.ndarray:
        return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    return [
        [pixels(target), *[pixels(x) for x in images[t * variations : (t + 1) * variations]]]
        for t, target in enumerate(targets)
    ]


def write(out: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    result = {
        "benchmark": "imagine_ablation",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "processor": cpu_name(),
        "torch": torch.__version__,
        "data": "CIFAR-10 (JPEG) test images as targets",
        "teacher": "resnet56 (shared CIFAR-10 checkpoint)",
        "judge": "resnet20 (shared CIFAR-10 checkpoint, independent of the teacher)",
        "settings": vars(args),
        "load_average_now": list(os.getloadavg()),
        "rows": rows,
    }
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(table(result))


def table(result: dict) -> str:
    lines = [
        "# IMAGINE loss ablation (supplement Table 3, reduced scale)",
        "",
        f"Device: {result['device']}; torch {result['torch']}. {result['data']}. Teacher: "
        f"{result['teacher']}; judge: {result['judge']}. Settings: "
        f"{json.dumps(result['settings'])}.",
        "",
        "| row | images | teacher conf. in y* | teacher = y* | ResNet-20 = y* "
        "| diversity (feat. L2) | to target (feat. L2) | to target (pixel RMSE) | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        diversity = row["diversity_feature_l2"]
        lines.append(
            f"| {row['row']} | {row['images']} | {row['teacher_confidence_y_star']:.3f} "
            f"| {row['teacher_agreement_y_star']:.1%} | {row['resnet20_agreement_y_star']:.1%} "
            f"| {'–' if diversity is None else f'{diversity:.2f}'} "
            f"| {row['distance_to_target_feature_l2']:.2f} "
            f"| {row['distance_to_target_pixel_rmse']:.3f} "
            f"| {row['synthesis_seconds_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
