"""Where a worker computes: its thread count and device, set once when it starts."""

from __future__ import annotations

import os

import torch

from pipeline.errors import DeviceUnavailable
from pipeline.node import describe, this_node


def worker_device(device: str | None, threads: int | None) -> torch.device:
    """Set this process's torch threads (when the pool gives a count) and return the
    worker's device: the one given, else CUDA when there is one, else the CPU.

    A worker given CUDA on a node where torch finds none raises
    :class:`DeviceUnavailable` naming the node: it never falls back to the CPU (an
    actor holding a GPU slot would synthesize on its node's CPU, many times slower)."""
    if threads:
        torch.set_num_threads(threads)
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceUnavailable(
            f"a worker on node {describe(this_node())} was given a GPU, but torch "
            f"{torch.__version__} finds no CUDA device there (CUDA_VISIBLE_DEVICES="
            f"{visible!r}, torch built for CUDA {torch.version.cuda}); check the node's "
            "driver and its torch build, or set runtime.device: cpu"
        )
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
