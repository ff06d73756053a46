"""DeepInversion synthesis throughput: this implementation against a plain reference loop.

For each teacher (CIFAR ResNet-20 and ResNet-56; the akamaster checkpoints in
``../shared/models/cifar10-resnet/`` when present, else randomly initialised weights)
the benchmark measures images per second of DeepInversion at one batch (256 by default)
of 32×32 images, two ways:

* ``this``: ``synthesizers.DeepInversion`` with its defaults (bf16 autocast where the
  device supports it, channels_last, frozen teacher, hooks that keep only per-channel
  statistics);
* ``reference``: the obvious loop written here: fp32, contiguous NCHW, the teacher's
  parameters left with ``requires_grad=True`` (autograd also computes weight gradients),
  hooks that store every BatchNorm input and compute the statistics after the forward.

Both run the same loss (CE + 10 × BN-statistics distance + 2.5e-5 × TV, random jitter
and flip), Adam (lr 0.05, betas 0.5/0.9, cosine schedule) on the pixels and a clip to
the valid range. Each ablation row is ``this`` with one switch turned off (see
``ABLATIONS``). They run alternately in one process (reference, this, each ablation, …)
for ``--rounds`` rounds of
``--iterations`` iterations; the first iteration of every round is a warm-up and is not
counted. The table gives the median seconds per iteration, images/s = batch / that, the
ratio this / reference, and the achieved FLOP/s, counted as 3 × the analytic forward
FLOPs per image (forward + backward w.r.t. activations and input; the reference's weight
gradients, about one more forward's worth, are extra work that is not counted).

``--compile`` adds the compile time and steady state of ``compile=on``;
``--quality-iterations N`` adds equal-quality runs (this, the plain path with every
switch off, the reference: accept rate at ``--tau`` and final loss terms, same seeds)
and the time to quality (the first early-stopping check where 95% of a batch passes).

Run from the repository root::

    python benchmarks/synthesis_throughput.py [--device cpu] [--batch 256] \
        [--teachers resnet20,resnet56] [--threads N] [--json results.json] \
        [--compile] [--quality-iterations 100 --quality-batch 32]

Imports only torch, the standard library and the project (no Ray).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import RESNET20, RESNET56, cpu_name
from torch import nn

from pipeline.models.archs import build_architecture
from synthesizers.base import StepContext, SynthesisSpec
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig
from synthesizers.spec import PLAIN_PATH as PLAIN

CHECKPOINTS = {
    "resnet20": RESNET20,
    "resnet56": RESNET56,
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (3, 32, 32)
BN_WEIGHT, TV_WEIGHT, LR, JITTER = 10.0, 2.5e-5, 0.05, 2
# The reference loop's optimiser and augmentation (the cifar preset's loss, the
# ImageNet script's Adam betas, cosine schedule, flip and clip), set explicitly so that
# both sides compute the same thing whatever DeepInversion's default preset is.
REFERENCE: dict[str, Any] = {
    "betas": (0.5, 0.9),
    "lr_schedule": "cosine",
    "flip": True,
    "clip": True,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def intervals(stamps: list[float]) -> list[float]:
    """Seconds between successive timestamps (one iteration each)."""
    return [b - a for a, b in itertools.pairwise(stamps)]


def load(arch: str) -> tuple[nn.Module, str, tuple[float, ...], tuple[float, ...]]:
    """(model in eval mode, where its weights came from, input mean, input std)."""
    path = CHECKPOINTS.get(arch)
    if path is not None and path.exists():
        from pipeline.config import TeacherConfig
        from pipeline.models.teachers import load_teacher

        teacher = load_teacher(TeacherConfig(arch=arch, checkpoint=str(path)))
        return (
            teacher.model.eval(),
            f"checkpoint {path.name}",
            teacher.config.mean,
            teacher.config.std,
        )
    torch.manual_seed(0)
    return build_architecture(arch, 10).eval(), "random init", IMAGENET_MEAN, IMAGENET_STD


def forward_macs(model: nn.Module) -> int:
    """Multiply-adds of the conv and linear layers on one 1×3×32×32 forward."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *SHAPE))
    finally:
        for handle in handles:
            handle.remove()
    return total


class TimedDeepInversion(DeepInversion):
    """DeepInversion unchanged except that ``after_step`` records a timestamp (and, for
    the ``trainable teacher`` ablation, drops the weight gradients it made)."""

    stamps: list[float]

    def after_step(self, ctx: StepContext) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        for parameter in self.teacher.parameters():
            parameter.grad = None


# Each ablation turns one optimisation off (or, for compile, on) against the defaults.
# "trainable teacher" leaves the teacher's parameters requiring grad, so that autograd
# also computes weight gradients (the frozen teacher is a contract, not a config switch).
ABLATIONS: dict[str, dict[str, Any]] = {
    "this": {},
    "fused_moments off": {"fused_moments": False},
    "fused_optimizer off": {"fused_optimizer": False},
    "affine_batchnorm off": {"affine_batchnorm": False},
    "channels_last off": {"channels_last": False},
    "precision fp32": {"precision": "fp32"},
    "trainable teacher": {},
}


def build_variant(model: nn.Module, name: str, overrides: dict[str, Any], args, device):
    config = DeepInversionConfig(iterations=args.iterations, **REFERENCE, **overrides)
    synth = TimedDeepInversion(copy.deepcopy(model), config, device)
    if name == "trainable teacher":
        for parameter in synth.teacher.parameters():
            parameter.requires_grad_(True)
    return synth


def run_this(synth: TimedDeepInversion, labels: torch.Tensor, mean: Any, std: Any) -> list[float]:
    """Seconds of every iteration after the first (one synthesize call)."""
    synth.stamps = []
    synth.synthesize(SynthesisSpec(labels, SHAPE, 0, tuple(mean), tuple(std)))
    return intervals(synth.stamps)


def run_reference(
    model: nn.Module,
    labels: torch.Tensor,
    mean: Any,
    std: Any,
    iterations: int,
    seed: int = 0,
    outcome: dict[str, Any] | None = None,
) -> list[float]:
    """The plain loop; seconds of every iteration after the first. ``outcome`` (when
    given) receives the final loss terms and the teacher's fp32 probabilities on the
    8-bit quantised images, as ``Synthesizer.synthesize`` reports them."""
    device = labels.device
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    low, high = (0 - mean_t) / std_t, (1 - mean_t) / std_t
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stored: list[torch.Tensor] = []
    handles = [bn.register_forward_hook(lambda m, i, o: stored.append(i[0])) for bn in bns]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pixels = torch.randn(len(labels), *SHAPE, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([pixels], lr=LR, betas=(0.5, 0.9))  # DeepInversion's
    schedule = torch.optim.lr_scheduler.LambdaLR(  # and its cosine schedule
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations))
    )
    stamps = []
    try:
        for _ in range(iterations):
            stored.clear()
            dx, dy = rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)
            x = torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))
            if rng.random() < 0.5:
                x = torch.flip(x, dims=(3,))
            logits = model(x)
            loss_bn = 0.0
            for bn, a in zip(bns, stored, strict=True):
                mu = a.mean(dim=(0, 2, 3))
                var = a.var(dim=(0, 2, 3), unbiased=False)
                loss_bn = loss_bn + (mu - bn.running_mean).norm() + (var - bn.running_var).norm()
            tv = sum(
                d.norm()
                for d in (
                    x[:, :, :, :-1] - x[:, :, :, 1:],
                    x[:, :, :-1, :] - x[:, :, 1:, :],
                    x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
                    x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
                )
            )
            ce = F.cross_entropy(logits, labels)
            loss = ce + BN_WEIGHT * loss_bn + TV_WEIGHT * tv
            optimizer.zero_grad()
            model.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                pixels.copy_(torch.maximum(torch.minimum(pixels, high), low))
            sync(device)
            stamps.append(time.perf_counter())
        if outcome is not None:
            terms = {"ce": ce, "bn": loss_bn, "tv": tv, "total": loss}
            outcome["losses"] = {k: float(v.detach()) for k, v in terms.items()}
            with torch.no_grad():
                images = ((pixels * std_t + mean_t).clamp(0, 1) * 255).round() / 255
                stored.clear()
                outcome["probs"] = torch.softmax(model((images - mean_t) / std_t), 1).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return intervals(stamps)


def bench_teacher(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, source, mean, std = load(arch)
    macs = forward_macs(model)
    reference = copy.deepcopy(model).to(device).eval()  # fp32, NCHW, requires_grad=True
    variants = {
        name: build_variant(model, name, overrides, args, device)
        for name, overrides in ABLATIONS.items()
        if name == "this" or args.ablations
    }
    labels = torch.arange(args.batch, device=device) % 10
    times: dict[str, list[float]] = {name: [] for name in ["reference", *variants]}
    for synth in variants.values():  # warm-up, not counted
        run_this(synth, labels, mean, std)
    run_reference(reference, labels, mean, std, 2)
    for _ in range(args.rounds):  # alternately: reference, this, each ablation, again
        times["reference"] += run_reference(reference, labels, mean, std, args.iterations)
        for name, synth in variants.items():
            times[name] += run_this(synth, labels, mean, std)
    result: dict[str, Any] = {"arch": arch, "weights": source, "forward_macs_per_image": macs}
    result["forward_flops_per_image"] = 2 * macs
    result["ways"] = {}
    for name, seconds in times.items():
        synth = variants.get(name)
        precision = "fp32" if synth is None or synth.dtype is None else str(synth.dtype)[6:]
        layout = "channels_last" if synth is not None and synth.config.channels_last else "NCHW"
        median = statistics.median(seconds)
        rate = args.batch / median
        flops = 3 * 2 * macs * rate
        result["ways"][name] = {
            "precision": {"bfloat16": "bf16", "float16": "fp16"}.get(precision, precision),
            "layout": layout,
            "seconds_per_iteration": median,
            "images_per_second": rate,
            "flops_per_second": flops,
            "fraction_of_peak": flops / peak_flops(precision, args.threads, device),
            "iteration_seconds": seconds,
        }
    ref_rate = result["ways"]["reference"]["images_per_second"]
    for way in result["ways"].values():
        way["ratio_to_reference"] = way["images_per_second"] / ref_rate
    result["ratio"] = result["ways"]["this"]["ratio_to_reference"]
    if args.compile:
        result["compile"] = bench_compile(model, args, device, labels, mean, std, variants["this"])
    if args.quality_iterations:
        result["quality"] = bench_quality(model, reference, args, device, mean, std)
    return result


def bench_compile(model, args, device, labels, mean, std, eager) -> dict[str, Any]:
    """Compile time (the first synthesize call, minus an eager call of equal length) and
    steady-state seconds per iteration of ``compile=on``, alternated with the eager path."""
    compiled = build_variant(model, "compile on", {"compile": "on"}, args, device)
    start = time.perf_counter()
    run_this(compiled, labels, mean, std)
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    run_this(eager, labels, mean, std)
    eager_call = time.perf_counter() - start
    times: dict[str, list[float]] = {"compile on": [], "this": []}
    for _ in range(args.rounds):
        times["compile on"] += run_this(compiled, labels, mean, std)
        times["this"] += run_this(eager, labels, mean, std)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "compile_seconds": first_call - eager_call,
        "seconds_per_iteration": medians,
        "speedup": medians["this"] / medians["compile on"],
        "iteration_seconds": times,
    }


def accept_rate(probs: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    confidence, predicted = probs.max(dim=1)
    return float(((confidence >= tau) & (predicted == labels.cpu())).float().mean())


def bench_quality(model, reference, args, device, mean, std) -> dict[str, Any]:
    """Equal quality at equal iterations: accept rate at τ and final loss terms of this
    implementation and of the reference, for each seed; then the time to quality (the
    first early-stopping check at which 95% of the batch passes) of this implementation."""
    n, tau = args.quality_iterations, args.tau
    labels = torch.arange(args.quality_batch, device=device) % 10
    synth = DeepInversion(
        copy.deepcopy(model), DeepInversionConfig(iterations=n, **REFERENCE), device
    )
    plain = DeepInversion(
        copy.deepcopy(model), DeepInversionConfig(iterations=n, **REFERENCE, **PLAIN), device
    )
    seeds: list[dict[str, Any]] = []
    for seed in range(args.quality_seeds):
        spec = SynthesisSpec(labels, SHAPE, seed, tuple(mean), tuple(std))
        row: dict[str, Any] = {"seed": seed}
        for name, method in (("this", synth), ("plain path", plain)):
            result = method.synthesize(spec)
            row[name] = {"accept_rate": accept_rate(result.probs, labels, tau), **result.losses}
        outcome: dict[str, Any] = {}
        run_reference(reference, labels, mean, std, n, seed, outcome)
        row["reference"] = {"accept_rate": accept_rate(outcome["probs"], labels, tau)}
        row["reference"] |= outcome["losses"]
        seeds.append(row)
    config = DeepInversionConfig(iterations=n, early_stop=True, early_stop_every=10, **REFERENCE)
    stopper = DeepInversion(copy.deepcopy(model), config, device)
    spec = SynthesisSpec(labels, SHAPE, 0, tuple(mean), tuple(std), min_confidence=tau)
    stopped = stopper.synthesize(spec)
    reached = [c for c in stopped.checks if c["accepted"] >= 0.95]
    return {
        "batch": args.quality_batch,
        "iterations": n,
        "tau": tau,
        "seeds": seeds,
        "early_stop": {
            "iterations": stopped.iterations,
            "seconds": stopped.seconds,
            "stopped_early": stopped.stopped_early,
            "accept_rate": accept_rate(stopped.probs, labels, tau),
            "checks": stopped.checks,
            "time_to_95": reached[0] if reached else None,
        },
    }


def peak_flops(precision: str, threads: int, device: torch.device) -> float:
    """Nominal peak FLOP/s of the CPU cores used: ``threads`` cores × the clock
    /proc/cpuinfo reports × FLOPs per cycle of a Zen 4 core (two 256-bit FMA pipes:
    32 fp32 or 64 bf16 FLOPs per cycle; the avx512_bf16 EPYC here is Zen 4 or later).
    On a GPU run the benchmark leaves this at NaN: name a peak there before using it."""
    if device.type == "cpu":
        per_cycle = 64 if precision == "bfloat16" else 32
        return threads * cpu_hz() * per_cycle
    return float("nan")


def cpu_hz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) * 1e6
    except OSError:
        pass
    return float("nan")


def print_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"DeepInversion throughput, device {meta['device']} ({meta['device_name']}), "
        f"torch {meta['torch']}, {meta['threads']} threads, batch {meta['batch']}, "
        f"32x32, {meta['rounds']} rounds x {meta['iterations']} iterations "
        f"(first of each round not counted)"
    )
    head = f"{'teacher':<10}{'way':<21}{'precision':<20}{'s/iter':>9}{'images/s':>10}"
    print(head + f"{'GFLOP/s':>10}{'of peak':>9}{'ratio':>8}")
    for r in results:
        fwd = r["forward_flops_per_image"] / 1e6
        print(f"{r['arch']} ({r['weights']}), forward {fwd:.1f} MFLOP/image")
        for key, m in r["ways"].items():
            print(
                f"{r['arch']:<10}{key:<21}{m['precision'] + ' ' + m['layout']:<20}"
                f"{m['seconds_per_iteration']:>9.3f}{m['images_per_second']:>10.1f}"
                f"{m['flops_per_second'] / 1e9:>10.1f}{m['fraction_of_peak']:>9.1%}"
                f"{m['ratio_to_reference']:>7.2f}x"
            )
        if "compile" in r:
            c = r["compile"]
            print(
                f"{r['arch']:<10}compile on: {c['compile_seconds']:.0f} s to compile, "
                f"{c['seconds_per_iteration']['compile on']:.3f} s/iter vs eager "
                f"{c['seconds_per_iteration']['this']:.3f} ({c['speedup']:.2f}x)"
            )
        if "quality" in r:
            q = r["quality"]
            print(f"{r['arch']:<10}quality: batch {q['batch']}, {q['iterations']} iterations")
            for seed in q["seeds"]:
                for key in ("this", "plain path", "reference"):
                    terms = " ".join(
                        f"{k}={v:.4g}" for k, v in seed[key].items() if k != "accept_rate"
                    )
                    rate = seed[key]["accept_rate"]
                    print(f"  seed {seed['seed']} {key:<10} accept {rate:.1%}  {terms}")
            e = q["early_stop"]
            print(
                f"  early stop: {e['iterations']} iterations, {e['seconds']:.1f} s, "
                f"accept {e['accept_rate']:.1%}; 95% first reached at {e['time_to_95']}"
            )
    print(
        "GFLOP/s = 3 x forward FLOPs x images/s (forward + backward w.r.t. activations and "
        "input); the reference also computes weight gradients, not counted. Peak: nominal, "
        "cores x clock x FLOPs/cycle of a Zen 4 core (64 bf16, 32 fp32)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=None, help="5 on CPU, 20 on GPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--teachers", default="resnet20,resnet56")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--no-ablations", dest="ablations", action="store_false", help="only this and reference"
    )
    parser.add_argument("--compile", action="store_true", help="also time compile=on")
    parser.add_argument("--quality-iterations", type=int, default=0, help="0: no quality run")
    parser.add_argument("--quality-batch", type=int, default=64)
    parser.add_argument("--quality-seeds", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.5, help="the filter's min_confidence")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.iterations is None:
        args.iterations = 5 if device.type == "cpu" else 20
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first of each round is a warm-up)")
    torch.set_num_threads(args.threads)
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "image_shape": list(SHAPE),
        "rounds": args.rounds,
        "iterations": args.iterations,
        "peak_flops_per_second": {
            p: peak_flops(p, args.threads, device) for p in ("bfloat16", "float32")
        },
        "load_average_before": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    results = [bench_teacher(a.strip(), args, device) for a in args.teachers.split(",")]
    meta["load_average_after"] = os.getloadavg()
    print_table(results, meta)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
