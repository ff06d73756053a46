"""Faults a nightly run must survive, each a real one on loopback (issue 10).

1. an inversion actor SIGKILLed in the middle of a shard; 2. the S3 server (SeaweedFS)
stopped mid-run and restarted, or down past the retry budget; 3. the driver SIGKILLed
mid-run; 4. a shard corrupted after it was written; 5. a batch whose loss or images
become NaN/inf. The sixth, a Ray Train worker killed during KD, is
``tests/test_evaluation_training.py::test_a_killed_worker_resumes_from_the_last_checkpoint``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from PIL import Image
from ray_head import descendants
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.config import parse_config
from pipeline.execution.executor import RunFailed
from pipeline.graph import run_job
from pipeline.stages.plan import make_plan
from synthesizers import SYNTHESIZERS, SynthesisResult, SynthesisSpec
from synthesizers.deepinversion import DeepInversion

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# --- what every fault must leave: complete, verified, no duplicates, no partial files


def tar_samples(data: bytes) -> dict[str, set[str]]:
    """``key -> extensions`` of a tar, read with ``tarfile`` (no dreamshard code)."""
    samples: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            assert member.isfile(), member.name
            key, _, extension = member.name.partition(".")
            assert extension not in samples.setdefault(key, set()), f"{member.name} twice"
            samples[key].add(extension)
    return samples


def check_complete_run(files: dict[str, bytes], manifest: dict, plan_names: list[str]) -> int:
    """``files``: every object of the run's shards folder (name -> bytes). Exactly one tar
    and one sidecar per planned shard, no partial file, each tar's sha256 and sample count
    those of its sidecar, no key in two places, totals equal to what the tars hold.
    Returns the number of samples read back."""
    assert sorted(files) == sorted(f"{n}{ext}" for n in plan_names for ext in (".tar", ".json"))
    keys: set[str] = set()
    for name in plan_names:
        data, sidecar = files[f"{name}.tar"], json.loads(files[f"{name}.json"])
        assert sidecar["sha256"] == hashlib.sha256(data).hexdigest(), name
        samples = tar_samples(data)
        assert all({"png", "cls", "json"} <= parts for parts in samples.values()), name
        assert len(samples) == sidecar["samples"] == len(sidecar["index"]), name
        assert not keys & set(samples), f"{name} repeats keys"
        keys |= set(samples)
    assert [s["name"] for s in manifest["shards"]] == plan_names
    assert manifest["totals"]["images"] == len(keys)
    return len(keys)


def local_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "shards").iterdir()}


def digests(run: Path) -> dict[str, str]:
    """sha256 of every complete shard (tar with its sidecar) of a local run."""
    shards = run / "shards"
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(shards.glob("*.tar"))
        if p.with_suffix(".json").exists()
    }


# --- 5. a batch whose loss or images become NaN/inf


class Poisoned(DeepInversion):
    """DeepInversion whose batches go non-finite for chosen seeds: ``loss`` feeds the
    teacher NaN inputs (NaN loss, then NaN pixels), ``images`` returns NaN images with
    finite losses (a fault the loss check alone would miss)."""

    name = "poisoned"
    seeds: ClassVar[dict[int, str]] = {}  # seed -> "loss" | "images"
    mode = ""

    def prepare(self, spec: SynthesisSpec) -> None:
        super().prepare(spec)
        self.mode = self.seeds.get(spec.seed, "")

    def teacher_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.mode == "loss":
            inputs = inputs * float("nan")
        return super().teacher_forward(inputs)

    def synthesize(self, spec: SynthesisSpec) -> SynthesisResult:
        result = super().synthesize(spec)
        if self.mode == "images":
            result.images[0, 0, 0, 0] = float("inf")
        return result


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> type[Poisoned]:
    monkeypatch.setitem(SYNTHESIZERS, "poisoned", Poisoned)
    monkeypatch.setattr(Poisoned, "seeds", {})
    return Poisoned


def test_a_nonfinite_batch_is_retried_with_a_new_seed_recorded_and_never_written(
    poisoned, make_config, tmp_path: Path
) -> None:
    config = make_config(
        synthesizer={"name": "poisoned", "iterations": 3},
        plan={"num_images": 32, "shard_size": 16, "batch_size": 8},
        filter={"enabled": False, "max_attempts": 3},
    )
    first, second = make_plan(config)
    # shard 0: batch 0's loss and batch 1's images are non-finite on the first attempt only;
    # shard 1: batch 1 is non-finite on every attempt
    hopeless = [second.batch_seed(1, attempt) for attempt in range(3)]
    poisoned.seeds.update(
        {first.batch_seed(0, 0): "loss", first.batch_seed(1, 0): "images"}
        | dict.fromkeys(hopeless, "loss")
    )
    manifest = run_job(config)

    run = tmp_path / "out" / "test"
    files = local_files(run)
    written = check_complete_run(files, manifest, [first.name, second.name])
    assert written == 16 + 8
    one, two = (json.loads(files[f"{t.name}.json"]) for t in (first, second))
    assert one["nonfinite_seeds"] == [first.batch_seed(0, 0), first.batch_seed(1, 0)]
    assert (one["samples"], one["attempts"]) == (16, 4)  # each batch: 1 bad + 1 good
    assert two["nonfinite_seeds"] == hopeless  # bounded by filter.max_attempts
    assert (two["samples"], two["rejected"], two["attempts"]) == (8, 8, 1 + 3)
    missing = {str(label) for label in second.labels[8:]}  # batch 1's classes
    assert {k for k, v in two["per_class"].items() if v["missing"]} == missing
    assert set(manifest["totals"]["failing_classes"]) == missing
    # no sample came from a poisoned batch, and every stored image is a real picture
    bad = set(poisoned.seeds)
    for name in (first.name, second.name):
        with tarfile.open(run / "shards" / f"{name}.tar") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    assert json.loads(data)["seed"] not in bad, member.name
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(data))
                    assert (image.mode, image.size) == ("RGB", (32, 32))


def test_the_poison_really_makes_the_batch_nonfinite(poisoned, make_config) -> None:
    from pipeline.models.teachers import load_teacher
    from pipeline.stages.synthesis import finite

    config = make_config(synthesizer={"name": "poisoned", "iterations": 2})
    teacher = load_teacher(config.teacher).model
    synthesizer = poisoned(teacher, config.synthesizer.params)
    poisoned.seeds.update({1: "loss", 2: "images"})
    spec = SynthesisSpec(torch.arange(4), (3, 32, 32), 0, config.teacher.mean, config.teacher.std)
    clean = synthesizer.synthesize(spec)
    assert finite(clean)
    loss = synthesizer.synthesize(dataclasses.replace(spec, seed=1))
    assert not math.isfinite(loss.losses["total"]) and not finite(loss)
    images = synthesizer.synthesize(dataclasses.replace(spec, seed=2))
    assert all(math.isfinite(v) for v in images.losses.values())
    assert not finite(images)


# --- 4. a shard corrupted after it was written


def test_a_corrupted_shard_is_named_by_inspect_and_by_the_loader(
    make_config, s3_server, capsys
) -> None:
    from evaluation.loader import ShardDataset, ShardError, load_all, resolve_shards

    bucket, fs = s3_server.make_bucket(), s3_server.filesystem()
    options = s3_server.storage_options()
    config = make_config(run={"output": f"s3://{bucket}/runs", "storage_options": options})
    manifest = run_job(config)
    run_url = manifest["run_url"]
    victim = f"{run_url.removeprefix('s3://')}/shards/train-000001.tar"
    data = bytearray(fs.cat(victim))
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    fs.pipe(victim, bytes(data))  # the object is replaced: same name, flipped bytes

    storage = [arg for k, v in options.items() for arg in ("--storage-option", f"{k}={v}")]
    assert main(["inspect", run_url, *storage]) == 0  # complete: only --verify reads the bytes
    capsys.readouterr()
    assert main(["inspect", run_url, "--verify", *storage]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["corrupt"] == ["train-000001"] and report["complete"]
    assert s3_server.secret not in out + err

    shards = resolve_shards(run_url, options)
    dataset = ShardDataset(shards.shards, (0.5,) * 3, (0.5,) * 3, storage_options=options)
    seen = 0
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256 .* does not match"):
        for _ in dataset:
            seen += 1
    assert seen == 16  # the intact first shard was read, the corrupt one refused whole
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        load_all(shards, options=options)


# --- processes of this test (never anyone else's on the machine)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def busy_actors() -> list[int]:
    """This test's shard actors while they run a shard (Ray titles them ``ShardWorker.run``)."""
    return [p for p in descendants(os.getpid()) if b"ShardWorker.run" in command_line(p)]


# --- 1. an inversion actor SIGKILLed in the middle of a shard


def test_an_actor_killed_mid_shard_is_replaced_and_its_shard_regenerated(
    ray_cluster, make_config, tmp_path: Path, caplog
) -> None:
    config = make_config(
        synthesizer={"iterations": 30},
        plan={"num_images": 48, "shard_size": 8, "batch_size": 8},
        runtime={"executor": "ray", "num_workers": 2, "max_retries": 1},
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = run_job(config)
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    caplog.set_level(logging.WARNING, logger="dreamshard.executor")
    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while thread.is_alive() and killed is None and time.monotonic() < deadline:
        busy = busy_actors()
        if busy:
            time.sleep(0.3)  # well inside the shard (about 1 s of synthesis per batch)
            if busy[0] in busy_actors():
                killed = busy[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(240)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "no actor was seen running a shard"
    messages = [r.getMessage() for r in caplog.records]
    died = [m for m in messages if m.startswith("actor for")]
    assert len(died) == 1, messages  # the killed actor's shard went to a new actor
    shard = died[0].split()[2]
    assert any(f"shard {shard} failed" in m and f"pid: {killed}" in m for m in messages)
    plan = [t.name for t in make_plan(config)]
    assert shard in plan
    run_dir = tmp_path / "out" / "test"
    files = local_files(run_dir)  # also: no *.partial-* left by the killed writer
    assert check_complete_run(files, outcome["manifest"], plan) == 48
    assert json.loads(files[f"{shard}.json"])["samples"] == 8  # regenerated in full


# --- 3. the driver SIGKILLed mid-run


def ray_leftovers(snapshot: list[int], temp_dir: str) -> list[int]:
    """What outlives a killed driver: its former children still alive, and every process
    of its embedded Ray (their command lines name its private temp dir) with children."""
    alive = [p for p in snapshot if Path(f"/proc/{p}").exists()]
    roots = [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and temp_dir.encode() in command_line(int(e))
    ]
    found = set(alive) | set(roots)
    for root in roots:
        found |= set(descendants(root))
    return sorted(found)


def stop_processes(pids: list[int], seconds: float = 15.0) -> None:
    """SIGKILL these processes (ours, by id) and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(
        Path(f"/proc/{p}").exists() and command_line(p) != b"" for p in pids
    ):
        time.sleep(0.2)


def test_a_killed_driver_resumes_with_completed_shards_untouched(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    data = config_dict(
        str(tmp_path / "out"),
        teacher_checkpoint,
        synthesizer={"iterations": 10},
        plan={"num_images": 96, "shard_size": 8, "batch_size": 8},
        runtime={"executor": "ray", "num_workers": 2},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    temp_dir = tempfile.mkdtemp(prefix="rd-")  # the embedded Ray's session files: short path
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=temp_dir)
    shards = tmp_path / "out" / "test" / "shards"
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    leftovers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(list(shards.glob("*.json"))) < 2 and time.monotonic() < deadline:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        snapshot = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        # Measured: the GCS, the raylet and the actors exit by themselves within about 2 s;
        # the embedded Ray's dashboard and runtime-env agents stay (30 s and more).
        time.sleep(3)
        leftovers = ray_leftovers(snapshot, temp_dir)
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_processes(leftovers or ray_leftovers([], temp_dir))
    assert not ray_leftovers([], temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    before = digests(tmp_path / "out" / "test")
    times = {n: (shards / n).stat().st_mtime_ns for n in before}
    assert 2 <= len(before) < 12, "the driver was not killed mid-run"

    # as a writer killed mid-tar leaves it (whether this kill did depends on timing)
    (shards / "train-000011.tar.partial-0123abcd").write_bytes(b"half a tar")
    rerun = run_job(parse_config({**data, "runtime": {"executor": "inline", "progress": False}}))
    assert rerun["this_run"]["shards_resumed"] == len(before)
    after = digests(tmp_path / "out" / "test")
    assert {n: after[n] for n in before} == before  # byte-identical
    assert {n: (shards / n).stat().st_mtime_ns for n in before} == times  # not rewritten
    plan = [t.name for t in make_plan(parse_config(data))]
    assert check_complete_run(local_files(tmp_path / "out" / "test"), rerun, plan) == 96


# --- 2. the S3 server stopped mid-run


def s3_files(fs: Any, run_url: str) -> dict[str, bytes]:
    folder = f"{run_url.removeprefix('s3://')}/shards"
    return {p.rsplit("/", 1)[-1]: fs.cat(p) for p in fs.ls(folder, detail=False, refresh=True)}


def s3_sidecars(fs: Any, run_url: str) -> int:
    folder = f"{run_url.removeprefix('s3://')}/shards"
    with contextlib.suppress(FileNotFoundError):
        return sum(p.endswith(".json") for p in fs.ls(folder, detail=False, refresh=True))
    return 0


def start_run(config: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """``run_job(config)`` in a thread; the outcome dict gets ``manifest`` or ``error``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = run_job(config)
        except BaseException as error:  # reported by the test's assertions
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_sidecars(fs: Any, run_url: str, count: int, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 120
    while s3_sidecars(fs, run_url) < count and time.monotonic() < deadline:
        assert thread.is_alive(), "the run ended before the fault"
        time.sleep(0.1)


def test_writes_retry_with_backoff_through_a_10_second_s3_outage(
    restartable_s3, make_config, caplog
) -> None:
    server = restartable_s3.server
    bucket, fs = server.make_bucket(), server.filesystem()
    config = make_config(
        run={"output": f"s3://{bucket}/runs", "storage_options": server.storage_options()},
        plan={"num_images": 96, "shard_size": 4, "batch_size": 4},
        # Full jitter draws each wait from 0 to its bound: the defaults (5 retries, 1 s)
        # wait 15.5 s on average and at most 31 s, and give up within 12 s in 28% of draws
        # (Monte Carlo). 8 retries (bounds 1, 2, … 32, 60, 60 s) wait 91.5 s on average and
        # under 12 s in 0.004% of draws.
        runtime={"io_retries": 8, "io_backoff_s": 1.0},
    )
    run_url = f"s3://{bucket}/runs/test"
    caplog.set_level(logging.WARNING, logger="dreamshard.storage")
    thread, outcome = start_run(config)
    wait_for_sidecars(fs, run_url, 2, thread)
    restartable_s3.stop()
    down = time.monotonic()
    time.sleep(10)
    assert restartable_s3.start() is None
    outage = time.monotonic() - down
    thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    retries = [r.getMessage() for r in caplog.records if r.name == "dreamshard.storage"]
    assert retries, "no write met the outage"
    assert all(server.endpoint_url in m and server.secret not in m for m in retries)
    assert len(retries) <= 8 and "retry 1 of 8 in " in retries[0]
    assert "(jittered, at most 1.0 s)" in retries[0]
    assert outage >= 10
    plan = [t.name for t in make_plan(config)]
    assert check_complete_run(s3_files(fs, run_url), outcome["manifest"], plan) == 96


def test_s3_down_past_the_retry_budget_fails_clearly_and_a_rerun_resumes(
    ray_cluster, restartable_s3, make_config
) -> None:
    server = restartable_s3.server
    bucket, fs = server.make_bucket(), server.filesystem()
    sections = {
        "run": {"output": f"s3://{bucket}/runs", "storage_options": server.storage_options()},
        "plan": {"num_images": 48, "shard_size": 4, "batch_size": 4},
    }
    budget = {"io_retries": 1, "io_backoff_s": 0.2, "max_retries": 2}
    config = make_config(**sections, runtime={**budget, "executor": "ray", "num_workers": 2})
    run_url = f"s3://{bucket}/runs/test"
    thread, outcome = start_run(config)
    wait_for_sidecars(fs, run_url, 2, thread)
    restartable_s3.stop()
    thread.join(120)
    error = outcome.get("error")
    assert isinstance(error, RunFailed), outcome
    message = str(error)
    assert message.startswith("shard train-0000")  # stopped at once, not shard after shard
    assert server.endpoint_url in message and "did not answer after 2 tries" in message
    assert f"{run_url}/shards/train-0000" in message and "rerun" in message
    assert server.secret not in message and server.key not in message
    assert restartable_s3.start() is None
    done = {n: d for n, d in s3_files(fs, run_url).items() if n.endswith(".json")}
    assert 2 <= len(done) < 12
    before = {n: fs.cat(f"{run_url}/shards/{n[:-5]}.tar") for n in done}

    manifest = run_job(make_config(**sections))  # resumed in this process this time
    assert manifest["this_run"]["shards_resumed"] == len(done)
    files = s3_files(fs, run_url)
    assert {n: files[f"{n[:-5]}.tar"] for n in done} == before  # byte-identical
    plan = [t.name for t in make_plan(config)]
    assert check_complete_run(files, manifest, plan) == 48


def test_only_transient_storage_errors_are_retried_within_a_bounded_budget() -> None:
    import botocore.exceptions

    from pipeline.errors import InputError
    from pipeline.io.retries import StorageUnavailable, is_transient, with_retries

    server_error = botocore.exceptions.ClientError(
        {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "Put"
    )
    wrapped = OSError(5, "Internal error")  # as s3fs translates a 500
    wrapped.__cause__ = server_error
    for error in (ConnectionRefusedError(111, "refused"), TimeoutError(), wrapped):
        assert is_transient(error), error
    missing = botocore.exceptions.ClientError({"Error": {"Code": "NoSuchBucket"}}, "Put")
    for error in (FileNotFoundError("b/k"), InputError("bucket"), missing, ValueError("x")):
        assert not is_transient(error), error

    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError(104, "reset")
        return "done"

    def most() -> float:  # the jitter's upper bound: the waits are their caps
        return 1.0

    assert with_retries(flaky, "s3://b/k", 3, 0.5, "http://e", waits.append, most) == "done"
    assert waits == [0.5, 1.0] and calls["n"] == 3

    def down() -> None:
        raise ConnectionRefusedError(111, "refused")

    waits.clear()
    with pytest.raises(StorageUnavailable, match=r"s3://b/k: http://e did not answer after 3"):
        with_retries(down, "s3://b/k", 2, 1.0, "http://e", waits.append, most)
    assert waits == [1.0, 2.0]

    def gone() -> None:
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(FileNotFoundError):
        with_retries(gone, "s3://b/k", 5, 1.0, "http://e", waits.append)
    assert waits == [1.0, 2.0]  # no wait: not retried
