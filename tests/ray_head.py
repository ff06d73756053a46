"""A real Ray head for Jobs API tests: ``ray start --head --block`` as a child process.

Every port is a free one on 127.0.0.1 (two local Ray nodes otherwise clash, e.g. on the
dashboard agent's 52365), its session files live in a private temporary folder, and the
head is stopped by terminating the process this fixture started (never ``ray stop``,
which would end every Ray on the machine). The head's environment is the cluster's
own: ``env`` passes storage credentials to it the way a Kubernetes Secret would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seaweed import PORT_RANGE, free_ports

REPO = Path(__file__).resolve().parents[1]
START_SECONDS = 90.0
STOP_SECONDS = 20.0
PORTS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
)


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]

    @property
    def address(self) -> str:
        """The Jobs API (dashboard) URL."""
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics-export-port']}/metrics"

    def log_files(self) -> Iterator[Path]:
        """Every file the head's session wrote (logs, uploaded packages, job records)."""
        for path in sorted(self.temp_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield path

    def log_tail(self, lines: int = 30) -> str:
        out = self.temp_dir / "head.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:])


def head_command(
    temp_dir: Path, ports: dict[str, int], workers: tuple[int, int], *options: str
) -> list[str]:
    """``ray start --head``; ``options`` (e.g. ``--num-cpus=1``) come last and win."""
    return [
        *node_command(temp_dir, ports, workers),
        "--head",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        *options,
    ]


def node_command(temp_dir: Path, ports: dict[str, int], workers: tuple[int, int]) -> list[str]:
    """What every node of these tests starts with: loopback, free ports, own temp dir."""
    return [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        f"--min-worker-port={workers[0]}",
        f"--max-worker-port={workers[1]}",
        "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]


def head_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without AWS_*/RAY_* (the head gets only what ``extra`` gives)."""
    own = ("AWS_", "RAY_", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),  # the job imports this checkout, as it would on a cluster image
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_metrics_report_interval_ms="1000",
    )
    env.update(extra)
    return env


def wait_ready(head: RayHead, deadline: float) -> None:
    """Until the job agent accepts a job (it answers a few seconds after the dashboard)."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.cluster.submit import auth_headers

    last = "no answer"
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited {head.process.returncode}:\n{head.log_tail()}")
        try:
            headers = auth_headers()  # a head with token authentication
            version = urllib.request.Request(f"{head.address}/api/version", headers=headers)
            with urllib.request.urlopen(version, timeout=2):
                pass
            client = JobSubmissionClient(head.address, headers=headers or None)
            job = client.submit_job(entrypoint="echo ready")
            while str(client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                time.sleep(0.5)
            return
        except Exception as error:  # not up yet
            last = f"{type(error).__name__}: {error}"
        time.sleep(1.0)
    raise RuntimeError(f"the Ray head did not accept jobs in {START_SECONDS:.0f} s ({last})")


def parent(pid: int) -> int:
    """The parent process id of ``pid`` (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descendants(root: int) -> list[int]:
    """Every living process below ``root`` (a node's raylet, workers and actors are
    below the process that started the node)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(parent(int(entry)), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def own_processes(temp_dir: Path) -> list[int]:
    """Processes of this head (their command lines name its private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def stop_head(head: RayHead) -> None:
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(STOP_SECONDS)
    deadline = time.monotonic() + STOP_SECONDS
    while own_processes(head.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in own_processes(head.temp_dir):  # stragglers of this head only, by id
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_node(
    command: list[str], temp_dir: Path, env: dict[str, str], log: str = "head.out"
) -> subprocess.Popen:
    """A ``ray start --block`` child in its own session, its output in ``temp_dir/log``."""
    with open(temp_dir / log, "wb") as out:
        return subprocess.Popen(
            command,
            env=head_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=temp_dir,
            start_new_session=True,
        )


def node_ports(names: tuple[str, ...]) -> tuple[dict[str, int], tuple[int, int]]:
    """Free loopback ports for ``names`` and a free range for the node's workers."""
    rng = random.Random()
    ports = dict(zip(names, free_ports(len(names), rng), strict=True))
    first = rng.randrange(PORT_RANGE[1] + 300, 32768 - 300)  # below the ephemeral range
    return ports, (first, first + 200)


@contextlib.contextmanager
def ray_head(
    env: dict[str, str],
    options: tuple[str, ...] = (),
    temp_dir: Path | None = None,
    ports: tuple[dict[str, int], tuple[int, int]] | None = None,
) -> Iterator[RayHead]:
    """Start a head with ``env`` added to its environment and ``options`` added to its
    ``ray start`` (in ``temp_dir``, on ``ports`` from :func:`node_ports` when given);
    always stop it (and every process under its temp dir)."""
    # short: Ray's socket paths must be short
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="rh-"))
    ports, workers = ports or node_ports(PORTS)
    process = start_node(head_command(temp_dir, ports, workers, *options), temp_dir, env)
    head = RayHead(process, temp_dir, ports)
    try:
        wait_ready(head, time.monotonic() + START_SECONDS)
        yield head
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ``ray start --address`` refuses to join a cluster while Ray keeps to loopback
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and with the switch off it dials the machine's
# address. A second node is therefore started as ``ray start`` itself (and Ray's own
# ``cluster_utils.Cluster.add_node``) starts one: a ``Node(head=False)``, here in a child
# process that ends it on SIGTERM.
WORKER_NODE = """
import json, signal, sys
import ray._private.node
from ray._private.parameter import RayParams
params = RayParams(**json.loads(sys.argv[1]))
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node", node.node_id, "started", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
"""
WORKER_PORTS = {
    "node_manager_port": "node-manager-port",
    "object_manager_port": "object-manager-port",
    "metrics_export_port": "metrics-export-port",
    "dashboard_agent_listen_port": "dashboard-agent-listen-port",
    "metrics_agent_port": "dashboard-agent-grpc-port",
    "runtime_env_agent_port": "runtime-env-agent-port",
}


@contextlib.contextmanager
def ray_worker_node(
    head: RayHead, env: dict[str, str], **resources: float
) -> Iterator[subprocess.Popen]:
    """A second node of ``head``'s cluster on this machine (its own temp dir and free
    loopback ports), with ``resources`` (``num_cpus``, ``num_gpus``); always stopped."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rn-"))
    ports, workers = node_ports(tuple(WORKER_PORTS))
    params = {
        "gcs_address": f"127.0.0.1:{head.ports['port']}",
        "node_ip_address": "127.0.0.1",
        "temp_dir": str(temp_dir),
        "min_worker_port": workers[0],
        "max_worker_port": workers[1],
        "object_store_memory": 200_000_000,
        **ports,
        **resources,
    }
    command = [sys.executable, "-c", WORKER_NODE, json.dumps(params)]
    process = start_node(command, temp_dir, env, "node.out")
    node = RayHead(process, temp_dir, {})
    try:
        yield process
    finally:
        stop_head(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
