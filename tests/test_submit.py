"""``dreamshard submit`` / ``jobs`` against a real Ray head on 127.0.0.1 writing to a real
S3 server; bad addresses and bad configs fail fast, locally, before anything is sent."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from ray_head import RayHead, ray_head
from seaweed import S3Server, free_port
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.cluster.submit import CONFIG_NAME, PROBE_SECONDS, stage
from pipeline.config import load_config
from pipeline.stages.manifest import inspect_run

DECOY_ID, DECOY_SECRET = "AKIADECOYSUBMITTER01", "decoy-secret-of-the-submitting-machine"


def write_config(tmp_path: Path, output: str, checkpoint: str, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(output, checkpoint, **sections)))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- before anything is sent ---------------------------------------------------------


def test_unreachable_address_fails_within_seconds(tmp_path, teacher_checkpoint, capsys) -> None:
    config = write_config(tmp_path, str(tmp_path / "out"), teacher_checkpoint)
    closed = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, _, err = run_cli(["submit", str(config), "--address", closed], capsys)
    assert code == 2 and f"--address {closed}: no Ray dashboard answered" in err
    # a server that accepts the connection and never answers: bounded by the probe timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code, _, err = run_cli(["jobs", "list", "--address", address], capsys)
    assert code == 2 and f"http://{address}: no Ray dashboard answered" in err
    assert time.monotonic() - start < PROBE_SECONDS + 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plan.batch_size=0", "plan: batch_size must be positive"),
        ("run.name=nightly-{day}", "unknown placeholder {day}"),
        ("run.storage_options={secret: s3cr3t}", "run.storage_options.secret: credentials"),
        (
            "run.storage_options={client_kwargs: {aws_secret_access_key: s3cr3t}}",
            "run.storage_options.client_kwargs.aws_secret_access_key: credentials",
        ),
    ],
)
def test_bad_config_is_rejected_before_connecting(
    tmp_path, teacher_checkpoint, capsys, override: str, message: str
) -> None:
    config = write_config(tmp_path, str(tmp_path / "out"), teacher_checkpoint)
    closed = f"http://127.0.0.1:{free_port()}"  # would fail differently if it were contacted
    args = ["submit", str(config), "--address", closed, "--set", override]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and message in err and "--address" not in err and "s3cr3t" not in err + out


def test_the_job_carries_the_resolved_config_and_checkpoint_but_no_credentials(
    tmp_path, teacher_checkpoint, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DECOY_SECRET)
    path = write_config(
        tmp_path,
        "s3://bucket/runs",
        teacher_checkpoint,
        run={"name": "nightly-{date}"},
        runtime={"address": "ray://laptop-tunnel:10001"},
    )
    submitted = dt.datetime(2026, 11, 21, 23, 59, 30, tzinfo=dt.timezone.utc)
    config = load_config(path, now=submitted)
    staging = tmp_path / "staging"
    staging.mkdir()
    entrypoint, runtime_env, metadata = stage(config, staging)
    # relative local paths are this machine's, not the job's temporary working_dir
    monkeypatch.chdir(tmp_path)
    relative = replace(config, run=replace(config.run, output="outputs"))
    (tmp_path / "again").mkdir()
    _, _, again = stage(relative, tmp_path / "again")
    assert again["dreamshard_output"] == f"{tmp_path}/outputs/nightly-2026-11-21"
    carried = yaml.safe_load((staging / CONFIG_NAME).read_text())
    # a job that starts after midnight still writes the night it was submitted for
    assert carried["run"]["name"] == metadata["dreamshard_run"] == "nightly-2026-11-21"
    assert carried["teacher"]["checkpoint"] == "teacher/resnet20-random.pt"
    assert carried["runtime"]["address"] is None  # the job joins the cluster it runs on
    assert (staging / "teacher" / "resnet20-random.pt").read_bytes() == Path(
        teacher_checkpoint
    ).read_bytes()
    assert entrypoint == f"python -m pipeline.cli run {CONFIG_NAME}"
    assert runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert [Path(p).name for p in runtime_env["py_modules"]] == ["pipeline", "synthesizers"]
    everything = json.dumps([entrypoint, runtime_env, metadata, carried])
    assert DECOY_SECRET not in everything and "AWS_" not in everything


def test_an_evaluation_job_carries_its_config_checkpoints_and_the_evaluation_package(
    tmp_path, teacher_checkpoint, monkeypatch
) -> None:
    import evaluation.cli  # the eval plugin registers `eval ACTION` for submit
    from pipeline.cli.main import build_parser
    from pipeline.cluster.staging import JOB_COMMANDS, job_command, write_job

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DECOY_SECRET)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "kd-night", "output": "s3://bucket/eval"},
                "data": {"shards": "runs/demo", "test": "s3://bucket/test"},  # a relative path
                "teacher": {"arch": "resnet20", "checkpoint": teacher_checkpoint},
                "fidelity": {"networks": [{"arch": "resnet20", "checkpoint": teacher_checkpoint}]},
                "runtime": {"address": "ray://laptop-tunnel:10001", "num_workers": 2},
            }
        )
    )
    args = build_parser().parse_args(["submit", "--command", "eval", "kd", str(path)])
    assert (args.command, args.config) == (["eval", "kd", str(path)], None)  # submit() splits
    assert {("eval", a) for a in evaluation.cli.ACTIONS} <= set(JOB_COMMANDS)
    command = job_command(["eval", "kd"])
    staging = tmp_path / "staging"
    staging.mkdir()
    prepared = command.prepare(str(path), ["train.epochs=3"], staging)
    entrypoint, runtime_env, metadata = write_job(prepared, command, staging)
    assert entrypoint == f"python -m pipeline.cli eval kd {CONFIG_NAME}"
    assert [Path(p).name for p in runtime_env["py_modules"]] == [
        "pipeline",
        "synthesizers",
        "evaluation",
    ]
    assert runtime_env["working_dir"] == str(staging)
    assert runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert metadata == {
        "dreamshard_run": "kd-night",
        "dreamshard_output": "s3://bucket/eval/kd-night",
    }
    carried = yaml.safe_load((staging / CONFIG_NAME).read_text())
    assert carried["train"]["epochs"] == 3  # the override travelled
    assert carried["data"]["shards"] == str(tmp_path / "runs" / "demo")  # this machine's path
    assert carried["runtime"]["address"] is None
    assert carried["teacher"]["checkpoint"] == "teacher/resnet20-random.pt"
    assert carried["fidelity"]["networks"][0]["checkpoint"] == "networks/0/resnet20-random.pt"
    assert (staging / "teacher" / "resnet20-random.pt").is_file()
    assert prepared.notes == [
        f"data.shards {tmp_path}/runs/demo is a local path: every node of the cluster must "
        "see it (a shared filesystem); use s3://… otherwise"
    ]
    everything = json.dumps([entrypoint, runtime_env, metadata, carried])
    assert DECOY_SECRET not in everything and "AWS_" not in everything


def test_submit_refuses_a_bad_evaluation_config_or_command_before_connecting(
    tmp_path, capsys
) -> None:
    import evaluation.cli  # noqa: F401  (registers `eval ACTION`)

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": "s3://b/run"}, "train": {"epochs": 0}}))
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(
        ["submit", "--command", "eval", "kd", str(path), "--address", closed], capsys
    )
    assert code == 2 and "train: epochs, batch_size, lr and eval_every must be positive" in err
    assert "--address" not in err
    code, _, err = run_cli(["submit", "--command", "eval", "distil", str(path)], capsys)
    assert code == 2 and "--command 'eval distil': valid commands: run, eval kd" in err
    path.write_text(
        yaml.safe_dump({"data": {"shards": "s3://b/r"}, "run": {"storage_options": {"key": "K"}}})
    )
    code, _, err = run_cli(["submit", str(path), "--command", "eval", "fidelity"], capsys)
    assert code == 2 and "run.storage_options.key: credentials are never sent" in err


# --- a real head ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head(s3_server: S3Server) -> Iterator[RayHead]:
    """A Ray head whose own environment holds the storage credentials (as a Secret would)."""
    with ray_head(s3_server.env()) as running:
        yield running


def secret_free(texts: dict[str, bytes], secrets: list[str]) -> list[str]:
    """Names of the texts that contain any of the secrets."""
    return [name for name, data in texts.items() if any(s.encode() in data for s in secrets)]


def metric_value(head: RayHead, name: str, seconds: float = 30.0) -> float:
    """Sum of a metric's samples on the head's Prometheus endpoint (waits for export)."""
    deadline = time.monotonic() + seconds
    pattern = re.compile(rf"^ray_{name}_total\{{[^}}]*\}} ([0-9.e+]+)$", re.M)
    while True:
        with urllib.request.urlopen(head.metrics_url, timeout=5) as response:
            found = pattern.findall(response.read().decode())
        if found or time.monotonic() > deadline:
            return sum(float(v) for v in found)
        time.sleep(1.0)


@pytest.mark.slow
def test_submit_runs_on_the_cluster_with_its_own_credentials(
    head: RayHead, s3_server: S3Server, tmp_path, teacher_checkpoint, capsys, monkeypatch
) -> None:
    # the submitting machine has credentials of its own: they must not travel
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DECOY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DECOY_SECRET)
    bucket = s3_server.make_bucket("submit")
    config = write_config(
        tmp_path,
        f"s3://{bucket}/runs",
        teacher_checkpoint,
        run={"name": "nightly-{date}", "storage_options": {"endpoint_url": s3_server.endpoint_url}},
        runtime={"executor": "ray", "progress": True},
    )
    code, out, err = run_cli(["submit", str(config), "--address", head.address, "--wait"], capsys)
    assert code == 0, err
    job_id = re.search(r"^submitted (\S+):", out, re.M).group(1)
    name = f"nightly-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    run_url = f"s3://{bucket}/runs/{name}"
    assert f"wrote 32 images in 2 shards to {run_url}" in out  # the job's log, streamed
    assert "progress: 2/2 shards" in out  # plain progress lines: the job log is no TTY

    options = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.key}
    options["secret"] = s3_server.secret
    report = inspect_run(run_url, options, verify=True)
    assert report["complete"] and report["finalised"] and report["corrupt"] == []
    assert report["totals"]["images"] == 32

    code, status, _ = run_cli(["jobs", "status", job_id, "--address", head.address], capsys)
    assert code == 0 and json.loads(status)["status"] == "SUCCEEDED"
    assert json.loads(status)["metadata"]["dreamshard_run"] == name
    code, logs, _ = run_cli(["jobs", "logs", job_id, "--address", head.address], capsys)
    assert code == 0 and f"to {run_url}" in logs

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head.address).get_job_info(job_id)
    texts = {
        "submit output": (out + err).encode(),
        "job info": json.dumps(info.model_dump(), default=str).encode(),
        "jobs status": status.encode(),
        "job log": logs.encode(),
    }
    texts.update({str(p): p.read_bytes() for p in head.log_files()})
    fs = s3_server.filesystem()
    texts.update({path: fs.cat(path) for path in fs.find(bucket)})
    assert len([t for t in texts if t.startswith(bucket)]) == 6 + 2 * 2  # every object checked
    assert any(t.endswith(CONFIG_NAME) for t in texts)  # the uploaded job files were checked
    assert any("job-driver" in t for t in texts)  # and the head's session logs
    assert secret_free(texts, [s3_server.secret, DECOY_SECRET, DECOY_ID]) == []

    # Ray's custom metrics reached the Prometheus endpoint
    assert metric_value(head, "dreamshard_images_synthesized") == 32
    assert metric_value(head, "dreamshard_images_accepted") == 32
    assert metric_value(head, "dreamshard_shards_written") == 2


@pytest.mark.slow
def test_a_job_that_fails_exits_1_with_its_last_log_lines(
    head: RayHead, s3_server: S3Server, tmp_path, capsys
) -> None:
    bucket = s3_server.make_bucket("failing")
    missing = f"s3://{bucket}/no-such-teacher.pt"
    config = write_config(
        tmp_path,
        f"s3://{bucket}/runs",
        missing,
        run={"storage_options": {"endpoint_url": s3_server.endpoint_url}},
    )
    code, _, err = run_cli(["submit", str(config), "--address", head.address, "--wait"], capsys)
    assert code == 1
    assert re.search(r"job dreamshard-test-\S+ FAILED", err)
    assert "--- last" in err and "no-such-teacher.pt" in err.split("--- last", 1)[1]


@pytest.mark.slow
def test_jobs_list_logs_and_stop(head: RayHead, tmp_path, teacher_checkpoint, capsys) -> None:
    config = write_config(
        tmp_path,
        str(tmp_path / "out"),  # the head runs on this machine: a local output is shared
        teacher_checkpoint,
        synthesizer={"iterations": 100_000},
        plan={"num_images": 16},
    )
    code, out, _ = run_cli(["submit", str(config), "--address", head.address], capsys)
    assert code == 0 and "dreamshard jobs logs" in out
    job_id = re.search(r"^submitted (\S+):", out, re.M).group(1)
    code, listing, _ = run_cli(["jobs", "list", "--address", head.address], capsys)
    assert code == 0 and re.search(rf"^{job_id}\s+(PENDING|RUNNING)\s.*\stest$", listing, re.M)
    code, out, _ = run_cli(["jobs", "stop", job_id, "--address", head.address], capsys)
    assert code == 0 and out.strip() == f"{job_id}: stop requested"
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and status != "STOPPED":
        code, out, _ = run_cli(["jobs", "status", job_id, "--address", head.address], capsys)
        status = json.loads(out)["status"]
        time.sleep(1)
    assert status == "STOPPED"
    code, out, _ = run_cli(["jobs", "stop", job_id, "--address", head.address], capsys)
    assert code == 0 and out.strip() == f"{job_id}: not running"
    code, _, err = run_cli(["jobs", "status", "no-such-job", "--address", head.address], capsys)
    assert code == 2 and "no job 'no-such-job'" in err
