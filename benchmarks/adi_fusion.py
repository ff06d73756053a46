"""What Adaptive DeepInversion and BN fusion cost or save, measured side by side.

For each teacher (CIFAR ResNet-20 and ResNet-56; the checkpoints in
``../shared/models/cifar10-resnet/`` when present, else random weights):

* ``adi / deepinversion``: seconds per iteration of ``synthesizers`` DeepInversion and
  Adaptive DeepInversion (default student: ``SmallStudent`` width 32) with their
  defaults, on one batch of 32×32 images, run alternately (DI, ADI, DI, …) for
  ``--rounds`` rounds of ``--iterations`` iterations. Per-iteration times are taken
  between successive ``after_step`` calls, so the first iteration of every round (and
  the per-request setup) is not counted. Also the seconds of one ``after_batch``
  (``distill_steps`` = 5 KD steps of the student on the whole batch).
* ``fused / unfused``: the teacher before and after ``fuse_batchnorm``, alternately,
  two ways: inference (``no_grad`` forward) and an inversion step (forward and backward
  w.r.t. the input only, parameters frozen), with the precision synthesizers use on the
  device (bf16 autocast where supported) and channels_last. Also the largest fp32 logit
  difference between the two on the benchmark batch.

Medians are reported; ratios come from the same run. ``--clock wall`` (the default)
times with ``time.perf_counter``; ``--clock cpu`` with ``time.process_time``, the CPU
seconds of this process, which is what to use on a CPU shared with other jobs (with
``--threads 1``, so that waiting threads do not count). The load average of the machine
at start and end is recorded.

Run from the repository root::

    python benchmarks/adi_fusion.py [--device cpu] [--batch 64] [--iterations 5] \
        [--rounds 3] [--teachers resnet20,resnet56] [--threads N] [--clock wall|cpu] \
        [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESNET20, RESNET56, cpu_name
from torch import nn

from pipeline.models.archs import build_architecture
from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.adi import AdaptiveDeepInversionConfig
from synthesizers.base import freeze
from synthesizers.deepinversion import DeepInversionConfig
from synthesizers.fuse import fuse_batchnorm
from synthesizers.precision import autocast_dtype

CHECKPOINTS = {
    "resnet20": RESNET20,
    "resnet56": RESNET56,
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (3, 32, 32)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(arch: str) -> tuple[nn.Module, str]:
    path = CHECKPOINTS.get(arch)
    if path is not None and path.exists():
        from pipeline.config import TeacherConfig
        from pipeline.models.teachers import load_teacher

        return load_teacher(TeacherConfig(arch=arch, checkpoint=str(path))).model, path.name
    torch.manual_seed(0)
    return build_architecture(arch, 10).eval(), "random init"


def summary(times: list[float], batch: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "seconds": median,
        "range": [min(times), max(times)],
        "images_per_second": batch / median,
        "samples": times,
    }


def time_synthesizers(teacher: nn.Module, args: argparse.Namespace, device: torch.device):
    labels = torch.arange(args.batch) % 10
    synths = {
        "deepinversion": build_synthesizer(
            "deepinversion", copy.deepcopy(teacher), DeepInversionConfig(), device
        ),
        "adi": build_synthesizer(
            "adi", copy.deepcopy(teacher), AdaptiveDeepInversionConfig(), device
        ),
    }
    for synth in synths.values():
        synth.config.iterations = args.iterations
    times: dict[str, list[float]] = {name: [] for name in synths}
    distill: list[float] = []
    for round_index, name in itertools.product(range(args.rounds), synths):
        synth = synths[name]
        stamps: list[float] = []

        def stamp(ctx: Any, stamps: list[float] = stamps) -> None:
            sync(device)
            stamps.append(clock())

        synth.after_step = stamp  # type: ignore[method-assign]
        spec = SynthesisSpec(labels, SHAPE, round_index, MEAN, STD)
        result = synth.synthesize(spec)
        times[name] += [b - a for a, b in itertools.pairwise(stamps)]
        if name == "adi":
            start = clock()
            synth.after_batch(result, torch.ones(args.batch, dtype=torch.bool))
            sync(device)
            distill.append(clock() - start)
    out = {name: summary(t, args.batch) for name, t in times.items()}
    out["adi_over_deepinversion"] = out["adi"]["seconds"] / out["deepinversion"]["seconds"]
    out["after_batch_seconds"] = statistics.median(distill)
    return out


def time_fusion(teacher: nn.Module, args: argparse.Namespace, device: torch.device):
    dtype = autocast_dtype("auto", device)
    models = {"unfused": freeze(copy.deepcopy(teacher)), "fused": freeze(fuse_batchnorm(teacher))}
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch, *SHAPE, generator=generator).to(device)
    with torch.no_grad():
        reference = {k: m.to(device)(inputs) for k, m in models.items()}
    difference = (reference["fused"] - reference["unfused"]).abs().max().item()
    for model in models.values():
        model.to(memory_format=torch.channels_last)
    inputs = inputs.contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def infer(model: nn.Module) -> None:
        with torch.no_grad(), autocast():
            model(inputs)

    def invert(model: nn.Module) -> None:
        x = inputs.detach().requires_grad_(True)
        with autocast():
            loss = model(x).float().logsumexp(1).sum()
        loss.backward()

    out: dict[str, Any] = {"max_logit_difference_fp32": difference}
    for way, step in (("inference", infer), ("inversion_step", invert)):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _, name in itertools.product(range(args.rounds), models):
            times[name] += repeat(step, models[name], args.iterations, device)
        result = {name: summary(t, args.batch) for name, t in times.items()}
        result["unfused_over_fused"] = result["unfused"]["seconds"] / result["fused"]["seconds"]
        out[way] = result
    return out


def repeat(
    step: Callable[[nn.Module], None], model: nn.Module, count: int, device: torch.device
) -> list[float]:
    """Seconds of each of ``count`` calls of ``step(model)`` after one warm-up call."""
    step(model)
    times = []
    for _ in range(count):
        sync(device)
        start = clock()
        step(model)
        sync(device)
        times.append(clock() - start)
    return times


def print_results(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{meta['threads']} threads, batch {meta['batch']}, 32x32, {meta['clock']} clock, load "
        f"{meta['load_start']} -> {meta['load_end']}"
    )
    for r in results:
        s, f = r["synthesis"], r["fusion"]
        print(f"{r['arch']} ({r['weights']})")
        for name in ("deepinversion", "adi"):
            print(f"  {name:<15} {s[name]['seconds']:.3f} s/iteration")
        print(
            f"  adi / deepinversion {s['adi_over_deepinversion']:.2f}x per iteration; "
            f"after_batch {s['after_batch_seconds']:.3f} s"
        )
        for way in ("inference", "inversion_step"):
            w = f[way]
            print(
                f"  {way:<15} unfused {w['unfused']['seconds']:.4f} s, fused "
                f"{w['fused']['seconds']:.4f} s, unfused / fused {w['unfused_over_fused']:.2f}x"
            )
        print(f"  max |logit difference| fp32: {f['max_logit_difference_fp32']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--teachers", default="resnet20,resnet56")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first of each round is not counted)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "rounds": args.rounds,
        "iterations": args.iterations,
        "clock": args.clock,
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    results = []
    for arch in args.teachers.split(","):
        teacher, weights = load(arch.strip())
        results.append(
            {
                "arch": arch.strip(),
                "weights": weights,
                "synthesis": time_synthesizers(teacher, args, device),
                "fusion": time_fusion(teacher, args, device),
            }
        )
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print_results(results, meta)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
