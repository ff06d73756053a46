"""What ``dreamshard submit`` costs over driving the same cluster directly.

Starts a local Ray head (``ray start --head --block`` on 127.0.0.1 with free ports, the
helper the tests use), then runs one small config alternately two ways, each as a fresh
process, for ``--rounds`` rounds:

* ``direct``: ``dreamshard run CONFIG --set runtime.address=127.0.0.1:PORT`` (a driver on
  this machine connects to the cluster);
* ``submit``: ``dreamshard submit CONFIG --address http://127.0.0.1:DASHBOARD --wait``
  (validate here, upload the config, checkpoint and code, the driver runs on the head,
  its log is streamed back).

Each run has its own ``run.name``, so nothing is resumed. Wall seconds are measured from
process start to exit. At the end the head's Prometheus endpoint is read and the
``ray_dreamshard_*`` samples are recorded, as a check that the metrics arrive.

Run from the repository root::

    python benchmarks/submit_overhead.py [--rounds 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import yaml
from common import ROOT, cpu_name

# isort: split
from ray_head import ray_head

CONFIG = {
    "run": {"name": "bench", "seed": 0},
    "teacher": {"arch": "resnet20", "checkpoint": str(ROOT / "models" / "demo-resnet20.pt")},
    "synthesizer": {"name": "deepinversion", "iterations": 20},
    "plan": {"num_images": 64, "batch_size": 32, "shard_size": 32},
    "filter": {"enabled": False, "max_attempts": 1},
    "runtime": {"executor": "ray", "progress": False},
}


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"{command[3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return seconds


def metric_samples(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_dreamshard_") and not line.startswith("#"):
            name = line.split("{", 1)[0]
            samples[name] = samples.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="submit-bench-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "run": {**CONFIG["run"], "output": str(work)}}))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    cli = [sys.executable, "-m", "pipeline.cli"]
    times: dict[str, list[float]] = {"direct": [], "submit": []}
    start = time.perf_counter()
    with ray_head({}) as head:
        head_seconds = time.perf_counter() - start
        gcs = f"127.0.0.1:{head.ports['port']}"
        commands = {
            "direct": [*cli, "run", str(config), "--set", f"runtime.address={gcs}"],
            "submit": [*cli, "submit", str(config), "--address", head.address, "--wait"],
        }
        for i in range(args.rounds):
            for way, command in commands.items():
                times[way].append(timed([*command, "--set", f"run.name={way}-{i}"], env))
            print(
                f"round {i}: direct {times['direct'][-1]:.1f} s, submit {times['submit'][-1]:.1f} s"
            )
        time.sleep(3)  # one more metrics export interval
        metrics = metric_samples(head.metrics_url)
    shutil.rmtree(work, ignore_errors=True)
    median = {way: statistics.median(values) for way, values in times.items()}
    result = {
        "device": f"CPU, {os.cpu_count()} cores ({cpu_name()})",
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": CONFIG,
        "head_start_seconds": round(head_seconds, 1),
        "seconds": {way: [round(v, 2) for v in values] for way, values in times.items()},
        "median_seconds": {way: round(v, 2) for way, v in median.items()},
        "submit_over_direct": round(median["submit"] / median["direct"], 2),
        "metrics": metrics,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
