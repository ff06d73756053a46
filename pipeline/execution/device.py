"""Where a worker computes: its thread count and device, set once when it starts."""

from __future__ import annotations

import torch


def worker_device(device: str | None, threads: int | None) -> torch.device:
    """Set this process's torch threads (when the pool gives a count) and return the
    worker's device: the one given, else CUDA when there is one, else the CPU."""
    if threads:
        torch.set_num_threads(threads)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
