"""Class-conditional inversion against the granularity of its statistics.

The quality ladder's best method (class-conditional, scenario A) trails real images on
coverage: an independent network's recall against real images is about half of real's.
One matched target per class lets every image of the class settle into the same few
modes. This benchmark splits each class's source images into groups of ``g`` images and
matches each group's statistics (a metadata row per group, labelled with its class), from
``g`` = all of them (scenario A) down to ``g`` = 1 (one row per source image).

Source: the first ``--per-class`` CIFAR-10 (JPEG) training images of each class (the
ladder's metadata source). Reference for choices: the next ``--held-out`` training images
of each class, which no variant reads (never test images). Per variant: ``--images``
images (class-balanced; sample j of a class targets that class's group j mod G), the
ladder's class-conditional settings (lr 0.1, ``--iterations``), seed 0. Reported: the
teacher's accept rate (label probability >= 0.5 on the 8-bit image), the independent
shared ResNet-20's agreement, precision / recall (k = 3) and Fréchet distance in its
features against the held-out images, its within-class feature spread, the metadata
size (floats per source image), and how close images sit to their own source images
(judge-feature distance to the nearest source image over that to the nearest held-out
image; below 1: nearer the source than unseen images of the class). Real rows (the
source images themselves) give the ceiling. Resumable per variant.

    python benchmarks/statistics_granularity.py [--groups 100,10,1] [--images 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from itertools import product
from pathlib import Path

import common  # noqa: F401  (paths and environment first)
import torch
from common import CIFAR, RESNET20, cpu_name, teacher_logits
from quality_ladder import TEACHER, accepted_by

from evaluation.fidelity import diversity, frechet_distance, logits_and_features, precision_recall
from evaluation.views import jpeg
from pipeline.config import TeacherConfig, parse_config
from pipeline.io.images import ImageFolder, open_image_folder
from pipeline.models.teachers import load_teacher
from pipeline.stages.statistics import Sums, collect_files, feature_layers
from synthesizers import SynthesisSpec
from synthesizers.class_conditional import ClassConditional, ClassConditionalConfig

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]
DEFAULT_TV = ClassConditionalConfig.tv_weight  # the paper's CIFAR α_TV


def per_image_sums(teacher, source: ImageFolder) -> Sums:
    """The metadata stage's sums with one row per source image (scenario seeds)."""
    config = parse_config(
        {
            "teacher": TEACHER,
            "synthesizer": {"name": "class-conditional"},
            "metadata": {"source": source.url, "scenario": "seeds"},
        }
    )
    layers, side = feature_layers(config, teacher.model)
    return collect_files(config, teacher.model, source, source.files, layers, side)


def group_statistics(
    per_image: Sums, labels: torch.Tensor, size: int
) -> tuple[Statistics, list[int]]:
    """Rows of ``size`` consecutive images of one class (the last may be smaller), pooled
    as the metadata stage pools a class, and the class of each row."""
    members: list[torch.Tensor] = []
    for label in labels.unique().tolist():
        members += list((labels == label).nonzero().flatten().split(size))
    assign = torch.zeros(len(members), len(labels), dtype=torch.float64)
    for row, images in enumerate(members):
        assign[row, images] = 1.0
    grouped = Sums(
        first={name: assign @ t for name, t in per_image.first.items()},
        second={name: assign @ t for name, t in per_image.second.items()},
        within={name: assign @ t for name, t in per_image.within.items()},
        count=assign @ per_image.count,
    )
    return grouped.statistics(), [int(labels[m[0]]) for m in members]


def target_rows(row_labels: list[int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced labels for ``count`` images; sample j of a class targets the class's
    row j mod (its rows)."""
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(row_labels):
        by_class.setdefault(label, []).append(row)
    classes = sorted(by_class)
    labels = [classes[i % len(classes)] for i in range(count)]
    rows = [by_class[c][i // len(classes) % len(by_class[c])] for i, c in enumerate(labels)]
    return torch.tensor(labels), torch.tensor(rows)


def accept_rate(teacher, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of uint8 images the pipeline's filter would keep (the ladder's rule)."""
    return round(accepted_by(teacher, images, labels) / len(labels), 4)


def jpeg_kept(teacher, images: torch.Tensor, quality: int = 75) -> float:
    """The share of uint8 images whose teacher argmax survives JPEG re-encoding at
    ``quality`` (the CIFAR-10 JPEG set's): how much of the teacher's evidence sits in
    detail a codec removes (real training images, themselves JPEG at 75: about 0.99)."""
    generator = torch.Generator().manual_seed(0)
    encoded = torch.stack([jpeg(image, quality, generator, quality) for image in images])
    before, after = teacher_logits(teacher, images), teacher_logits(teacher, encoded)
    return round(float((before.argmax(1) == after.argmax(1)).double().mean()), 4)


def judge_measures(judge, images: torch.Tensor, labels: torch.Tensor, held_out, source_features):
    """Agreement, precision/recall and FD against the held-out images, spread, and the
    nearest-source ratio (all in the judge's penultimate features)."""
    logits, features = logits_and_features(judge.model, images, judge.config.mean, judge.config.std)
    nearest_source = torch.cdist(features, source_features).min(1).values
    nearest_held_out = torch.cdist(features, held_out).min(1).values
    return {
        "judge_agreement": round(float((logits.argmax(1) == labels).double().mean()), 4),
        **{
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in precision_recall(held_out.float(), features.float(), 3).items()
        },
        "fd_resnet20": round(frechet_distance(features, held_out), 2),
        "spread": round(diversity(features.float(), labels), 3),
        "nearest_source_ratio": round(float((nearest_source / nearest_held_out).median()), 3),
    }


def pixel_gradient(images: torch.Tensor) -> float:
    """Mean absolute difference of horizontal neighbours, in [0, 1] units: the images'
    high-frequency energy (real CIFAR-10: about 0.06)."""
    x = images.float() / 255
    return round(float((x[..., 1:] - x[..., :-1]).abs().mean()), 4)


def mean_colour_spread(images: torch.Tensor) -> float:
    """Standard deviation over the images of an image's mean colour (per channel, then
    averaged), in [0, 1] units: how much images differ in brightness and colour."""
    return round(float((images.float() / 255).mean((2, 3)).std(0).mean()), 4)


def colour_correlation(images: torch.Tensor) -> float:
    """Mean correlation between the colour channels of the pixels' deviations from their
    image's mean colour: how much colour varies with brightness inside an image (real
    CIFAR-10: about 0.9)."""
    x = images.float() / 255
    deviations = (x - x.mean((2, 3), keepdim=True)).transpose(0, 1).reshape(3, -1)
    matrix = torch.corrcoef(deviations)
    return round(float(matrix[torch.triu_indices(3, 3, 1).unbind()].mean()), 3)


def parse_start(text: str) -> tuple[str, float, float, float]:
    """``kind[:scale[:tint[:correlation]]]`` -> synthesizer.init, init_scale, init_tint,
    init_correlation."""
    kind, *numbers = text.split(":")
    values = [float(number) for number in numbers] + [1.0, 0.0, 0.0][len(numbers) :]
    return kind, values[0], values[1], values[2]


def run_variant(
    variant: str,
    tv_weight: float,
    init: str,
    spectrum: float,
    blur: float,
    args,
    teacher,
    judge,
    data,
) -> dict:
    size, _, batch_text = variant.partition(":")
    size, batch = int(size), int(batch_text or args.batch)
    kind, scale, tint, correlation = parse_start(init)
    config = ClassConditionalConfig(
        iterations=args.iterations,
        lr=args.lr,
        tv_weight=tv_weight,
        init=kind,
        init_scale=scale,
        init_tint=tint,
        init_correlation=correlation,
        spectrum=spectrum,
        blur=blur,
    )
    statistics, row_labels = group_statistics(data["per_image"], data["source_labels"], size)
    labels, rows = target_rows(row_labels, args.images)
    synthesizer = ClassConditional(teacher.model, config, "cpu")
    images, seconds, load = [], 0.0, os.getloadavg()[0]
    for start in range(0, args.images, batch):
        stop = start + batch
        spec = SynthesisSpec(
            labels[start:stop],
            (3, 32, 32),
            seed=start,
            mean=teacher.config.mean,
            std=teacher.config.std,
            guidance={"class_statistics": statistics, "statistics_index": rows[start:stop]},
        )
        result = synthesizer.synthesize(spec)
        images.append(result.images)
        seconds += result.seconds
    stored = (torch.cat(images) * 255).round().to(torch.uint8)
    floats = sum(mean.numel() + var.numel() for mean, var in statistics.values())
    return {
        "group_size": size,
        "batch": batch,
        "tv_weight": tv_weight,
        "init": init,
        "spectrum": spectrum,
        "blur": blur,
        "pixel_gradient": pixel_gradient(stored),
        "jpeg_kept": jpeg_kept(teacher, stored),
        "mean_colour_spread": mean_colour_spread(stored),
        "colour_correlation": colour_correlation(stored),
        "rows": len(row_labels),
        "metadata_floats_per_source_image": round(floats / len(data["source_labels"]), 1),
        "accept_rate": accept_rate(teacher, stored, labels),
        **judge_measures(judge, stored, labels, data["held_out"], data["source_features"]),
        "seconds_per_image": round(seconds / args.images, 3),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--groups", default="100,10,1", help="source images per row[:synthesis batch]"
    )
    parser.add_argument(
        "--tv", default="2.5e-5", help="comma-separated α_TV values (each variant runs with each)"
    )
    parser.add_argument(
        "--init",
        default="noise",
        help="comma-separated starts: synthesizer.init[:init_scale[:init_tint[:init_correlation]]]",
    )
    parser.add_argument(
        "--spectrum",
        default="0",
        help="comma-separated synthesizer.spectrum decays (0: pixels, the papers')",
    )
    parser.add_argument(
        "--blur",
        default="0",
        help="comma-separated synthesizer.blur largest sigmas (0: off, the papers')",
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu-statistics-granularity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(TeacherConfig(**TEACHER))
    judge = load_teacher(TeacherConfig(arch="resnet20", checkpoint=str(RESNET20)))
    folder = open_image_folder(f"{CIFAR}/cifar10-jpeg/train")
    sources = folder.subset(args.per_class)
    source = set(sources.files)
    source_images, source_labels = sources.load(32)
    wider = folder.subset(args.per_class + args.held_out)
    held_files = [f for f in wider.files if f not in source]
    held_images, _ = ImageFolder(wider.url, wider.classes, held_files, wider.blobs).load(32)
    judge_features = [
        logits_and_features(judge.model, x, judge.config.mean, judge.config.std)[1]
        for x in (held_images, source_images)
    ]
    data = {
        "per_image": per_image_sums(teacher, sources),
        "source_labels": source_labels,
        "held_out": judge_features[0],
        "source_features": judge_features[1],
    }
    settings = {k: getattr(args, k) for k in ("images", "batch", "iterations", "lr", "per_class")}
    settings["held_out"] = args.held_out
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("settings") != settings:
        record = {"settings": settings, "variants": {}}
    record.update(device=f"{args.threads} thread(s), {cpu_name()}", torch=torch.__version__)
    if "jpeg_kept" not in record["variants"].get("real", {}):  # the source images
        order = torch.argsort(torch.arange(len(source_labels)) % args.per_class, stable=True)
        pick = order[: args.images]  # class-balanced
        record["variants"]["real"] = {
            "group_size": None,
            "pixel_gradient": pixel_gradient(source_images[pick]),
            "mean_colour_spread": mean_colour_spread(source_images[pick]),
            "colour_correlation": colour_correlation(source_images[pick]),
            "jpeg_kept": jpeg_kept(teacher, source_images[pick]),
            "accept_rate": accept_rate(teacher, source_images[pick], source_labels[pick]),
            **judge_measures(judge, source_images[pick], source_labels[pick], *judge_features),
        }
    for variant in args.groups.split(","):
        for tv_weight, init, spectrum, blur in product(
            [float(v) for v in args.tv.split(",")],
            args.init.split(","),
            [float(v) for v in args.spectrum.split(",")],
            [float(v) for v in args.blur.split(",")],
        ):
            name = "g" + variant.replace(":", "-b")
            name += "" if tv_weight == DEFAULT_TV else f"-tv{tv_weight:g}"
            name += "" if init == "noise" else "-" + init.replace(":", "-")
            name += f"-spectrum{spectrum:g}" if spectrum else ""
            name += f"-blur{blur:g}" if blur else ""
            if name not in record["variants"]:
                started = time.perf_counter()
                measured = run_variant(
                    variant, tv_weight, init, spectrum, blur, args, teacher, judge, data
                )
                record["variants"][name] = measured
                measured["wall_seconds"] = round(time.perf_counter() - started, 1)
                path.write_text(json.dumps(record, indent=2) + "\n")
            print(name, json.dumps(record["variants"][name]), flush=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    write_table(path, record, args)


def write_table(path: Path, record: dict, args) -> None:
    columns = [
        "rows",
        "batch",
        "tv_weight",
        "init",
        "spectrum",
        "blur",
        "pixel_gradient",
        "jpeg_kept",
        "mean_colour_spread",
        "colour_correlation",
        "metadata_floats_per_source_image",
        "accept_rate",
        "judge_agreement",
        "precision",
        "recall",
        "fd_resnet20",
        "spread",
        "nearest_source_ratio",
        "seconds_per_image",
    ]
    lines = [
        "# Class-conditional inversion against the granularity of its statistics\n",
        f"{args.images} images per variant, {args.iterations} iterations, lr {args.lr}, "
        f"batch {args.batch}, seed 0; source: the first {args.per_class} training images per "
        f"class; reference: the next {args.held_out} per class (held out, not test images); "
        f"{record['device']}.\nCommand: `python benchmarks/statistics_granularity.py "
        f"--groups {args.groups} --images {args.images} --batch {args.batch} --tv {args.tv} "
        f"--init {args.init} --spectrum {args.spectrum} --blur {args.blur}`\n",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in record["variants"].items():
        cells = [row.get(c, "–") for c in columns]
        lines.append(
            f"| {name} | " + " | ".join("–" if c is None else str(c) for c in cells) + " |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
