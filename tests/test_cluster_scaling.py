"""Actors sized for the cluster a user really has, on real multi-node Ray clusters.

- an autoscaling cluster (Ray's fake multi-node provider: each node it "launches" is a
  real raylet on this machine) from a head with no workers: ``runtime.max_workers: 2``
  makes the autoscaler start two nodes, and an actor on each writes shards;
- two real nodes (``ray start --head``, and a second node started as ``ray start
  --address`` starts one, see ``ray_head.ray_worker_node``): a submitted run
  spreads over both and completes on the head when the second node (its raylet and
  every worker under it, as when a machine goes away) is killed mid-run; a GPU actor
  on a node with no CUDA stops the run naming that node.

Every node has its own temp dir and free loopback ports, and is stopped by process id
(never ``ray stop``, never ``AutoscalingCluster.start``, which runs ``ray stop --force``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from ray_head import (
    PORTS,
    RayHead,
    descendants,
    head_env,
    node_ports,
    own_processes,
    ray_head,
    ray_worker_node,
)
from tests_support import config_dict

from pipeline.stages.manifest import inspect_run

pytestmark = pytest.mark.slow

HEAD_ID = "a" * 56  # Ray node ids (RAY_OVERRIDE_NODE_ID_FOR_TESTING): known in advance
SECOND_ID = "b" * 56
SHARDS = 12  # of the two-node run: enough that the second node's actor writes a few
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def gcs_address(head: RayHead) -> str:
    return f"127.0.0.1:{head.ports['port']}"


def autoscaling_config(gcs: str) -> dict:
    """The fake multi-node provider's cluster config (what ``AutoscalingCluster`` writes;
    its ``example.yaml`` defaults are not in the wheel, so the provider is loaded as an
    ``external`` one): a head with no room for actors and a ``board`` node type (a
    custom resource standing in for a GPU), 0 up, at most 2."""
    return {
        "cluster_name": "dreamshard-fake",
        "max_workers": 2,
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 10,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs,
            "head_node_id": HEAD_ID,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "board.worker": {
                "resources": {"CPU": 1, "board": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def write_config(tmp_path: Path, checkpoint: str, **sections: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(str(tmp_path / "out"), checkpoint, **sections)))
    return path


def cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``dreamshard ARGS`` in a child process (this checkout's code), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=head_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sidecars(run: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run / "shards").glob("*.json"))}


def assert_every_shard_once(run: Path, planned: int, images: int) -> None:
    """Every planned shard complete and intact (sha256 checked), every sample key once."""
    report = inspect_run(str(run), verify=True)
    assert report["complete"] and report["finalised"], report
    assert report["shards_planned"] == planned and report["corrupt"] == []
    tars = sorted(map(str, run.glob("shards/*.tar")))
    keys = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == images


# --- an autoscaling cluster ------------------------------------------------------------


@pytest.fixture
def autoscaling_head() -> Iterator[RayHead]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ra-"))
    ports = node_ports(PORTS)
    config = temp_dir / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{ports[0]['port']}")))
    env = {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID,
        "RAY_CLOUD_INSTANCE_ID": HEAD_ID,
    }
    options = ("--num-cpus=1", f"--autoscaling-config={config}")
    with ray_head(env, options, temp_dir, ports) as head:
        yield head
    assert own_processes(temp_dir) == []  # the launched nodes went with the head


def test_max_workers_makes_the_autoscaler_add_a_node_per_actor(
    autoscaling_head: RayHead, tmp_path: Path, teacher_checkpoint: str
) -> None:
    config = write_config(
        tmp_path,
        teacher_checkpoint,
        synthesizer={"iterations": 10},
        plan={"num_images": 64},  # 4 shards of 16
        runtime={
            "executor": "ray",
            "device": "cpu",
            "max_workers": 2,
            "resources_per_worker": {"board": 1},  # only the autoscaled node type has it
        },
    )
    started = time.monotonic()
    driver = cli(["run", str(config)], {"RAY_ADDRESS": gcs_address(autoscaling_head)})
    out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 0, out
    seconds = time.monotonic() - started
    run = tmp_path / "out" / "test"
    assert_every_shard_once(run, planned=4, images=64)
    nodes = {s["node"]["ray_node_id"] for s in sidecars(run).values()}
    assert len(nodes) == 2 and HEAD_ID not in nodes, (nodes, out)
    print(f"autoscaled run: 2 nodes launched, 4 shards in {seconds:.1f} s")


# --- two real nodes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[RayHead, subprocess.Popen]]:
    """A head with one CPU (room for one actor) and a second node with one CPU and one
    GPU in Ray's books (this machine has no CUDA); yields the head and the process that
    started the second node."""
    with ray_head({"RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID}, ("--num-cpus=1",)) as head:
        env = {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": SECOND_ID}
        with ray_worker_node(head, env, num_cpus=1, num_gpus=1) as second:
            wait_for_nodes(head, 2)
            yield head, second


def wait_for_nodes(head: RayHead, count: int, seconds: float = 90.0) -> None:
    """Until the head's dashboard lists ``count`` live nodes."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            url = f"{head.address}/nodes?view=summary"
            with urllib.request.urlopen(url, timeout=5) as response:
                summary = json.loads(response.read())["data"]["summary"]
            if sum(node["raylet"]["state"] == "ALIVE" for node in summary) >= count:
                return
        time.sleep(1.0)
    raise RuntimeError(f"the cluster did not reach {count} nodes in {seconds:.0f} s")


def test_a_gpu_actor_on_a_node_without_cuda_stops_the_run_naming_the_node(
    two_nodes: tuple[RayHead, subprocess.Popen], tmp_path: Path, teacher_checkpoint: str
) -> None:
    head, _ = two_nodes
    config = write_config(
        tmp_path, teacher_checkpoint, runtime={"executor": "ray", "device": "gpu"}
    )
    driver = cli(["run", str(config)], {"RAY_ADDRESS": gcs_address(head)})
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 1, out
    assert f"(Ray node {SECOND_ID}) was given a GPU, but torch" in out
    assert "finds no CUDA device there" in out and "Traceback" not in out
    assert not list((tmp_path / "out" / "test" / "shards").glob("*.json"))


def test_a_submitted_run_spreads_over_both_nodes_and_survives_losing_one(
    two_nodes: tuple[RayHead, subprocess.Popen], tmp_path: Path, teacher_checkpoint: str
) -> None:
    head, second = two_nodes
    config = write_config(
        tmp_path,
        teacher_checkpoint,
        run={"name": "spread"},
        synthesizer={"iterations": 16},  # shards slow enough to outlast the second node
        plan={"num_images": 16 * SHARDS},
        runtime={"executor": "ray", "device": "cpu", "max_workers": 2},
    )
    started = time.monotonic()
    submit = cli(["submit", str(config), "--address", head.address, "--wait"], {})
    run = tmp_path / "out" / "spread"
    killed_after = None
    seen: dict[str, float] = {}  # shard -> seconds after submission when it appeared
    deadline = time.monotonic() + 240
    while submit.poll() is None and time.monotonic() < deadline:
        written = sidecars(run) if (run / "shards").exists() else {}
        seen.update({n: round(time.monotonic() - started, 1) for n in written if n not in seen})
        on_second = [n for n, s in written.items() if s["node"].get("ray_node_id") == SECOND_ID]
        if on_second and killed_after is None:
            # the second node is gone mid-run, as a lost machine is: its raylet alone
            # would not do (an actor outlives its raylet and keeps taking shards)
            for pid in [second.pid, *descendants(second.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed_after = len(sidecars(run))
        time.sleep(0.2)
    out, _ = submit.communicate(timeout=max(1.0, deadline - time.monotonic()))
    seconds = time.monotonic() - started
    assert submit.returncode == 0, out
    assert killed_after is not None and killed_after < SHARDS, (seen, out)  # mid-run
    assert_every_shard_once(run, planned=SHARDS, images=16 * SHARDS)
    nodes = [s["node"]["ray_node_id"] for s in sidecars(run).values()]
    assert set(nodes) == {HEAD_ID, SECOND_ID}
    assert nodes.count(HEAD_ID) >= SHARDS - killed_after  # the rest were made on the head
    print(
        f"two nodes: {nodes.count(SECOND_ID)} shards on the second node, the node killed "
        f"after {killed_after} shards, {SHARDS} shards in {seconds:.1f} s; appeared at {seen}"
    )
