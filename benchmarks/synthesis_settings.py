"""Precision and iterate choice for DeepInversion (preset ``cifar``) at equal iterations.

One run per precision (fp32, bf16 autocast) on the shared pretrained ResNet-20, the same
labels (class-balanced), seeds and iterations. Each run keeps the lowest-loss iterate of
its batch (``keep_best``) and also records its last iterate, which is what the run would
return without ``keep_best`` (keeping the best never changes the trajectory). For each
precision and each iterate, on the stored 8-bit images:

* the accept rate of the pipeline's filter: teacher confidence >= 0.5 and argmax = target;
* the agreement of the independent shared ResNet-56 with the labels (``--judge``);
* the BN-statistics term evaluated in fp32 (what the images match, in exact arithmetic);
* the mean teacher probability of the target class.

And, for the precision: on each run's last iterate, the relative difference between the
BN-input statistics (batch mean and variance per layer) that bf16 autocast computes and
the fp32 ones, max over layers of ‖s_bf16 − s_fp32‖ / ‖s_fp32‖, and the relative
difference of the BN term itself; plus the seconds per iteration of each run.

Resumable: each finished run is stored in the json at once and skipped on a rerun with the
same settings. Run from the repository root, alone on the machine if possible::

    PYTHONPATH=$PWD python benchmarks/synthesis_settings.py [--images 64] [--batch 64] \
        [--iterations 200] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import common  # noqa: F401  (paths and environment first)
import torch
from common import RESNET20, RESNET56, cpu_name

from pipeline.config import TeacherConfig
from pipeline.models.teachers import load_teacher
from synthesizers import SynthesisSpec
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig, batchnorm_statistics_loss
from synthesizers.hooks import batchnorm_layers, capture_statistics
from synthesizers.losses import sample_moments
from synthesizers.parametrisation import normalise

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRECISIONS = ("fp32", "bf16")
NOTES = "\n## What it shows\n"  # from here on the .md is written by hand and kept
QUALITY_HEADER = [
    "| precision | seed | iterate | accept (conf ≥ 0.5, argmax = target) | ResNet-56 agrees "
    "| teacher p(target) | BN term (fp32) |",
    "|---|---|---|---:|---:|---:|---:|",
]


class LastToo(DeepInversion):
    """DeepInversion that also keeps the last iterate (the parameters after the last step)."""

    def setup(self) -> None:
        super().setup()
        self.last: torch.Tensor | None = None

    def after_step(self, ctx) -> None:
        if ctx.iteration + 1 == ctx.stage.iterations:
            self.last = ctx.images.detach().clone()  # pixels, updated in place by the step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-judge", action="store_true", help="skip the ResNet-56 judge")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="cpu-synthesis-settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stem = Path(args.out) / args.name
    settings = {
        "images": args.images,
        "batch": args.batch,
        "iterations": args.iterations,
        "threads": args.threads,
        "preset": "cifar",
    }
    path = stem.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("settings") != settings:
        result = {"settings": settings, "runs": {}}
    result.update(device=cpu_name(), torch=torch.__version__, teacher="resnet20 (shared)")
    teacher = load_teacher(TeacherConfig(arch="resnet20", checkpoint=str(RESNET20))).model
    judge = None
    if not args.no_judge:
        judge = load_teacher(TeacherConfig(arch="resnet56", checkpoint=str(RESNET56))).model
        result["judge"] = "resnet56 (shared)"
    for seed in args.seeds:
        for precision in PRECISIONS:
            key = f"{precision}-seed{seed}"
            if key in result["runs"]:
                print(f"{key}: done before, skipped")
                continue
            load = os.getloadavg()[0]
            run = synthesize(teacher, judge, precision, seed, args)
            run.update(precision=precision, seed=seed)
            run["load_before"] = round(load, 2)
            run["load_after"] = round(os.getloadavg()[0], 2)
            result["runs"][key] = run
            path.write_text(json.dumps(result, indent=2) + "\n")  # resumable after every run
            print(key, json.dumps(run))
    markdown = stem.with_suffix(".md")
    old = markdown.read_text() if markdown.exists() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else ""  # the hand-written reading
    markdown.write_text(table(result, args) + notes)


def synthesize(teacher, judge, precision: str, seed: int, args: argparse.Namespace) -> dict:
    """One run over every batch: metrics of the kept best and of the last iterate."""
    config = DeepInversionConfig(
        preset="cifar", iterations=args.iterations, precision=precision, keep_best=True
    )
    synth = LastToo(teacher, config, "cpu")
    kept: dict[str, list[torch.Tensor]] = {"best": [], "last": []}
    labels_all, seconds, differences = [], 0.0, []
    for index in range(args.images // args.batch):
        labels = (torch.arange(args.batch) + index * args.batch) % 10
        spec = SynthesisSpec(labels, (3, 32, 32), seed * 1000 + index, MEAN, STD)
        result = synth.synthesize(spec)
        seconds += result.seconds
        kept["best"].append(result.images)
        assert synth.last is not None
        last = (synth.parametrise(spec).to_unit(synth.last) * 255).round() / 255
        kept["last"].append(last)
        differences.append(precision_difference(teacher, normalise(last, MEAN, STD)))
        labels_all.append(labels)
    labels = torch.cat(labels_all)
    run = {
        "seconds_per_iteration": seconds / (args.images // args.batch) / args.iterations,
        "bf16_vs_fp32_statistics": {
            key: max(d[key] for d in differences) for key in differences[0]
        },
    }
    for which, images in kept.items():
        run[which] = judged(teacher, judge, torch.cat(images), labels)
    return run


@torch.no_grad()
def judged(teacher, judge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Filter accept rate, judge agreement and the fp32 BN term of stored images."""
    inputs = normalise(images, MEAN, STD)
    with capture_statistics(batchnorm_layers(teacher), "input", sample_moments) as records:
        probs = torch.softmax(teacher(inputs).float(), dim=1)
        bn = float(batchnorm_statistics_loss(records, [1.0] * len(records)))
    confidence, predicted = probs.max(dim=1)
    accepted = (confidence >= 0.5) & (predicted == labels)
    out = {
        "accept_rate": float(accepted.float().mean()),
        "teacher_target_probability": float(probs[torch.arange(len(labels)), labels].mean()),
        "bn_term_fp32": bn,
    }
    if judge is not None:
        out["resnet56_agreement"] = float((judge(inputs).argmax(dim=1) == labels).float().mean())
    return out


@torch.no_grad()
def precision_difference(teacher, inputs: torch.Tensor) -> dict[str, float]:
    """How far bf16 autocast's BN-input statistics (and BN term) are from fp32's on the
    same images: max over layers of the relative L2 difference."""
    found = {}
    for precision in PRECISIONS:
        dtype = torch.bfloat16 if precision == "bf16" else None
        with capture_statistics(batchnorm_layers(teacher), "input", sample_moments) as records:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                teacher(inputs)
            stats = [(r.mean.clone(), r.var.clone()) for r in records]
            bn = float(batchnorm_statistics_loss(records, [1.0] * len(records)))
        found[precision] = (stats, bn)
    (exact, bn_exact), (rounded, bn_rounded) = found["fp32"], found["bf16"]

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    pairs = list(zip(rounded, exact, strict=True))
    return {
        "mean_max_relative": max(relative(r[0], e[0]) for r, e in pairs),
        "var_max_relative": max(relative(r[1], e[1]) for r, e in pairs),
        "bn_term_relative": abs(bn_rounded - bn_exact) / abs(bn_exact),
    }


def table(result: dict, args: argparse.Namespace) -> str:
    s = result["settings"]
    runs = result["runs"]
    seeds = sorted({run["seed"] for run in runs.values()})
    command = (
        f"PYTHONPATH=$PWD python benchmarks/synthesis_settings.py --images {s['images']} "
        f"--batch {s['batch']} --iterations {s['iterations']} --threads {s['threads']} "
        f"--seeds {' '.join(map(str, seeds))}"
    )
    lines = [
        "# DeepInversion (preset cifar): bf16 vs fp32, last vs lowest-loss iterate",
        "",
        f"Device: {result['device']} ({s['threads']} thread, no native bf16); torch "
        f"{result['torch']}. Teacher: shared pretrained ResNet-20; judge: "
        f"{result.get('judge', 'none')}. Per run {s['images']} images (labels 0–9 in turn), "
        f"batch {s['batch']}, {s['iterations']} iterations, lr 0.05 constant (the preset); "
        f"seeds {', '.join(map(str, seeds))} (one run per precision and seed).",
        "",
        f"Command: `{command}`",
        "",
        *QUALITY_HEADER,
    ]
    for run in runs.values():
        for which in ("last", "best"):
            lines.append(row(run["precision"], str(run["seed"]), which, [run[which]]))
    lines += ["", f"Pooled over the seeds ({len(seeds) * s['images']} images per cell):", ""]
    lines += QUALITY_HEADER
    for precision in PRECISIONS:
        for which in ("last", "best"):
            cells = [r[which] for r in runs.values() if r["precision"] == precision]
            lines.append(row(precision, "all", which, cells))
    lines += [
        "",
        "| precision | seed | s / iteration | load before → after | bf16 vs fp32 on the "
        "run's last iterate: mean, var (max relative, over layers), BN term (relative) |",
        "|---|---|---:|---|---|",
    ]
    for run in runs.values():
        d = run["bf16_vs_fp32_statistics"]
        lines.append(
            f"| {run['precision']} | {run['seed']} | {run['seconds_per_iteration']:.3f} | "
            f"{run['load_before']} → {run['load_after']} | {d['mean_max_relative']:.2e}, "
            f"{d['var_max_relative']:.2e}, {d['bn_term_relative']:.2e} |"
        )
    lines.append("")
    return "\n".join(lines)


def row(precision: str, seed: str, which: str, cells: list[dict]) -> str:
    """A table row: the mean of each metric over ``cells`` (equal-sized runs)."""

    def mean(key: str) -> float | None:
        values = [c[key] for c in cells if key in c]
        return sum(values) / len(values) if values else None

    judge = mean("resnet56_agreement")
    return (
        f"| {precision} | {seed} | {which} | {mean('accept_rate'):.1%} | "
        f"{'' if judge is None else f'{judge:.1%}'} | "
        f"{mean('teacher_target_probability'):.3f} | {mean('bn_term_fp32'):.2f} |"
    )


if __name__ == "__main__":
    main()
