"""KD, from-scratch and pruned fine-tuning under Ray Train (2 CPU workers, gloo), on tiny
separable shards; a worker killed mid-run resumes from its checkpoint; bad input exits 2.
What does not depend on where the loop runs (the report, plain shards) runs inline."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from evaluation_support import (
    write_plain_shards,
    write_shards,
    write_sized_shards,
    write_test_folder,
)
from ray_head import parent

from pipeline.cli.main import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    return {
        "shards": write_shards(root / "run", per_class=60, shard_size=100),
        "test": write_test_folder(root / "test", per_class=10),
    }


def eval_config(
    tmp_path: Path, files: dict[str, Path], checkpoint: str, **sections: dict[str, Any]
) -> Path:
    config: dict[str, Any] = {
        "run": {"name": "tiny", "output": str(tmp_path / "eval")},
        "data": {
            "shards": str(files["shards"]),
            "test": str(files["test"]),
            "shuffle_buffer": 200,
            "loader_workers": 1,
            "augment": False,
        },
        "teacher": {"arch": "resnet20", "checkpoint": checkpoint},
        "student": {"arch": "resnet20"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.02},
        "runtime": {"num_workers": 2, "max_failures": 2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_json(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed (Ray may print its own lines to stdout)."""
    return json.loads(re.findall(r"^\{$.*?^\}$", text, re.S | re.M)[-1])


def linked_files(page: str) -> list[str]:
    return re.findall(r"(?:src|href)='([^']+)'", page)


def test_kd_on_stored_logits_beats_the_untrained_student_and_reports(
    data, teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    # the shards' logits.npy are the targets (the fixture teacher is untrained); the
    # batch norms are recomputed over the recoloured shards after training
    train = {"logits": "stored", "alpha": 0.5, "recalibrate": 0.2}
    inline = {"executor": "inline"}  # the report is the same wherever the loop runs
    config = eval_config(tmp_path, data, teacher_checkpoint, train=train, runtime=inline)
    assert main(["eval", "kd", str(config)]) == 0
    output = tmp_path / "eval" / "tiny" / "kd"
    report = json.loads((output / "report.json").read_text())
    results = report["results"]
    assert results["final"]["test_accuracy"] >= results["untrained_accuracy"] + 0.15
    assert [e["epoch"] for e in results["history"]] == [1]
    assert set(results["per_class"]) == {f"class{c}" for c in range(10)}
    assert report["config"]["train"]["temperature"] == 5.0
    page = (output / "report.html").read_text()
    links = linked_files(page)
    assert {"accuracy.png", "classes.png", "report.json"} <= set(links)
    for name in links:
        assert (output / name).is_file(), name
    printed = last_json(capsys.readouterr().out)  # the command's summary
    assert printed["final"] == results["final"]
    student = ["--checkpoint", str(output / "student.pt"), "--data", str(data["test"])]
    assert main(["teacher", "eval", *student]) == 0  # the saved student: recalibrated
    accuracy = last_json(capsys.readouterr().out)["accuracy"]
    assert results["recalibrated"]["colour"] == 0.2
    assert accuracy == pytest.approx(results["recalibrated"]["test_accuracy"])
    saved = torch.load(output / "student.pt", weights_only=True)["state_dict"]
    assert int(saved["bn1.num_batches_tracked"]) == 2  # 600 samples in batches of 512


def test_uneven_shards_lose_no_sample_on_two_workers(
    ray_cluster, data, teacher_checkpoint: str, tmp_path: Path
) -> None:
    # 3 shards of 8, 8 and 4 samples on 2 Ray Train workers: every sample, every epoch;
    # stored logits with augmentation: the teacher is taught on the augmented views;
    # eval_every 2: the test set is evaluated after epoch 2 only
    shards = write_sized_shards(tmp_path / "uneven", [8, 8, 4])
    config = eval_config(
        tmp_path,
        {"shards": shards, "test": data["test"]},
        teacher_checkpoint,
        train={"epochs": 2, "batch_size": 6, "logits": "stored", "eval_every": 2},
        data={"loader_workers": 2, "shuffle_buffer": 5, "augment": True},
    )
    assert main(["eval", "kd", str(config)]) == 0
    report = json.loads((tmp_path / "eval" / "tiny" / "kd" / "report.json").read_text())
    results = report["results"]
    assert results["samples_seen"] == [20, 20]
    assert [e["samples_seen"] for e in results["history"]] == [20, 20]
    assert ["test_accuracy" in e for e in results["history"]] == [False, True]
    assert results["best"]["epoch"] == results["final"]["epoch"] == 2
    assert results["kd_targets"].startswith("teacher run on each augmented view")


def test_kd_on_plain_webdataset_shards_says_they_have_no_checksums(
    data, teacher_checkpoint: str, tmp_path: Path, caplog
) -> None:
    # tars written by webdataset's TarWriter (png + cls), no sidecars, no manifest
    plain = write_plain_shards(tmp_path / "baseline", [12, 9])
    files = {"shards": plain, "test": data["test"]}
    config = eval_config(tmp_path, files, teacher_checkpoint, runtime={"executor": "inline"})
    assert main(["eval", "kd", str(config)]) == 0
    report = json.loads((tmp_path / "eval" / "tiny" / "kd" / "report.json").read_text())
    assert report["shards"]["count"] == 2 and report["shards"]["samples"] == 21
    assert report["shards"]["checksums"].startswith("none for 2 of 2 shards")
    assert report["results"]["samples_seen"] == [21]
    assert "no checksums" in caplog.text
    page = (tmp_path / "eval" / "tiny" / "kd" / "report.html").read_text()
    assert "checksums: none for 2 of 2 shards" in page


def worker_pids() -> list[int]:
    """Ray Train worker processes started by this test process (not anyone else's, and
    not their DataLoader worker children, which carry the same title)."""
    pids = []
    for entry in os.listdir("/proc"):
        pid = int(entry) if entry.isdigit() else 0
        if (
            is_train_worker(pid)
            and not is_train_worker(parent(pid))
            and descends_from(pid, os.getpid())
        ):
            pids.append(pid)
    return pids


def registered_checkpoints(storage: Path) -> list[str]:
    """Checkpoints the Ray Train controller has registered (a restart resumes from these)."""
    names = []
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # being written
            continue
        names += [result["checkpoint_dir_name"] for result in results]
    return names


def is_train_worker(pid: int) -> bool:
    try:
        return b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent(pid)
    return False


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    ray_cluster, data, teacher_checkpoint: str, tmp_path: Path
) -> None:
    from evaluation.config import load_eval_config
    from evaluation.kd import train_student

    epochs = 3
    config = load_eval_config(eval_config(tmp_path, data, teacher_checkpoint))
    config.train.epochs = epochs
    storage = tmp_path / "eval" / "tiny" / "scratch" / "ray"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["results"] = train_student(config, "scratch")
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        if registered_checkpoints(storage) and worker_pids():
            killed = worker_pids()[-1]
            os.kill(killed, signal.SIGKILL)  # a real process-level death
        time.sleep(0.2)
    thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None
    results = outcome["results"]
    assert results["resumed_from"] and 1 <= results["resumed_from"][0] < epochs
    assert [e["epoch"] for e in results["history"]] == list(range(1, epochs + 1))
    assert results["final"]["test_accuracy"] > results["untrained_accuracy"]


NO_RAY = (
    "import sys\n"
    "sys.modules['ray'] = None  # any import of Ray fails\n"
    "from pipeline.cli.main import main\n"
    "sys.exit(main(['eval', 'kd', sys.argv[1]]))\n"
)


def test_inline_kd_runs_without_ray_and_a_killed_run_resumes_from_its_checkpoint(
    data, teacher_checkpoint: str, tmp_path: Path
) -> None:
    # runtime.executor inline: one worker in this process, in a Python where importing Ray
    # fails; killed after its first checkpoint, then run again: it resumes, not restarts
    epochs = 3
    config = eval_config(
        tmp_path,
        data,
        teacher_checkpoint,
        train={"epochs": epochs, "logits": "stored", "alpha": 0.5},
        runtime={"executor": "inline"},
    )
    storage = tmp_path / "eval" / "tiny" / "kd" / "inline"
    command = [sys.executable, "-c", NO_RAY, str(config)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if list(storage.glob("*/state.pt")):
            process.kill()
            break
        time.sleep(0.05)
    process.wait(60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    (checkpoint,) = storage.glob("*/state.pt")
    done = torch.load(checkpoint, weights_only=True)["state"]["epoch"]
    assert 1 <= done < epochs
    assert not list(storage.glob("*/*.partial-*"))  # replaced whole, never half-written
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    results = json.loads((tmp_path / "eval" / "tiny" / "kd" / "report.json").read_text())["results"]
    assert results["resumed_from"] == [done]
    assert [e["epoch"] for e in results["history"]] == list(range(1, epochs + 1))
    assert results["samples_seen"] == [600] * epochs  # one worker sees every sample
    assert results["final"]["test_accuracy"] >= results["untrained_accuracy"] + 0.15


def test_prune_on_s3_removes_filters_and_fine_tunes_each_ratio(
    ray_cluster, s3_server, data, teacher_checkpoint: str, tmp_path: Path
) -> None:
    # shards, Ray Train checkpoints and the report all on a real S3 server
    fs, bucket = s3_server.filesystem(), s3_server.make_bucket()
    fs.put(str(data["shards"] / "shards"), f"{bucket}/runs/tiny/shards", recursive=True)
    config = eval_config(
        tmp_path,
        {"shards": f"s3://{bucket}/runs/tiny", "test": data["test"]},
        teacher_checkpoint,
        run={"output": f"s3://{bucket}/eval", "storage_options": s3_server.storage_options()},
        prune={"ratios": [0.5], "epochs": 1},
    )
    assert main(["eval", "prune", str(config)]) == 0
    output = f"{bucket}/eval/tiny/prune"
    results = json.loads(fs.cat(f"{output}/report.json"))["results"]
    (row,) = results["ratios"]
    assert 0.45 < row["params_kept"] < 0.75  # block-internal channels halved
    assert row["macs"] < results["original"]["macs"]
    assert 0 <= row["accuracy_pruned"] <= 1 and 0 <= row["accuracy_finetuned"] <= 1
    assert [e["epoch"] for e in row["history"]] == [1]
    assert fs.find(f"{output}/ray", withdirs=False)  # Ray Train checkpoints on S3
    saved = io.BytesIO(fs.cat(f"{output}/pruned-0.5.pt"))
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert state["layer3.2.conv1.weight"].shape == (32, 64, 3, 3)  # half the filters
    assert state["layer3.2.conv2.weight"].shape == (64, 32, 3, 3)  # the residual stream whole
    links = linked_files(fs.cat(f"{output}/report.html").decode())
    assert "accuracy.png" in links
    for name in links:
        assert fs.exists(f"{output}/{name}"), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": {"num_workers": 3}}, r"num_workers=3 .* needs 3 CPUs; the Ray cluster has 2"),
        (
            {"student": {"arch": "resnet7"}},
            r"student.arch: unknown architecture 'resnet7'.*resnet20",
        ),
        ({"data": {"test": ""}}, r"data.test is required"),
        ({"data": {"shards": "SMALL"}}, r"images are 16x16 but .* expect 32x32"),
    ],
    ids=["too-many-workers", "unknown-student", "empty-test", "image-size"],
)
def test_bad_input_exits_2_naming_the_field(
    ray_cluster, data, teacher_checkpoint: str, tmp_path: Path, capsys, changes, message
) -> None:
    if changes.get("data", {}).get("shards") == "SMALL":
        small = write_shards(tmp_path / "small", per_class=1, shard_size=10, size=16)
        changes = {"data": {"shards": str(small)}}
    config = eval_config(tmp_path, data, teacher_checkpoint, **changes)
    assert main(["eval", "scratch", str(config)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_test_set_whose_classes_do_not_fit_the_teacher_exits_2(
    data, teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    test = tmp_path / "three"
    for name in ("a", "b", "c"):
        (test / name).mkdir(parents=True)
        (test / name / "0.png").write_bytes((data["test"] / "class0" / "0000.png").read_bytes())
    config = eval_config(tmp_path, data, teacher_checkpoint, data={"test": str(test)})
    assert main(["eval", "kd", str(config)]) == 2
    assert "has 3 class folders" in capsys.readouterr().err


def test_kd_loss_is_hintons() -> None:
    import torch
    import torch.nn.functional as F

    from evaluation.training import kd_loss, schedule_factor

    student = torch.tensor([[2.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    assert kd_loss(student, student, labels, 5.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.tensor([[0.0, 3.0, 0.0]])
    p, q = F.softmax(teacher / 4, 1), F.softmax(student / 4, 1)
    kl = (p * (p.log() - q.log())).sum().item()
    hard = F.cross_entropy(student, labels).item()
    expected = 0.7 * 16 * kl + 0.3 * hard
    assert kd_loss(student, teacher, labels, 4.0, 0.7).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(student, None, labels, 4.0, 0.7).item() == pytest.approx(hard)

    class Job:
        epochs, schedule, milestones, gamma = 10, "step", [0.5, 0.75], 0.1

    assert [round(schedule_factor(Job, e), 6) for e in (0, 4, 5, 7, 8)] == [1, 1, 0.1, 0.1, 0.01]
    Job.schedule = "cosine"
    assert schedule_factor(Job, 0) == 1.0 and schedule_factor(Job, 5) == pytest.approx(0.5)
