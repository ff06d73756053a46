"""The command line: exit codes, messages naming the culprit, nothing written on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.models.archs import build_architecture


def write_config(tmp_path: Path, checkpoint: str, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(str(tmp_path / "out"), checkpoint, **sections)))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_then_inspect(tmp_path: Path, teacher_checkpoint: str, capsys) -> None:
    config = write_config(tmp_path, teacher_checkpoint)
    code, out, _ = run_cli(["run", str(config), "--set", "plan.num_images=20"], capsys)
    assert code == 0
    assert "wrote 20 images in 2 shards" in out and "preview.png" in out
    code, out, _ = run_cli(["inspect", str(tmp_path / "out" / "test"), "--verify"], capsys)
    report = json.loads(out)
    assert code == 0 and report["complete"] and report["corrupt"] == []
    assert report["totals"]["images"] == 20
    # flip bytes in a shard: --verify names it and the exit code says so
    tar = tmp_path / "out" / "test" / "shards" / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    code, out, _ = run_cli(["inspect", str(tmp_path / "out" / "test"), "--verify"], capsys)
    assert code == 1 and json.loads(out)["corrupt"] == ["train-000001"]
    (tmp_path / "out" / "test" / "shards" / "train-000000.json").unlink()
    code, out, _ = run_cli(["inspect", str(tmp_path / "out" / "test")], capsys)
    assert code == 1 and json.loads(out)["missing"] == ["train-000000"]


def save(tmp_path: Path, model: torch.nn.Module, name: str) -> str:
    path = tmp_path / name
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


BAD_INPUTS = [
    ({"synthesizer": {"name": "deep"}}, "synthesizer.name: unknown synthesizer 'deep'; valid"),
    ({"teacher": {"arch": "resnet9000"}}, "teacher.arch: unknown architecture .*resnet56"),
    ({"plan": {"shards": 3}}, "unknown key plan.shards"),
    ({"teacher": {"checkpoint": "/nonexistent/t.pt"}}, "/nonexistent/t.pt does not exist"),
    ({"teacher": {"checkpoint": "EMPTY"}}, "not a readable PyTorch checkpoint"),
    ({"teacher": {"checkpoint": "R56"}}, "does not fit architecture 'resnet20'.*missing keys"),
    ({"teacher": {"num_classes": 100}}, "num_classes is 100"),
    ({"teacher": {"image_size": 64}}, "image_size is 64"),
    ({"plan": {"batch_size": 0}}, "batch_size must be positive"),
    ({"plan": {"num_images": 0}}, "num_images must be positive"),
    ({"run": {"output": "FILE/out"}}, "exists and is not a folder"),
    ({"run": {"output": "/proc/dreamshard-out"}}, "/proc is not writable"),
    ({"run": {"output": "nosuchscheme://bucket/x"}}, "unsupported storage URL"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_input_exits_2_naming_the_culprit_and_writes_nothing(
    tmp_path: Path, teacher_checkpoint: str, change: dict, message: str, capsys
) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "file").write_text("a file, not a folder")
    r56 = save(tmp_path, build_architecture("resnet56", 10), "r56.pt")
    replace = {"EMPTY": str(tmp_path / "empty.pt"), "R56": r56, "FILE": str(tmp_path / "file")}
    for values in change.values():
        for key, value in values.items():
            if isinstance(value, str):
                for token, real in replace.items():
                    value = value.replace(token, real)
                values[key] = value
    config = write_config(tmp_path, teacher_checkpoint, **change)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(["run", str(config)], capsys)
    assert code == 2, err
    assert "dreamshard: error:" in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_config_exit_2(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "none.yaml" in err
    config = tmp_path / "c.yaml"
    config.write_text("run: {}\n")
    code, _, err = run_cli(["run", str(config), "--set", "plan.batch_size"], capsys)
    assert code == 2 and "key.path=value" in err
    code, _, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "not a dreamshard run" in err


def test_console_script_runs_as_a_process(tmp_path: Path, teacher_checkpoint: str) -> None:
    config = write_config(tmp_path, teacher_checkpoint, synthesizer={"name": "nope"})
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "dreamshard"), "run", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "valid names: " in result.stderr and "deepinversion" in result.stderr


def test_teacher_train_and_eval_commands(tmp_path: Path, capsys) -> None:
    from test_images import make_folder

    data = make_folder(tmp_path / "data", per_class=4, size=32)
    out = tmp_path / "t.pt"
    code, printed, _ = run_cli(
        [
            "teacher",
            "train",
            "--data",
            str(data),
            "--test",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
        capsys,
    )
    assert code == 0 and out.exists()
    trained = json.loads(printed)
    assert trained["classes"] == ["ant", "moth", "zebra"] and 0 <= trained["test_accuracy"] <= 1
    code, printed, _ = run_cli(
        ["teacher", "eval", "--checkpoint", str(out), "--data", str(data)], capsys
    )
    result = json.loads(printed)
    assert code == 0 and result["images"] == 12
    assert result["accuracy"] == pytest.approx(trained["test_accuracy"])


def test_version_is_the_package_version(capsys) -> None:
    import tomllib

    import pipeline

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dreamshard {pipeline.__version__}"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]  # one version string: read from pipeline
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], "WARNING"), (["-v"], "INFO"), (["-q"], "ERROR"), (["--verbose"], "INFO")],
)
def test_verbosity_flags_work_after_the_subcommand(flags, level, monkeypatch, capsys) -> None:
    import logging

    from pipeline.cli import run

    seen = {}
    monkeypatch.setattr(run, "cmd_inspect", lambda args: seen.update(args=args) or 0)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # let basicConfig set the level
    main(["inspect", "URL", *flags])  # after the subcommand ...
    assert logging.getLevelName(logging.getLogger().level) == level
    assert seen["args"].url == "URL"
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    main([*flags, "inspect", "URL"])  # ... and before it, as always
    assert logging.getLevelName(logging.getLogger().level) == level


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    from pipeline.cli import run

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "cmd_inspect", interrupted)
    code, _, err = run_cli(["inspect", "URL"], capsys)
    assert code == 130 and "interrupted" in err


def test_storage_option_without_equals_exits_2(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["inspect", str(tmp_path), "--storage-option", "anon"], capsys)
    assert code == 2 and "--storage-option 'anon': expected key.path=value" in err


def test_dry_run_prints_config_and_plan_and_writes_nothing(
    tmp_path: Path, teacher_checkpoint: str, capsys
) -> None:
    config = write_config(
        tmp_path,
        teacher_checkpoint,
        runtime={"executor": "ray", "num_workers": None, "cpus_per_worker": 1},
        filter={"enabled": True, "max_attempts": 3},
        run={"storage_options": {"endpoint_url": "http://127.0.0.1:1", "secret": "s3cr3t"}},
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # by other tests
    args = ["run", str(config), "--dry-run", "--set", "plan.num_images=40", "-v"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["plan"]["num_images"] == 40
    assert report["config"]["run"]["storage_options"]["secret"] == "***"
    plan = report["plan"]
    assert (plan["shards"], plan["batches"], plan["batch_size"]) == (3, 3, 16)
    assert plan["shard_pattern"].endswith("/out/test/shards/train-{000000..000002}.tar")
    assert plan["iterations"] == {"per_batch": 2, "total": 6, "at_most": 18}
    # one per CPU (cpus_per_worker 1), at most one per shard; no GPU here
    assert plan["actors"]["count"] == min(os.cpu_count() or 1, 3)
    assert plan["actors"]["device"] == "cpu"
    assert plan["shards_complete"] == 0
    assert "s3cr3t" not in out + err
    assert not (tmp_path / "out").exists()  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    ray = sys.modules.get("ray")
    assert ray is None or ray.is_initialized() == ray_was_up  # no Ray started


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": {"shards": 3}}, "unknown key plan.shards"),
        ({"synthesizer": {"compile": "sometimes"}}, "synthesizer.compile: expected one of"),
        ({"teacher": {"checkpoint": "/nonexistent/t.pt"}}, "/nonexistent/t.pt does not exist"),
        ({"teacher": {"num_classes": 100}}, "num_classes is 100"),
    ],
)
def test_dry_run_on_a_bad_config_exits_2_naming_the_field(
    tmp_path: Path, teacher_checkpoint: str, change: dict, message: str, capsys
) -> None:
    config = write_config(tmp_path, teacher_checkpoint, **change)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(["run", str(config), "--dry-run"], capsys)
    assert code == 2 and re.search(message, err), err
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "out").exists()
