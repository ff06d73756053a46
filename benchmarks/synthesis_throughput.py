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
and flip), Adam with lr 0.05 on the pixels and a clip to the valid range. They run
alternately in one process (this, reference, this, …) for ``--rounds`` rounds of
``--iterations`` iterations; the first iteration of every round is a warm-up and is not
counted. The table gives the median seconds per iteration, images/s = batch / that, the
ratio this / reference, and the achieved FLOP/s, counted as 3 × the analytic forward
FLOPs per image (forward + backward w.r.t. activations and input; the reference's weight
gradients, about one more forward's worth, are extra work that is not counted).

Run from the repository root::

    python benchmarks/synthesis_throughput.py [--device cpu] [--batch 256] \
        [--teachers resnet20,resnet56] [--threads N] [--json results.json]

Imports only torch, the standard library and the project (no Ray).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.archs import build_architecture  # noqa: E402
from synthesizers.base import StepContext, SynthesisSpec  # noqa: E402
from synthesizers.deepinversion import DeepInversion, DeepInversionConfig  # noqa: E402

CHECKPOINTS = {
    "resnet20": ROOT.parent / "shared/models/cifar10-resnet/resnet20-12fca82f.th",
    "resnet56": ROOT.parent / "shared/models/cifar10-resnet/resnet56-4bfd9763.th",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (3, 32, 32)
BN_WEIGHT, TV_WEIGHT, LR, JITTER = 10.0, 2.5e-5, 0.05, 2


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
        from pipeline.teachers import load_teacher

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
    """DeepInversion unchanged except that ``after_step`` records a timestamp."""

    stamps: list[float]

    def after_step(self, ctx: StepContext) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())


def run_this(synth: TimedDeepInversion, labels: torch.Tensor, mean: Any, std: Any) -> list[float]:
    """Seconds of every iteration after the first (one synthesize call)."""
    synth.stamps = []
    synth.synthesize(SynthesisSpec(labels, SHAPE, 0, tuple(mean), tuple(std)))
    return intervals(synth.stamps)


def run_reference(
    model: nn.Module, labels: torch.Tensor, mean: Any, std: Any, iterations: int
) -> list[float]:
    """The plain loop; seconds of every iteration after the first."""
    device = labels.device
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    low, high = (0 - mean_t) / std_t, (1 - mean_t) / std_t
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stored: list[torch.Tensor] = []
    handles = [bn.register_forward_hook(lambda m, i, o: stored.append(i[0])) for bn in bns]
    torch.manual_seed(0)
    rng = random.Random(0)
    pixels = torch.randn(len(labels), *SHAPE, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([pixels], lr=LR)
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
            loss = F.cross_entropy(logits, labels) + BN_WEIGHT * loss_bn + TV_WEIGHT * tv
            optimizer.zero_grad()
            model.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pixels.copy_(torch.maximum(torch.minimum(pixels, high), low))
            sync(device)
            stamps.append(time.perf_counter())
    finally:
        for handle in handles:
            handle.remove()
    return intervals(stamps)


def bench_teacher(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, source, mean, std = load(arch)
    macs = forward_macs(model)
    reference = copy.deepcopy(model).to(device).eval()  # fp32, NCHW, requires_grad=True
    synth = TimedDeepInversion(model, DeepInversionConfig(iterations=args.iterations), device)
    labels = torch.arange(args.batch, device=device) % 10
    this_times: list[float] = []
    ref_times: list[float] = []
    run_this(synth, labels, mean, std)  # warm-up, not counted
    run_reference(reference, labels, mean, std, 2)
    for _ in range(args.rounds):
        this_times += run_this(synth, labels, mean, std)
        ref_times += run_reference(reference, labels, mean, std, args.iterations)
    result: dict[str, Any] = {"arch": arch, "weights": source, "forward_macs_per_image": macs}
    result["forward_flops_per_image"] = 2 * macs
    for key, times, precision, layout in (
        ("this", this_times, str(synth.dtype or "fp32"), "channels_last"),
        ("reference", ref_times, "fp32", "NCHW"),
    ):
        median = statistics.median(times)
        rate = args.batch / median
        result[key] = {
            "precision": {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
                precision, precision
            ),
            "layout": layout,
            "seconds_per_iteration": median,
            "images_per_second": rate,
            "flops_per_second": 3 * 2 * macs * rate,
            "iteration_seconds": times,
        }
    result["ratio"] = result["this"]["images_per_second"] / result["reference"]["images_per_second"]
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"DeepInversion throughput, device {meta['device']} ({meta['device_name']}), "
        f"torch {meta['torch']}, {meta['threads']} threads, batch {meta['batch']}, "
        f"32x32, {meta['rounds']} rounds x {meta['iterations']} iterations "
        f"(first of each round not counted)"
    )
    head = f"{'teacher':<10}{'way':<11}{'precision':<20}{'s/iter':>9}{'images/s':>10}"
    print(head + f"{'GFLOP/s':>10}{'ratio':>8}")
    for r in results:
        fwd = r["forward_flops_per_image"] / 1e6
        print(f"{r['arch']} ({r['weights']}), forward {fwd:.1f} MFLOP/image")
        for key in ("this", "reference"):
            m = r[key]
            ratio = f"{r['ratio']:.2f}x" if key == "this" else ""
            print(
                f"{r['arch']:<10}{key:<11}{m['precision'] + ' ' + m['layout']:<20}"
                f"{m['seconds_per_iteration']:>9.3f}{m['images_per_second']:>10.1f}"
                f"{m['flops_per_second'] / 1e9:>10.1f}{ratio:>8}"
            )
    print(
        "GFLOP/s = 3 x forward FLOPs x images/s (forward + backward w.r.t. activations and "
        "input); the reference also computes weight gradients, not counted."
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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.iterations is None:
        args.iterations = 5 if device.type == "cpu" else 20
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first of each round is a warm-up)")
    torch.set_num_threads(args.threads)
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "image_shape": list(SHAPE),
        "rounds": args.rounds,
        "iterations": args.iterations,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    results = [bench_teacher(a.strip(), args, device) for a in args.teachers.split(",")]
    print_table(results, meta)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
