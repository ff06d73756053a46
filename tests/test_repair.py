"""Resume repairs damaged shards, and one driver per run (issue 17 §1 and §3), on a local
folder and on a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.io.lease import Lease, LeaseHeld, LeaseLost
from pipeline.io.storage import filesystem, join

SHARD = "shards/train-{:06d}.{}"


@dataclass
class Where:
    """A run's output on one kind of storage, and plain file operations on it."""

    output: str
    options: dict[str, Any]
    root: Path  # local files of the test (the config)

    @property
    def run_url(self) -> str:
        return join(self.output, "test")

    def _path(self, relative: str) -> tuple[Any, str]:
        return filesystem(join(self.run_url, relative), self.options)

    def cat(self, relative: str) -> bytes:
        fs, path = self._path(relative)
        fs.invalidate_cache()
        return fs.cat_file(path)

    def pipe(self, relative: str, data: bytes) -> None:
        fs, path = self._path(relative)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local only; S3 has no folders
        fs.pipe_file(path, data)

    def rm(self, relative: str) -> None:
        fs, path = self._path(relative)
        fs.rm(path)

    def exists(self, relative: str) -> bool:
        fs, path = self._path(relative)
        fs.invalidate_cache()
        return fs.exists(path)

    def sha256(self, index: int) -> str:
        return hashlib.sha256(self.cat(SHARD.format(index, "tar"))).hexdigest()

    def storage_args(self) -> list[str]:
        return [a for k, v in self.options.items() for a in ("--storage-option", f"{k}={v}")]

    def config(self, checkpoint: str, **sections: dict[str, Any]) -> str:
        data = config_dict(self.output, checkpoint, **sections)
        data["run"]["storage_options"] = self.options
        path = self.root / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "local":
        return Where(str(tmp_path / "out"), {}, tmp_path)
    server = request.getfixturevalue("s3_server")
    return Where(f"s3://{server.make_bucket()}/runs", server.storage_options(), tmp_path)


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- §1: a rerun repairs damaged shards


def test_a_rerun_regenerates_damaged_shards_with_the_same_bytes(
    where: Where, teacher_checkpoint: str, capsys
) -> None:
    config = where.config(teacher_checkpoint, plan={"shard_size": 8})  # 4 shards of 8
    assert cli(["run", config], capsys)[0] == 0
    before = [where.sha256(i) for i in range(4)]

    tar = where.cat(SHARD.format(0, "tar"))
    where.pipe(SHARD.format(0, "tar"), tar[: len(tar) // 2])  # truncated
    flipped = bytearray(where.cat(SHARD.format(1, "tar")))
    flipped[10] ^= 0xFF  # same size: a byte of the first member's name (its header)
    where.pipe(SHARD.format(1, "tar"), bytes(flipped))
    where.rm(SHARD.format(2, "json"))  # a tar without its sidecar
    where.rm(SHARD.format(3, "tar"))  # a sidecar without its tar

    # the same command: the size check regenerates 0, 2 and 3; the same-size corruption
    # is not seen until the manifest step reads it, which names it (no traceback)
    code, _, err = cli(["run", config], capsys)
    assert code == 1, err
    assert "shard train-000001" in err and "damaged" in err and "--verify" in err
    assert "Traceback" not in err and not where.exists("lease.json")
    assert [where.sha256(i) for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]

    code, out, err = cli(["run", config, "--verify"], capsys)  # hashes: regenerates 1
    assert code == 0, err
    assert "1 shards written, 3 already complete" in out
    assert [where.sha256(i) for i in range(4)] == before
    manifest = json.loads(where.cat("manifest.json"))
    assert [s["sha256"] for s in manifest["shards"]] == before
    assert not where.exists("lease.json")


def test_inspect_verify_repair_regenerates_without_the_config(
    where: Where, teacher_checkpoint: str, capsys
) -> None:
    config = where.config(teacher_checkpoint)  # 2 shards of 16
    assert cli(["run", config], capsys)[0] == 0
    before = where.sha256(1)
    data = bytearray(where.cat(SHARD.format(1, "tar")))
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    where.pipe(SHARD.format(1, "tar"), bytes(data))
    os.remove(config)  # no config from here on

    code, out, _ = cli(["inspect", where.run_url, "--verify", *where.storage_args()], capsys)
    assert code == 1 and json.loads(out)["corrupt"] == ["train-000001"]
    args = ["inspect", where.run_url, "--verify", "--repair", *where.storage_args()]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["repaired"] == ["train-000001"] and report["corrupt"] == []
    assert report["complete"] and report["finalised"]
    assert where.sha256(1) == before
    code, out, _ = cli(["inspect", where.run_url, "--verify", *where.storage_args()], capsys)
    assert code == 0 and json.loads(out)["corrupt"] == []


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 700])


def image_folder(root: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / f"{i}.png")
    return root


def test_translation_and_retrieval_reruns_regenerate_a_truncated_shard(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    from pipeline.config import parse_config
    from pipeline.stages.retrieval import run_retrieval
    from pipeline.stages.translation import run_translation

    source = image_folder(tmp_path / "source", 4, 0)
    labeled = tmp_path / "labeled"
    for k in range(10):
        image_folder(labeled / f"c{k}", 1, k + 1)
    base = config_dict(str(tmp_path / "out"), teacher_checkpoint)
    base["synthesizer"] = {"name": "impression", "iterations": 2}
    base["plan"] = {"batch_size": 2, "shard_size": 2}
    stages = {
        "translation": ({"source": str(source), "target": str(source)}, run_translation),
        "retrieval": (
            {"pool": str(source), "labeled": str(labeled), "num_select": 3},
            run_retrieval,
        ),
    }
    for stage, (section, run) in stages.items():
        config = parse_config({**base, "run": {**base["run"], "name": stage}, stage: section})
        run(config)
        shards = tmp_path / "out" / stage / "shards"
        tars = sorted(shards.glob("*.tar"))
        assert len(tars) == 2, stage
        before = [t.read_bytes() for t in tars]
        truncate(tars[1])
        run(config)
        assert [t.read_bytes() for t in tars] == before, stage  # the same bytes again
        assert not (tmp_path / "out" / stage / "lease.json").exists()


# --- §2: one driver per run


def holder(host: str, pid: int, heartbeat: dt.datetime) -> bytes:
    return json.dumps(
        {
            "kind": "dreamshard-lease",
            "host": host,
            "pid": pid,
            "started": "2026-01-02T03:04:05+00:00",
            "heartbeat": heartbeat.isoformat(),
            "token": "another-driver",
            "heartbeat_s": 10,
            "timeout_s": 60,
        }
    ).encode()


def test_a_second_driver_on_the_same_run_is_refused_naming_the_holder(
    where: Where, teacher_checkpoint: str, capsys, monkeypatch
) -> None:
    from pipeline.graph import run_job
    from pipeline.stages.synthesis import ShardWorker

    config_path = where.config(teacher_checkpoint)
    gate, started = threading.Event(), threading.Event()
    original = ShardWorker.run

    def held_run(self, task):  # the first driver waits inside its first shard
        started.set()
        assert gate.wait(60)
        return original(self, task)

    monkeypatch.setattr(ShardWorker, "run", held_run)
    from pipeline.config import load_config

    result: dict[str, Any] = {}
    first = threading.Thread(target=lambda: result.update(run_job(load_config(config_path))))
    first.start()
    try:
        assert started.wait(60)
        lease = json.loads(where.cat("lease.json"))
        listed = sorted(p.rsplit("/", 1)[-1] for p in where_files(where))
        code, _, err = cli(["run", config_path], capsys)
        assert code == 2, err
        assert err.startswith("dreamshard: error: ") and "another driver holds this run" in err
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in err
        assert f"started {lease['started']}" in err
        assert sorted(p.rsplit("/", 1)[-1] for p in where_files(where)) == listed
        assert json.loads(where.cat("lease.json"))["token"] == lease["token"]  # untouched
    finally:
        gate.set()
        first.join(120)
    assert result["totals"]["images"] == 32
    assert not where.exists("lease.json")  # released at the end


def where_files(where: Where) -> list[str]:
    fs, path = filesystem(where.run_url, where.options)
    fs.invalidate_cache()
    return fs.find(path)


def test_a_stale_lease_is_taken_over_with_a_warning(
    where: Where, teacher_checkpoint: str, capsys, caplog
) -> None:
    stale = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    where.pipe("lease.json", holder("crashed-host", 4242, stale))
    with caplog.at_level(logging.WARNING, logger="dreamshard.lease"):
        code, out, err = cli(["run", where.config(teacher_checkpoint)], capsys)
    assert code == 0, err
    assert "wrote 32 images" in out
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "taking over the lease" in warning and "host crashed-host, pid 4242" in warning
    assert not where.exists("lease.json")


def test_a_lease_of_a_dead_process_or_one_this_process_left_is_stale(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    run_url = str(tmp_path / "run")
    os.makedirs(run_url)
    fresh = dt.datetime.now(dt.timezone.utc)
    Path(run_url, "lease.json").write_bytes(holder(socket.gethostname(), pid, fresh))
    with Lease(run_url, heartbeat_s=5, timeout_s=60):
        assert json.loads(Path(run_url, "lease.json").read_text())["pid"] == os.getpid()
    assert not Path(run_url, "lease.json").exists()
    # an earlier driver of this process whose release failed (its store was down)
    Path(run_url, "lease.json").write_bytes(holder(socket.gethostname(), os.getpid(), fresh))
    with Lease(run_url, heartbeat_s=5, timeout_s=60):
        assert json.loads(Path(run_url, "lease.json").read_text())["token"] != "another-driver"
    Path(run_url, "lease.json").write_bytes(holder("elsewhere", pid, fresh))
    with pytest.raises(LeaseHeld, match="host elsewhere"):  # another host: only its age says
        Lease(run_url).acquire()


def test_the_heartbeat_rewrites_the_lease_and_notices_a_takeover(tmp_path: Path) -> None:
    run_url = str(tmp_path / "run")
    lease = Lease(run_url, heartbeat_s=0.1, timeout_s=1.0)
    path = Path(run_url, "lease.json")
    with lease:
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.35)
        assert json.loads(path.read_text())["heartbeat"] > first
        path.write_bytes(holder("other", 1, dt.datetime.now(dt.timezone.utc)))
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="another driver took over"):
            lease.check()
    assert json.loads(path.read_text())["host"] == "other"  # the new holder's, kept


def test_damaged_shards_reads_sizes_from_one_listing_and_names_bad_sidecars(
    tmp_path: Path,
) -> None:
    from pipeline.io.integrity import damaged_shards, intact_shards

    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    tar = b"x" * 2048
    digest = hashlib.sha256(tar).hexdigest()
    for name, sidecar in {
        "good": {"shard": "good", "samples": 1, "sha256": digest, "bytes": 2048},
        "short": {"shard": "short", "samples": 1, "sha256": digest, "bytes": 4096},
        "old": {"shard": "old", "samples": 1, "sha256": digest},  # no bytes: not size-checked
        "flipped": {"shard": "flipped", "samples": 1, "sha256": "0" * 64, "bytes": 2048},
        "listed": [1, 2],
        "garbage": "{oops",
    }.items():
        (shards / f"{name}.tar").write_bytes(tar)
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (shards / f"{name}.json").write_text(text)
    run_url = str(tmp_path / "run")
    assert set(damaged_shards(run_url)) == {"short", "listed", "garbage"}
    damaged = damaged_shards(run_url, verify=True)
    assert set(damaged) == {"short", "listed", "garbage", "flipped"}
    assert "4096" in damaged["short"] and "sha256" in damaged["flipped"]
    assert intact_shards(run_url, verify=True) == {"good", "old"}
    assert sorted(p.name for p in shards.iterdir()) == [
        "good.json",
        "good.tar",
        "old.json",
        "old.tar",
    ]
