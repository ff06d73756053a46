"""Load: many small shards against SeaweedFS with Ray actors, every shard verified, and
the memory of the driver and of each actor at 50 shards and at the end.

``dreamshard run`` runs as a child process (its own embedded Ray, 2 CPU actors) against
a SeaweedFS S3 server on 127.0.0.1 (``tests/seaweed.py``). The teacher is an untrained
ResNet-20 at 16×16; a shard is 4 images, one batch of 2 iterations, no filter, so the
run is dominated by what the pipeline does per shard (dispatch, PNG, tar, upload,
sidecar) rather than by synthesis. While it runs, this script counts the sidecars on the
server and reads the peak resident memory (``VmHWM`` in ``/proc/<pid>/status``) of the
driver and of each ``ShardWorker`` actor process; the figures at 50 shards are those of
the first reading with at least 50 sidecars; the final ones are the driver's
``ru_maxrss`` at exit (which includes the index, preview and manifest step), its peak at
the last reading while its actors were alive, and each actor's last reading. Every
sidecar also records its actor's VmHWM when the shard was written (``peak_rss_bytes``);
the maximum is reported as a cross-check.
Afterwards every tar is read back: sha256 against its sidecar and the manifest, sample
count with ``tarfile``, no key twice, totals; then ``dreamshard inspect --verify``.

``--faults`` also runs the fault tests (``reliability_faults.py``: ``tests/test_faults.py``,
``tests/test_storage_faults.py`` and the Ray Train kill test) with pytest and records each
test's outcome and duration, real injected faults apart from checks.

Run from the repository root::

    python benchmarks/reliability_load.py [--shards 200] [--checkpoint 50] [--faults] \
        [--json benchmarks/results/reliability.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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

import torch
import yaml
from common import ROOT
from reliability_faults import run_faults

# isort: split
import seaweed

MIB = 2**20


def status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` memory field in KiB (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children_of(root: int) -> list[int]:
    """Every living process below ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found += [child]
            stack.append(child)
    return found


def actor_pids(driver: int) -> list[int]:
    pids = []
    for pid in children_of(driver):
        with contextlib.suppress(OSError):
            if b"ShardWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def make_teacher(work: Path) -> str:
    from pipeline.config import TeacherConfig
    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import save_checkpoint

    torch.manual_seed(0)
    model = build_architecture("resnet20", 10).train()
    with torch.no_grad():  # BN running statistics that are not the identity
        for _ in range(3):
            model(torch.rand(32, 3, 16, 16))
    path = work / "resnet20-16px.pt"
    save_checkpoint(model.eval(), TeacherConfig(checkpoint=str(path), image_size=16), str(path))
    return str(path)


def run_config(output: str, options: dict[str, Any], teacher: str, shards: int) -> dict:
    return {
        "run": {"name": "load", "seed": 0, "output": output, "storage_options": options},
        "teacher": {"arch": "resnet20", "checkpoint": teacher, "image_size": 16},
        "synthesizer": {"name": "deepinversion", "iterations": 2},
        "plan": {"num_images": 4 * shards, "shard_size": 4, "batch_size": 4},
        "filter": {"enabled": False, "max_attempts": 1},
        "runtime": {"executor": "ray", "num_workers": 2, "cpus_per_worker": 1, "progress": False},
    }


def sidecar_count(fs: Any, folder: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(p.endswith(".json") for p in fs.ls(folder, detail=False, refresh=True))
    return 0


def run_and_watch(
    config_path: Path, fs: Any, shards_folder: str, checkpoint: int, log: Path, temp_dir: str
) -> dict[str, Any]:
    """Run the driver as a child; memory at ``checkpoint`` shards and at the end."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=temp_dir)
    start = time.monotonic()
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(config_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    at_checkpoint: dict[str, Any] | None = None
    actors_last: dict[int, int] = {}
    driver_shard_phase = 0  # the driver's peak while its actors were alive
    while True:  # wait4, not Popen.poll: the exit status comes with the child's rusage
        done, status, usage = os.wait4(driver.pid, os.WNOHANG)
        if done == driver.pid:
            break
        actors = actor_pids(driver.pid)
        for pid in actors:
            peak = status_kib(pid, "VmHWM")
            if peak is not None:
                actors_last[pid] = peak
        if actors:
            driver_shard_phase = status_kib(driver.pid, "VmHWM") or driver_shard_phase
        if at_checkpoint is None and sidecar_count(fs, shards_folder) >= checkpoint:
            at_checkpoint = {
                "shards_done": sidecar_count(fs, shards_folder),
                "seconds": round(time.monotonic() - start, 1),
                "driver_peak_rss_mib": round((status_kib(driver.pid, "VmHWM") or 0) / 1024, 1),
                "actors_peak_rss_mib": {
                    str(pid): round(kib / 1024, 1) for pid, kib in sorted(actors_last.items())
                },
            }
        time.sleep(0.5)
    driver.returncode = os.waitstatus_to_exitcode(status)
    final = {
        "seconds": round(time.monotonic() - start, 1),
        "driver_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "driver_peak_rss_mib_while_actors_ran": round(driver_shard_phase / 1024, 1),
        "actors_peak_rss_mib": {
            str(pid): round(kib / 1024, 1) for pid, kib in sorted(actors_last.items())
        },
    }
    return {
        "exit_code": driver.returncode,
        "at_checkpoint": at_checkpoint,
        "final": final,
        "left_behind": left_behind(temp_dir),
    }


def left_behind(temp_dir: str) -> list[str]:
    """Processes of the driver's embedded Ray still running after it exited (their command
    lines name its temp dir); stopped here by pid, named in the results."""
    time.sleep(3)
    names = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            line = Path(f"/proc/{entry}/cmdline").read_bytes()
            if entry.isdigit() and temp_dir.encode() in line:
                names.append(line.split(b"\0")[0].decode(errors="replace"))
                os.kill(int(entry), 9)
    return sorted(names)


def verify(fs: Any, run: str) -> dict[str, Any]:
    """Every shard read back: sha256 (sidecar and manifest), samples, unique keys, totals."""
    fs.invalidate_cache()  # the listings cached while the run was going
    manifest = json.loads(fs.cat(f"{run}/manifest.json"))
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/shards", detail=False))
    tars = [n for n in names if n.endswith(".tar")]
    problems, keys, peaks = [], set(), []
    if len(names) != 2 * len(tars) or len(tars) != len(manifest["shards"]):
        problems.append(f"{len(names)} objects for {len(manifest['shards'])} shards")
    for entry in manifest["shards"]:
        name = entry["name"]
        data = fs.cat(f"{run}/shards/{name}.tar")
        sidecar = json.loads(fs.cat(f"{run}/shards/{name}.json"))
        digest = hashlib.sha256(data).hexdigest()
        if not digest == sidecar["sha256"] == entry["sha256"]:
            problems.append(f"{name}: sha256 differs")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            found = {m.name.partition(".")[0] for m in tar if m.name.endswith(".png")}
        if len(found) != sidecar["samples"] or found & keys:
            problems.append(f"{name}: {len(found)} samples, sidecar says {sidecar['samples']}")
        keys |= found
        peaks.append(sidecar.get("peak_rss_bytes", 0))
    if len(keys) != manifest["totals"]["images"]:
        problems.append(f"{len(keys)} samples read, manifest says {manifest['totals']['images']}")
    return {
        "shards_verified": len(manifest["shards"]) - len({p.split(":")[0] for p in problems}),
        "samples_read": len(keys),
        "problems": problems,
        "sidecar_max_actor_peak_rss_mib": round(max(peaks) / MIB, 1),
    }


def inspect_verify(run_url: str, options: dict[str, Any]) -> int:
    from pipeline.cli.main import main

    flags = [a for k, v in options.items() for a in ("--storage-option", f"{k}={v}")]
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["inspect", run_url, "--verify", *flags])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--checkpoint", type=int, default=50)
    parser.add_argument("--faults", action="store_true", help="also run the fault tests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="load-"))
    temp_dir = tempfile.mkdtemp(prefix="rl-")  # the driver's embedded Ray (short path)
    load_before = os.getloadavg()
    with seaweed.seaweed() as server_process:
        server = server_process.server
        bucket, fs = server.make_bucket("load"), server.filesystem()
        options = server.storage_options()
        data = run_config(f"s3://{bucket}/runs", options, make_teacher(work), args.shards)
        config_path = work / "load.yaml"
        config_path.write_text(yaml.safe_dump(data))
        run = f"{bucket}/runs/load"
        watched = run_and_watch(
            config_path, fs, f"{run}/shards", args.checkpoint, work / "driver.log", temp_dir
        )
        if watched["exit_code"] != 0:
            raise SystemExit((work / "driver.log").read_text()[-4000:])
        checked = verify(fs, run)
        inspect_code = inspect_verify(f"s3://{run}", options)
    results: dict[str, Any] = {
        "benchmark": "reliability_load",
        "device": "CPU, 2 cores (AMD EPYC)",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "storage": "SeaweedFS (weed mini) on 127.0.0.1, s3fs",
        "sizes": {
            "shards": args.shards,
            "images_per_shard": 4,
            "image_size": 16,
            "teacher": "resnet20 (untrained)",
            "iterations": 2,
            "actors": 2,
        },
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "run": watched,
        "verification": {**checked, "inspect_verify_exit_code": inspect_code},
        "command": "python benchmarks/reliability_load.py " + " ".join(sys.argv[1:]),
    }
    if args.faults:
        results["faults"] = run_faults()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
