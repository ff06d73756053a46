"""Plain helpers for tests (no fixtures)."""

from __future__ import annotations

from typing import Any


def config_dict(output: str, checkpoint: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast run config as plain data; ``sections`` update the defaults."""
    data: dict[str, Any] = {
        "run": {"name": "test", "seed": 7, "output": output},
        "teacher": {"arch": "resnet20", "checkpoint": checkpoint},
        "synthesizer": {"name": "deepinversion", "iterations": 2},
        "plan": {"num_images": 32, "batch_size": 16, "shard_size": 16},
        "filter": {"enabled": False, "max_attempts": 1},
        "runtime": {"executor": "inline", "progress": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def base_config(output: str = "out", checkpoint: str = "teacher.pt") -> dict[str, Any]:
    return config_dict(output, checkpoint)
