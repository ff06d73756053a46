"""Storage that fails fast and fairly (issue 17 §2), each fault real and on loopback:
retry waits with full jitter and a bounded total; an S3 endpoint that accepts connections
and never answers; 503 SlowDown and 429 in front of a real S3 server (SeaweedFS); a run
folder that stops accepting writes mid-run (permission denied)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from faulty_http import FaultyProxy, Rule, SilentServer
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.graph import run_job
from pipeline.io.retries import (
    MAX_WAIT_S,
    StorageUnavailable,
    retry_budget_s,
    retry_wait,
    with_retries,
)
from pipeline.io.shards import Sample, ShardStore, Sidecar, completed_shards

REFUSED = ConnectionRefusedError(111, "refused")


def refused() -> None:
    raise REFUSED


# --- full jitter (no real sleeping)


def test_retry_waits_are_uniform_up_to_the_doubling_bound_and_capped() -> None:
    rng = random.Random(0)
    bound = 0.5 * 2**3  # the fourth wait, backoff 0.5 s
    waits = [retry_wait(3, 0.5, rng.random) for _ in range(20_000)]
    assert min(waits) >= 0 and max(waits) < bound
    counts = np.histogram(waits, bins=10, range=(0, bound))[0] / len(waits)
    assert np.all(np.abs(counts - 0.1) < 0.01), counts  # flat: uniform, not lockstep
    assert abs(np.mean(waits) - bound / 2) < 0.05
    assert retry_wait(30, 1.0, lambda: 0.999999) < MAX_WAIT_S  # 2**30 s capped


def test_many_actors_do_not_retry_in_lockstep_and_the_total_wait_is_bounded() -> None:
    schedules = []
    for actor in range(50):  # each actor process has its own random source
        waits: list[float] = []
        with pytest.raises(StorageUnavailable, match="after 6 tries"):
            with_retries(
                refused, "s3://b/k", 5, 1.0, "http://e", waits.append, random.Random(actor).random
            )
        assert len(waits) == 5
        assert all(0 <= w < 2**a for a, w in enumerate(waits))
        assert sum(waits) <= retry_budget_s(5, 1.0) == 31.0
        schedules.append(waits)
    first = [s[0] for s in schedules]
    assert len(set(first)) == len(first)  # no two actors retry at the same instant
    spread = np.histogram(first, bins=5, range=(0, 1.0))[0]
    assert spread.min() >= 4, spread  # spread over the whole second, not bunched
    # the worst case (every draw at its bound) is the budget; the cap bounds long budgets
    worst: list[float] = []
    with pytest.raises(StorageUnavailable):
        with_retries(refused, "s3://b/k", 12, 1.0, "http://e", worst.append, lambda: 1.0)
    assert worst[-1] == MAX_WAIT_S and sum(worst) == retry_budget_s(12, 1.0) == 63 + 6 * 60


# --- an S3 endpoint that accepts connections and never answers


def tiny_samples() -> list[Sample]:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    return [Sample("000000-00000", image, 1, {"confidence": 0.9, "seed": 7})]


def test_a_silent_endpoint_fails_a_write_within_the_documented_budget() -> None:
    silent = SilentServer()
    timeouts = {"connect_timeout": 1, "read_timeout": 1}
    options = {"endpoint_url": silent.url, "key": "k", "secret": "s", "config_kwargs": timeouts}
    store = ShardStore("s3://bucket/runs/test", options, retries=2, backoff_s=0.2)
    # the documented budget: every try waits at most connect + read timeout, plus the waits
    budget = 3 * (1 + 1) + retry_budget_s(2, 0.2)  # 6.6 s
    start = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable) as raised:
            store.write("train-000000", tiny_samples(), "seed")
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    message = str(raised.value)
    assert "s3://bucket/runs/test/shards/train-000000.tar" in message
    assert "did not answer after 3 tries" in message and "Read timeout" in message
    assert 3 * 1 <= elapsed < 3 * budget, elapsed  # three read timeouts, nothing stacked
    assert len(silent.connections) == 3  # one request per try: no botocore or s3fs repeats


def test_a_shard_written_after_its_folder_was_listed_reads_back(s3_server) -> None:
    """Shard writes go through a filesystem of their own (one s3fs attempt); the listing
    this process cached through the shared one must not hide what they wrote."""
    run_url = f"s3://{s3_server.make_bucket()}/runs/test"
    options = s3_server.storage_options()
    store = ShardStore(run_url, options)
    store.write("train-000000", tiny_samples(), "seed")
    assert completed_shards(run_url, options) == {"train-000000"}  # the folder is listed
    store.write("train-000001", tiny_samples(), "seed")
    assert Sidecar.read(run_url, "train-000001", options).samples == 1


# --- 503 SlowDown and 429 from the store, in front of the real server


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests")])
def test_throttled_writes_are_retried_and_counted_in_the_sidecar(
    s3_server, make_config, status, code
) -> None:
    bucket, fs = s3_server.make_bucket(), s3_server.filesystem()
    rules = [
        Rule(status, code, "PUT", "/shards/train-000000.tar", 2),
        Rule(status, code, "PUT", "/shards/train-000000.json", 1),
    ]
    proxy = FaultyProxy(s3_server.endpoint_url, rules)
    options = {**s3_server.storage_options(), "endpoint_url": proxy.url}
    config = make_config(
        run={"output": f"s3://{bucket}/runs", "storage_options": options},
        runtime={"io_retries": 3, "io_backoff_s": 0.05},
    )
    try:
        manifest = run_job(config)
    finally:
        proxy.close()
    assert [len(rule.answered) for rule in rules] == [2, 1]  # every fault was met
    assert proxy.forwarded > 0
    run = f"{bucket}/runs/test/shards"
    sidecars = {n: json.loads(fs.cat(f"{run}/{n}.json")) for n in ("train-000000", "train-000001")}
    # two tar retries and the sidecar's own retry, recorded by the attempt that landed
    assert sidecars["train-000000"]["write_retries"] == 3
    assert sidecars["train-000001"]["write_retries"] == 0
    for name, sidecar in sidecars.items():
        assert sidecar["sha256"] == hashlib.sha256(fs.cat(f"{run}/{name}.tar")).hexdigest()
    assert manifest["totals"]["images"] == 32


# --- the run folder stops accepting writes mid-run (permission denied)


def deny_writes(folder: Path) -> None:
    """Make ``folder`` refuse new files for real. Root ignores modes, so as root the folder
    is made immutable (``chattr +i``); skipped only if that is impossible here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to deny root a write here")
    else:
        result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"running as root and chattr +i failed here: {result.stderr.strip()}")
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()
    allow_writes(folder)
    pytest.skip(f"{folder} still accepts writes: this filesystem cannot deny them")


def allow_writes(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    else:
        folder.chmod(0o755)


def test_a_folder_made_read_only_mid_run_stops_it_at_once_and_a_rerun_completes(
    teacher_checkpoint, tmp_path, monkeypatch, capsys, caplog
) -> None:
    data = config_dict(str(tmp_path / "out"), teacher_checkpoint)
    data["plan"]["num_images"] = 48  # 3 shards of 16
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    shards = tmp_path / "out" / "test" / "shards"
    real_write, calls = ShardStore.write, []

    def write(store, name, *args, **kwargs):
        calls.append(name)
        if name == "train-000001" and len(calls) == 2:
            deny_writes(shards)  # mid-run: after shard 0 is complete
        return real_write(store, name, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "write", write)
    caplog.set_level(logging.WARNING, logger="dreamshard.storage")
    try:
        assert main(["run", str(config_path)]) == 1
        err = capsys.readouterr().err
        assert "shard train-000001" in err and "permission denied" in err, err
        assert calls == ["train-000000", "train-000001"]  # no retry, shard 2 never begun
        assert not [r for r in caplog.records if "retry" in r.getMessage()]
        names = sorted(p.name for p in shards.iterdir())
        assert names == ["train-000000.json", "train-000000.tar"]  # no partial, no orphan
        before = (shards / "train-000000.tar").read_bytes()
    finally:
        allow_writes(shards)

    assert main(["run", str(config_path)]) == 0
    names = sorted(p.name for p in shards.iterdir())
    assert names == sorted(f"train-00000{i}{ext}" for i in range(3) for ext in (".json", ".tar"))
    assert (shards / "train-000000.tar").read_bytes() == before  # resumed, not rewritten
    manifest = json.loads((tmp_path / "out" / "test" / "manifest.json").read_text())
    assert manifest["totals"]["images"] == 48
