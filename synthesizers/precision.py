"""Device-dependent choices of the loop: the autocast dtype, loss scaling, and whether
``torch.compile`` pays."""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (avx512_bf16 or AMX), where bf16
    autocast is faster than fp32 rather than emulated."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


class _NoScaler:
    """The GradScaler interface without scaling (every precision but fp16)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> Any:
    """Loss scaling for fp16 autocast (its gradients underflow without it); a pass-through
    for bf16 and fp32. A step whose gradients overflow is skipped, as GradScaler does."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return _NoScaler()


COMPILE_MIN_ITERATIONS_CPU = 1000  # below this, compiling on a CPU costs more than it saves


def compile_enabled(setting: str, device: torch.device, iterations: int) -> bool:
    """Whether ``compile`` (auto | on | off) compiles the step on ``device`` for a
    synthesizer that runs ``iterations`` iterations per batch.

    auto: on for CUDA; on a CPU only for long runs. On 2 CPU cores (shared, heavily
    loaded) compiling the ResNet-20 step at batch 256 took 216 s and the compiled step
    then ran 2.9x faster than the eager one (benchmarks/README.md): that pays back within
    a few hundred iterations of a 2,000-iteration batch, never in a short test run.
    """
    if setting == "auto":
        return device.type == "cuda" or iterations >= COMPILE_MIN_ITERATIONS_CPU
    return setting == "on"
