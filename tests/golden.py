"""Fixed small runs whose shard bytes are recorded in ``golden-shards.json``.

The demo config at 20 iterations (inline and on Ray), a small retrieval and a small
translation. Paths and images are fixed, so the bytes depend only on the code, torch
and the CPU. ``python tests/golden.py --record`` rewrites the record; the test
``test_golden_bytes.py`` checks that the same configs still give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("golden-shards.json")
ROOT = Path("/tmp/dreamshard-golden")  # fixed: absolute paths are written into samples
KINDS = ("inline", "ray", "retrieval", "translation")


def environment() -> dict[str, str]:
    """What the bytes depend on besides the code: torch, the CPU (two CPUs of one
    capability level, AVX512, give different bytes: oneDNN picks kernels by the model's
    features) and whether it has native bf16 (``precision: auto`` autocasts only there)."""
    import torch

    from synthesizers.precision import cpu_has_native_bf16, cpu_model

    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": str(cpu_has_native_bf16()),
        "threads": str(torch.get_num_threads()),
    }


def digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.glob("*.tar"))
    }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(folder: Path, count: int, seed: int, classes: int = 0) -> None:
    """``count`` random PNGs in ``folder`` (in ``classes`` class folders when > 0)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        where = folder / f"c{i % classes}" if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{i:03d}.png").write_bytes(_png(rng.integers(0, 256, (32, 32, 3), np.uint8)))


def _teacher(root: Path) -> str:
    """A seeded random ResNet-20 with non-trivial BN statistics (as the tests' fixture)."""
    import torch

    from pipeline.config import TeacherConfig
    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import save_checkpoint

    torch.manual_seed(0)
    model = build_architecture("resnet20", 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32))
    path = root / "resnet20-random.pt"
    save_checkpoint(model.eval(), TeacherConfig(checkpoint=str(path)), str(path))
    return str(path)


def produce(kind: str) -> dict[str, str]:
    """Run the fixed config ``kind`` in a fresh folder; the sha256 of each shard."""
    from pipeline.config import load_config, parse_config
    from pipeline.graph import run_job

    root = ROOT / kind
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if kind in ("inline", "ray"):
        overrides = [
            f"run.output={root / 'out'}",
            f"teacher.checkpoint={REPO / 'models' / 'demo-resnet20.pt'}",
            f"metadata.artifact={REPO / 'models' / 'demo-metadata.safetensors'}",
            "synthesizer.iterations=20",
            "plan.num_images=128",
            f"runtime.executor={kind}",
            "runtime.progress=false",
        ]
        config = load_config(REPO / "configs" / "demo.yaml", overrides)
        run_job(config)
        return digests(root / "out" / "demo" / "shards")
    checkpoint = _teacher(root)
    data: dict[str, Any] = {
        "run": {"name": kind, "seed": 1, "output": str(root / "out")},
        "teacher": {"arch": "resnet20", "checkpoint": checkpoint},
        "runtime": {"executor": "inline", "progress": False},
    }
    if kind == "retrieval":
        _images(root / "labeled", 20, seed=0, classes=10)
        _images(root / "pool", 40, seed=1)
        data["synthesizer"] = {"name": "impression"}
        data["plan"] = {"shard_size": 8}
        data["retrieval"] = {
            "pool": str(root / "pool"),
            "labeled": str(root / "labeled"),
            "num_select": 12,
            "batch_size": 16,
            "files_per_task": 16,
        }
        from pipeline.stages.retrieval import run_retrieval

        run_retrieval(parse_config(data))
    else:
        _images(root / "source", 6, seed=2)
        _images(root / "target", 4, seed=3)
        data["synthesizer"] = {"name": "impression", "iterations": 3, "content_weight": 1e-4}
        data["plan"] = {"batch_size": 4, "shard_size": 4}
        data["translation"] = {"source": str(root / "source"), "target": str(root / "target")}
        run_job(parse_config(data))
    return digests(root / "out" / kind / "shards")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true", help="rewrite golden-shards.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    record = {"environment": environment(), "runs": {kind: produce(kind) for kind in KINDS}}
    text = json.dumps(record, indent=2, sort_keys=True)
    if args.record:
        RECORD.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
