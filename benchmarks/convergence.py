"""How many iterations DeepInversion needs before its teacher puts the images in their
class, on the quality ladder's teacher (ResNet-56) and on the shallower ResNet-20.

DeepInversion's loss sums a batch-norm statistics term over every BN layer, so on a
deeper teacher the statistics term outweighs the cross-entropy for longer. One run per
teacher: ``--images`` images (labels 0-9 in turn) in one batch, the ``cifar`` preset,
``--iterations`` iterations; every ``--every`` iterations the loop's own check records
the share of images that pass the pipeline's filter as they would be stored (8-bit,
fp32 teacher, confidence >= 0.5 and argmax = label). ``--variants`` adds runs with
settings changed from the preset (``teacher:field=value``, e.g. ``resnet56:bn_weight=1``).
Resumable per run.

    python benchmarks/convergence.py [--images 30] [--iterations 800] [--every 50]
    python benchmarks/convergence.py --teachers "" --variants resnet56:bn_weight=1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import common  # noqa: F401  (paths and environment first)
import torch
from common import RESNET20, RESNET56, cpu_name

from pipeline.config import FilterConfig, TeacherConfig
from pipeline.models.teachers import load_teacher
from pipeline.stages.synthesis import pass_filter
from synthesizers import SynthesisSpec
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig

TEACHERS = {"resnet56": RESNET56, "resnet20": RESNET20}


def curve(run: str, args: argparse.Namespace) -> dict:
    arch, _, change = run.partition(":")
    field, _, value = change.partition("=")
    settings = {field: value if field == "preset" else float(value)} if change else {}
    teacher = load_teacher(TeacherConfig(arch=arch, checkpoint=str(TEACHERS[arch])))
    config = DeepInversionConfig(
        preset="cifar",
        iterations=args.iterations,
        early_stop=True,  # its checks are the curve; it ends a run only when all pass
        early_stop_every=args.every,
        early_stop_tolerance=0.0,
        **settings,
    )
    synth = DeepInversion(teacher.model, config, "cpu")
    labels = torch.arange(args.images) % 10
    mean, std = teacher.config.mean, teacher.config.std
    spec = SynthesisSpec(labels, (3, 32, 32), 0, mean, std, min_confidence=0.5)
    load = os.getloadavg()[0]
    result = synth.synthesize(spec)
    final = pass_filter(result, FilterConfig(min_confidence=0.5))  # the pipeline's rule
    return {
        "accepted": [[c["iteration"], round(c["accepted"], 3)] for c in result.checks]
        + [[result.iterations, round(float(final.float().mean()), 3)]],
        "stopped_early": result.stopped_early,
        "final_losses": {k: round(v, 4) for k, v in result.losses.items()},
        "seconds": round(result.seconds, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teachers", default="resnet56,resnet20")
    parser.add_argument("--variants", default="", help="comma-separated teacher:field=value")
    parser.add_argument("--out", default="benchmarks/results/cpu-convergence.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    settings = {"images": args.images, "iterations": args.iterations, "every": args.every}
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("settings") != settings:
        record = {"settings": settings, "runs": {}}
    record.update(device=f"{args.threads} thread(s), {cpu_name()}", torch=torch.__version__)
    record["method"] = "deepinversion, preset cifar (Adam lr 0.05, constant, no clipping)"
    for run in filter(None, f"{args.teachers},{args.variants}".split(",")):
        if run not in record["runs"]:
            record["runs"][run] = curve(run, args)
            path.write_text(json.dumps(record, indent=2) + "\n")
        print(run, json.dumps(record["runs"][run]), flush=True)
    iterations = sorted({i for run in record["runs"].values() for i, _ in run["accepted"]})
    lines = [
        f"# DeepInversion (preset cifar): images the teacher accepts, against iterations\n\n"
        f"{args.images} images in one batch, labels 0–9 in turn, seed 0; {record['device']}; "
        f"accepted = teacher confidence ≥ 0.5 and argmax = label on the 8-bit image.\n"
        f"Command: `python benchmarks/convergence.py --images {args.images} "
        f"--iterations {args.iterations} --every {args.every} --teachers {args.teachers}"
        + (f" --variants {args.variants}`\n" if args.variants else "`\n"),
        "| iterations | " + " | ".join(record["runs"]) + " |",
        "|---:|" + "---:|" * len(record["runs"]),
    ]
    curves = [dict(map(tuple, run["accepted"])) for run in record["runs"].values()]
    for i in iterations:
        cells = [curve.get(i) for curve in curves]
        shown = ["–" if c is None else f"{c:.0%}" for c in cells]
        lines.append(f"| {i} | " + " | ".join(shown) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
