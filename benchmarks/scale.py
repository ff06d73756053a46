"""Scale of teachers and pools: a 1,000-class 224×224 teacher, and retrieval over a pool
of 100,000 images against one of 10,000, with the peak memory of the driver and of each
actor.

Both parts run the real command line (``python -m pipeline.cli run`` / ``retrieve``) as
a child process connected to a Ray head this script starts (``tests/ray_head.py``: free
ports on 127.0.0.1, a private temp dir, stopped by its process id). While a child runs,
the script reads the peak resident memory (``VmHWM`` in ``/proc/<pid>/status``) of every
actor process of the head every 0.5 s; the driver's is its ``ru_maxrss`` at exit.

``--teacher``: a ``torchvision:resnet50`` with seeded random weights and 1,000 classes,
saved as a state dict in a temporary folder (nothing downloaded, nothing kept), runs
DeepInversion on a handful of 224×224 images; the sizes of what the run wrote (preview,
manifest, card, wids index, index, sidecars) are recorded with the preview's pixels.

``--repeat``: one 1,000-image tar of that pool scored 12 times by one worker in this
process, at batch 64 then 256: RSS and peak after each task (accumulation or not); run
it alone (``--repeat``), so that nothing before it has raised this process's peak.

``--pool``: pools of 32×32 PNG images (blocks of colour plus noise, made with numpy)
in WebDataset-style tars of ``--per-tar`` images each, one pool per ``--pool-sizes``
entry, scored by the demo teacher (``models/demo-resnet20.pt``) against 10 classes × 2
generated labeled images, n_t = ``--select``, 2 actors of 1 CPU.

Run from the repository root::

    python benchmarks/scale.py --teacher --pool --repeat [--pool-sizes 10000 100000] \\
        [--json benchmarks/results/cpu-scale.json]

Each part replaces its own entry in the JSON and keeps the other's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import ROOT, cpu_name
from PIL import Image
from reliability_load import children_of, status_kib

# isort: split
from ray_head import ray_head

MIB = 2**20
DEMO_TEACHER = ROOT / "models" / "demo-resnet20.pt"
IMAGENET = {"arch": "torchvision:resnet50", "num_classes": 1000, "image_size": 224}


def actor_pids(head: int, name: str) -> list[int]:
    """The head's processes running an actor of class ``name`` (Ray titles them ``ray::Name``)."""
    found = []
    for pid in children_of(head):
        try:
            if f"ray::{name}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def run_and_watch(
    args: list[str], head: Any, actor: str, log: Path, shards: Path, interval: float = 0.5
) -> dict[str, Any]:
    """Run ``python -m pipeline.cli ARGS`` against the head; the driver's and each actor's
    peak, the actors' peak before the first sidecar appeared in ``shards`` (for
    retrieval: the end of scoring), and every 10 s the actors' largest RSS and peak."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), RAY_ADDRESS=f"127.0.0.1:{head.ports['port']}")
    start = time.monotonic()
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    actors: dict[int, int] = {}
    before_shards: list[int] | None = None
    trace: list[list[float]] = []
    while True:  # wait4, not Popen.poll: the exit status comes with the child's rusage
        done, status, usage = os.wait4(driver.pid, os.WNOHANG)
        if done == driver.pid:
            break
        if before_shards is None and any(shards.glob("*.json")):
            before_shards = list(actors.values())
        now = {
            pid: (status_kib(pid, "VmRSS") or 0, status_kib(pid, "VmHWM") or 0)
            for pid in actor_pids(head.process.pid, actor)
        }
        actors.update({pid: peak for pid, (_, peak) in now.items() if peak})
        elapsed = time.monotonic() - start
        if actors and now and elapsed >= 10 * len(trace):
            rss = max(r for r, _ in now.values()) / 1024
            trace.append([round(elapsed), round(rss, 1), round(max(actors.values()) / 1024, 1)])
        time.sleep(interval)
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": round(time.monotonic() - start, 1),
        "driver_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "actors_peak_rss_mib": [round(kib / 1024, 1) for _, kib in sorted(actors.items())],
        "actors_peak_rss_mib_before_first_shard": [
            round(kib / 1024, 1) for kib in before_shards or []
        ],
        "actors_trace_seconds_rss_peak_mib": trace,
    }


def checked(watched: dict[str, Any], log: Path) -> dict[str, Any]:
    if watched["exit_code"] != 0:
        raise SystemExit(log.read_text()[-4000:])
    return watched


def make_resnet50(work: Path) -> str:
    from pipeline.config import TeacherConfig
    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import save_checkpoint

    torch.manual_seed(0)
    model = build_architecture(IMAGENET["arch"], IMAGENET["num_classes"]).eval()
    path = work / "resnet50-random.pt"
    save_checkpoint(model, TeacherConfig(checkpoint=str(path), **IMAGENET), str(path))
    return str(path)


def teacher_part(head: Any, work: Path, images: int, iterations: int) -> dict[str, Any]:
    """A 1,000-class 224×224 run: memory, seconds and the size of every record."""
    checkpoint = make_resnet50(work)
    config = {
        "run": {"name": "scale", "seed": 0, "output": str(work / "out")},
        "teacher": {**IMAGENET, "checkpoint": checkpoint},
        "synthesizer": {"name": "deepinversion", "iterations": iterations},
        "plan": {"num_images": images, "batch_size": 2, "shard_size": 2},
        "filter": {"enabled": False, "max_attempts": 1},
        "runtime": {"num_workers": 1, "cpus_per_worker": 1, "progress": False},
    }
    path = work / "teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    log, run = work / "teacher.log", work / "out" / "scale"
    watched = checked(
        run_and_watch(["run", str(path)], head, "ShardWorker", log, run / "shards"), log
    )
    manifest = json.loads((run / "manifest.json").read_text())
    sidecars = [json.loads(p.read_text()) for p in sorted((run / "shards").glob("*.json"))]
    with Image.open(run / "preview.png") as preview:
        pixels = list(preview.size)
    records = ("preview.png", "manifest.json", "README.md", "wids-index.json", "index.parquet")
    return {
        "teacher": f"{IMAGENET['arch']}, {IMAGENET['num_classes']} classes, "
        f"{IMAGENET['image_size']}×{IMAGENET['image_size']}, seeded random weights",
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
        "sizes": {"images": images, "iterations": iterations, "batch": 2, "shard_size": 2},
        "actors": "1 × 1 CPU",
        "run": watched,
        "sidecar_max_actor_peak_rss_mib": round(max(s["peak_rss_bytes"] for s in sidecars) / MIB),
        "images_written": manifest["totals"]["images"],
        "preview": {**manifest["preview"], "pixels": pixels},
        "record_bytes": {name: (run / name).stat().st_size for name in records},
        "sidecar_bytes_max": max(len(json.dumps(s, indent=2)) for s in sidecars),
        "per_class_entries": len(manifest["totals"]["per_class"]),
    }


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pool(folder: Path, images: int, per_tar: int, seed: int = 0) -> dict[str, Any]:
    """``images`` 32×32 PNGs (4×4 blocks of colour plus noise) in tars of ``per_tar``."""
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number, first in enumerate(range(0, images, per_tar)):
        count = min(per_tar, images - first)
        blocks = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
        noise = rng.integers(0, 24, (count, 32, 32, 3), dtype=np.uint8)
        pictures = blocks.repeat(8, axis=1).repeat(8, axis=2) // 2 + noise  # (N, 32, 32, 3)
        with tarfile.open(folder / f"pool-{number:06d}.tar", "w") as tar:
            for i, picture in enumerate(pictures):
                data = png(picture)
                info = tarfile.TarInfo(f"{first + i:07d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"tars": number + 1, "bytes": size, "seconds": round(time.monotonic() - start, 1)}


def labeled_folder(root: Path, classes: int = 10, per_class: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{k}" / f"{i}.png").write_bytes(
                png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            )
    return root


def pool_part(head: Any, work: Path, sizes: list[int], per_tar: int, select: int) -> list[dict]:
    """Retrieval over each pool size in turn (each pool removed after its run)."""
    labeled = labeled_folder(work / "labeled")
    rows = []
    for images in sizes:
        pool = work / f"pool-{images}"
        made = make_pool(pool, images, per_tar)
        config = {
            "run": {"name": f"pool-{images}", "seed": 0, "output": str(work / "out")},
            "teacher": {"arch": "resnet20", "checkpoint": str(DEMO_TEACHER)},
            "synthesizer": {"name": "impression"},
            "retrieval": {
                "pool": str(pool),
                "labeled": str(labeled),
                "num_select": select,
                "batch_size": 256,
            },
            "runtime": {"num_workers": 2, "cpus_per_worker": 1, "progress": False},
        }
        path = work / f"pool-{images}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = work / f"pool-{images}.log"
        shards = work / "out" / f"pool-{images}" / "shards"
        load = os.getloadavg()[0]
        watched = checked(
            run_and_watch(["retrieve", str(path)], head, "PoolWorker", log, shards), log
        )
        totals = json.loads((work / "out" / f"pool-{images}" / "retrieval.json").read_text())
        rows.append(
            {
                "pool_images": images,
                "pool": {**made, "per_tar": per_tar, "format": "32×32 PNG in plain tars"},
                "num_select": select,
                "run": watched,
                "load_average_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
                "scored": totals["totals"]["pool_scored"],
                "selected": totals["totals"]["images"],
                "pool_tasks": totals["totals"]["pool_tasks"],
                "shards_written": len(totals["shards"]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(pool)
        shutil.rmtree(work / "out" / f"pool-{images}", ignore_errors=True)
    return rows


def repeat_part(work: Path, batch_sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """One 1,000-image pool tar scored ``repeats`` times by one ``PoolWorker`` in this
    process (1 thread) per batch size: its RSS and peak after each task tell memory that
    accumulates with the tasks from the working set of one batch."""
    from pipeline.config import parse_config
    from pipeline.io.pool import list_pool
    from pipeline.stages.retrieval import labeled_images, target_codes
    from pipeline.stages.retrieval_worker import PoolWorker

    make_pool(work / "repeat-pool", 1000, 1000)
    labeled = labeled_folder(work / "repeat-labeled")
    rows = []
    for batch in batch_sizes:
        config = parse_config(
            {
                "run": {"name": "repeat", "seed": 0, "output": str(work / "out")},
                "teacher": {"arch": "resnet20", "checkpoint": str(DEMO_TEACHER)},
                "synthesizer": {"name": "impression"},
                "retrieval": {
                    "pool": str(work / "repeat-pool"),
                    "labeled": str(labeled),
                    "num_select": 1000,
                    "batch_size": batch,
                },
                "runtime": {"executor": "inline", "progress": False},
            }
        )
        worker = PoolWorker(config, torch.zeros(1, 1), "cpu", 1)
        worker.targets = target_codes(worker.model, config, worker.layers, *labeled_images(config))
        (task,) = list_pool(str(work / "repeat-pool"))
        after = []
        for _ in range(repeats):
            worker.score(task, [1000])
            after.append([status_kib(os.getpid(), f) // 1024 for f in ("VmRSS", "VmHWM")])
        rows.append({"batch_size": batch, "tasks": repeats, "rss_and_peak_mib_after_each": after})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="store_true", help="the 1,000-class teacher part")
    parser.add_argument("--pool", action="store_true", help="the pool part")
    parser.add_argument("--repeat", action="store_true", help="one pool task scored repeatedly")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--per-tar", type=int, default=1000)
    parser.add_argument("--select", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/cpu-scale.json")
    args = parser.parse_args()
    import ray

    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    results.update(
        benchmark="scale",
        device=f"CPU, {os.cpu_count()} cores ({cpu_name()})",
        torch=torch.__version__,
        ray=ray.__version__,
        python=platform.python_version(),
    )
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    try:
        with ray_head({}) if args.teacher or args.pool else contextlib.nullcontext() as head:
            if args.teacher:
                load = os.getloadavg()[0]
                part = teacher_part(head, work, args.images, args.iterations)
                part["load_average_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                results["teacher"] = {**part, "command": command}
                print(json.dumps(results["teacher"], indent=2), flush=True)
            if args.pool:
                rows = pool_part(head, work, args.pool_sizes, args.per_tar, args.select)
                results["pool"] = {"runs": rows, "actors": "2 × 1 CPU", "command": command}
        if args.repeat:  # this process, no Ray: after the head is gone
            rows = repeat_part(work, [64, 256], 12)  # ascending: each peak is its own
            results["repeat"] = {"runs": rows, "command": command}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
