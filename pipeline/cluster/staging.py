"""What travels with a submitted job: the files under a staging folder (the config the job
reads, a local checkpoint), the entrypoint and the runtime environment.

``run`` is built in. Another command registers a :class:`JobCommand` here: the
evaluation package does so for ``eval ACTION`` from its ``dreamshard.commands`` plugin,
so nothing in ``pipeline`` imports it. A command's ``prepare`` validates its config on
this machine before anything is sent.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import InputError
from pipeline.io.storage import join, protocol_of

if TYPE_CHECKING:  # the CLI imports this module to register commands: keep it light
    from pipeline.config import Config

CONFIG_NAME = "dreamshard-job.yaml"
PACKAGES = ("pipeline", "synthesizers")  # uploaded with every job (unless --package installed)


@dataclass
class PreparedJob:
    """A validated job: the config it reads as plain data, and what to tell the user."""

    data: dict[str, Any]  # written to CONFIG_NAME in the job's working_dir
    run: str  # run.name, shown in `dreamshard jobs list`
    output: str  # where the job writes
    notes: list[str] = field(default_factory=list)  # paths the cluster must also see


@dataclass(frozen=True)
class JobCommand:
    """A command ``dreamshard submit --command …`` can run on a cluster."""

    words: tuple[str, ...]  # ("eval", "kd"): the job runs `python -m pipeline.cli eval kd CONFIG`
    prepare: Callable[[str, list[str], Path], PreparedJob]  # (config, overrides, staging)
    packages: tuple[str, ...] = ()  # uploaded besides PACKAGES


JOB_COMMANDS: dict[tuple[str, ...], JobCommand] = {}


def register_job_command(command: JobCommand) -> None:
    JOB_COMMANDS[command.words] = command


def job_command(words: list[str] | tuple[str, ...]) -> JobCommand:
    """The registered command for ``words``; bad input lists the valid ones."""
    try:
        return JOB_COMMANDS[tuple(words)]
    except KeyError:
        valid = ", ".join(" ".join(w) for w in JOB_COMMANDS)
        raise InputError(f"--command {' '.join(words)!r}: valid commands: {valid}") from None


def carry_checkpoint(url: str, staging: Path, folder: str = "teacher") -> str | None:
    """Copy a local checkpoint file into the job's files; its path there, or None when
    ``url`` is not a local file (a URL, or a path only the cluster has)."""
    if protocol_of(url) != "file" or not os.path.isfile(url):
        return None
    carried = staging / folder / Path(url).name
    carried.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(url, carried)
    return f"{folder}/{carried.name}"  # relative: the job's working_dir


def job_config(config: Config, staging: Path) -> dict[str, Any]:
    """The config the job runs, as plain data; a local checkpoint file is carried along.
    ``config`` is resolved: its local paths are absolute (this machine's, not the job's
    temporary working_dir)."""
    from pipeline.config import parse_config

    data = json.loads(json.dumps(config.to_dict()))
    data["runtime"]["address"] = None  # the driver joins the cluster it runs on (RAY_ADDRESS)
    carried = carry_checkpoint(config.teacher.checkpoint, staging)
    if carried:
        data["teacher"]["checkpoint"] = carried
    parse_config(json.loads(json.dumps(data)))  # what the job will read must still validate
    return data


def local_path_notes(paths: dict[str, str | None]) -> list[str]:
    """Notes on the local paths of a resolved config (field name -> path) that only work
    if every node of the cluster sees this machine's files."""
    notes = []
    for name, path in paths.items():
        if not path or protocol_of(path) != "file":
            continue
        if name.endswith("checkpoint"):
            if not os.path.isfile(path):
                notes.append(f"{name} {path} is not here: it must exist on the cluster")
            continue
        notes.append(
            f"{name} {path} is a local path: every node of the cluster must see it "
            "(a shared filesystem); use s3://… otherwise"
        )
    return notes


def prepare_run(config: Config, staging: Path) -> PreparedJob:
    """``run``: the resolved config ({date} as of now: the night it is submitted)."""
    from pipeline.config import resolve

    config = resolve(config)  # (a config from load_config is resolved already)
    data = job_config(config, staging)
    paths = {"run.output": config.run.output, "teacher.checkpoint": config.teacher.checkpoint}
    output = join(data["run"]["output"], config.run.name)
    return PreparedJob(data, config.run.name, output, local_path_notes(paths))


def _prepare_run_file(path: str, overrides: list[str], staging: Path) -> PreparedJob:
    from pipeline.config import load_config

    return prepare_run(load_config(path, overrides), staging)


register_job_command(JobCommand(("run",), _prepare_run_file))


def write_job(
    prepared: PreparedJob, command: JobCommand, staging: Path, package: str = "upload"
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Write the job's config under ``staging``: (entrypoint, runtime_env, metadata)."""
    (staging / CONFIG_NAME).write_text(yaml.safe_dump(prepared.data, sort_keys=False))
    runtime_env: dict[str, Any] = {
        "working_dir": str(staging),
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # progress lines reach the job log as written
    }
    if package == "upload":
        names = [*PACKAGES, *command.packages]
        runtime_env["py_modules"] = [package_dir(name) for name in names]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    metadata = {"dreamshard_run": prepared.run, "dreamshard_output": prepared.output}
    entrypoint = f"python -m pipeline.cli {' '.join(command.words)} {CONFIG_NAME}"
    return entrypoint, runtime_env, metadata


def stage(
    config: Config, staging: Path, package: str = "upload"
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Stage a ``run`` job for ``config``: (entrypoint, runtime_env, metadata)."""
    return write_job(prepare_run(config, staging), JOB_COMMANDS[("run",)], staging, package)


def package_dir(name: str) -> str:
    module = __import__(name)
    return str(Path(module.__file__).parent)
