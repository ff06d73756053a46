"""Nightly semantics ({date} names resume, retention of complete runs), progress off a
TTY, the end-of-run summary, metrics outside Ray."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from seaweed import S3Server
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.cluster.nightly import clean_runs
from pipeline.config import resolution, resolve_name
from pipeline.errors import InputError
from pipeline.execution.progress import Progress
from pipeline.graph import run_job
from pipeline.io.shards import Sidecar

UTC = dt.timezone.utc


def stats(samples: int = 16, synthesized: int = 32) -> Sidecar:
    return Sidecar(
        shard="train-000000",
        samples=samples,
        classes={},
        sha256="",
        bytes=0,
        seconds=2.0,
        device="cpu",
        index=[],
        synthesized=synthesized,
        synthesis_seconds=1.5,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_tty_writes_periodic_plain_lines() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(4, enabled=True, stream=stream, interval=30, clock=clock)
    clock.now = 10
    progress.update(stats())  # within the interval: no line yet
    assert stream.getvalue() == ""
    clock.now = 40
    progress.update(stats())
    clock.now = 50
    progress.update(stats(samples=8))
    clock.now = 60
    progress.close()  # the final state, though 4 shards were planned and 3 done
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()  # no bar redraws in a log
    assert lines[0].endswith(
        "dreamshard progress: 2/4 shards, 32 images, accept 50%, elapsed 40s, ETA 40s"
    )
    assert lines[1].endswith("progress: 3/4 shards, 40 images, accept 42%, elapsed 1m00s, ETA 20s")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d dreamshard progress", lines[0])


def test_progress_counts_any_stage() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(3, enabled=True, stream=stream, interval=0, clock=clock, unit="classes")
    clock.now = 90
    progress.update()
    progress.close()
    assert stream.getvalue().endswith("progress: 1/3 classes, elapsed 1m30s, ETA 3m00s\n")


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(2, enabled=False, stream=stream, interval=0)
    progress.update(stats())
    progress.close()
    assert stream.getvalue() == ""


def write_config(tmp_path: Path, checkpoint: str, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(str(tmp_path / "out"), checkpoint, **sections)))
    return path


def at(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    monkeypatch.setattr(resolution, "utc_now", lambda: dt.datetime.fromisoformat(when))


def test_a_dated_run_resumes_the_same_night_and_starts_afresh_the_next(
    tmp_path: Path, teacher_checkpoint: str, monkeypatch, capsys
) -> None:
    config = write_config(
        tmp_path,
        teacher_checkpoint,
        run={"name": "nightly-{date}"},
        plan={"num_images": 16, "batch_size": 8, "shard_size": 8},
        runtime={"progress": True},
    )
    at(monkeypatch, "2026-11-21T01:00:00+00:00")
    assert main(["run", str(config)]) == 0
    out, err = capsys.readouterr()
    night = tmp_path / "out" / "nightly-2026-11-21"
    assert f"wrote 16 images in 2 shards to {night}" in out
    assert "this run: 2 shards written, 0 already complete" in out
    assert "accepted 16 of 16 synthesized (100%); images per class 1-2" in out
    assert "progress: 2/2 shards, 16 images, accept 100%" in err  # capsys is no TTY
    # later the same night: the same run, resumed (only the lost shard is redone)
    (night / "shards" / "train-000001.json").unlink()
    at(monkeypatch, "2026-11-21T22:00:00+00:00")
    assert main(["run", str(config)]) == 0
    out, _ = capsys.readouterr()
    assert f"to {night}" in out and "this run: 1 shards written, 1 already complete" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nightly-2026-11-21"]
    assert main(["inspect", str(night)]) == 0
    assert '"complete": true' in capsys.readouterr().out


def test_resolve_name_is_utc_and_idempotent() -> None:
    late = dt.datetime(2026, 11, 21, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert resolve_name("nightly-{date}", late) == "nightly-2026-11-22"
    assert resolve_name("run-{datetime}", late) == "run-20261122T043000Z"
    assert resolve_name(resolve_name("n-{date}-{datetime}", late)) == (
        "n-2026-11-22-20261122T043000Z"
    )
    for bad in ("nightly-{day}", "nightly-{date", "{date:%Y}"):
        with pytest.raises(InputError, match="run.name"):
            resolve_name(bad)


def make_runs(tmp_path: Path, checkpoint: str, names: list[str]) -> Path:
    """Complete runs under tmp_path/out: one tiny run (a shard of 16), then copies of it."""
    config = write_config(tmp_path, checkpoint, plan={"num_images": 16})
    assert main(["run", str(config), "--set", f"run.name={names[0]}"]) == 0
    out = tmp_path / "out"
    for name in names[1:]:
        shutil.copytree(out / names[0], out / name)
    return out


def age(run: Path, days: float) -> None:
    when = time.time() - days * 86400
    os.utime(run / "manifest.json", (when, when))


def test_clean_removes_only_old_complete_runs(
    tmp_path: Path, teacher_checkpoint: str, capsys
) -> None:
    out = make_runs(tmp_path, teacher_checkpoint, ["old", "recent", "old-incomplete"])
    age(out / "old", 10)
    age(out / "recent", 1)
    age(out / "old-incomplete", 10)
    (out / "old-incomplete" / "shards" / "train-000000.json").unlink()
    (out / "not-a-run").mkdir()
    (out / "not-a-run" / "data.txt").write_text("keep me")
    capsys.readouterr()

    assert main(["runs", "clean", str(out), "--older-than-days", "7", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"would remove  {out}/old  \(10\.0\d? days old\)", listing)
    assert f"keep  {out}/old-incomplete  (incomplete)" in listing
    assert f"keep  {out}/recent  (recent)" in listing
    assert "not-a-run" not in listing and "would remove 1 of 3 runs" in listing
    assert (out / "old").is_dir()  # a dry run removes nothing

    assert main(["runs", "clean", str(out), "--older-than-days", "7"]) == 0
    assert "removed 1 of 3 runs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["not-a-run", "old-incomplete", "recent"]
    assert main(["runs", "clean", str(tmp_path / "nowhere"), "--older-than-days", "1"]) == 2


@pytest.mark.slow
def test_clean_on_s3(s3_server: S3Server, make_config) -> None:
    bucket = s3_server.make_bucket("clean")
    options = s3_server.storage_options()
    output = f"s3://{bucket}/runs"
    config = make_config(
        run={"output": output, "storage_options": options}, plan={"num_images": 16}
    )
    run_job(config)
    fs = s3_server.filesystem()
    fs.pipe(f"{bucket}/runs/other/file.txt", b"not a run")
    later = dt.datetime.now(UTC) + dt.timedelta(days=3)
    entries = clean_runs(output, 2, options, dry_run=True, now=later)
    assert [(e["run_url"], e["action"]) for e in entries] == [(f"{output}/test", "would remove")]
    assert clean_runs(output, 4, options, now=later)[0]["action"] == "keep"
    assert clean_runs(output, 2, options, now=later)[0]["action"] == "removed"
    assert fs.find(f"{bucket}/runs", refresh=True) == [f"{bucket}/runs/other/file.txt"]


def test_metrics_calls_do_nothing_outside_ray() -> None:
    """In a fresh process (this one may host the tests' Ray): no error, Ray not started."""
    code = (
        "import ray; from pipeline.execution.metrics import record_failure, record_shard; "
        "record_shard({'synthesized': 4, 'accepted': 0, 'seconds': 1, 'synthesis_seconds': 1},"
        " 'run', 'deepinversion'); record_failure('run', 'deepinversion'); "
        "assert not ray.is_initialized(); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
