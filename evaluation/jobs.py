"""``dreamshard submit --command eval ACTION CONFIG``: an evaluation as a cluster job.

Registered with :mod:`pipeline.cluster.staging` when the ``eval`` commands are added (the
``dreamshard.commands`` plugin), so that ``pipeline`` never imports ``evaluation``. The
config is validated here; local checkpoint files travel with the job; the job uploads the
``evaluation`` package besides ``pipeline`` and ``synthesizers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.cluster.staging import (
    JobCommand,
    PreparedJob,
    carry_checkpoint,
    local_path_notes,
    register_job_command,
)
from pipeline.io.storage import absolute, join


def register(actions: list[str]) -> None:
    """Make ``eval ACTION`` submittable, for each action."""
    for action in actions:
        register_job_command(JobCommand(("eval", action), prepare_eval_job, ("evaluation",)))


def prepare_eval_job(path: str, overrides: list[str], staging: Path) -> PreparedJob:
    """The evaluation config the job reads: local paths absolute (this machine's, not the
    job's temporary working_dir), local checkpoints carried, ``runtime.address`` cleared
    (the job's trainers join the cluster it runs on)."""
    # imported here: the CLI registers this command at start-up, and the config imports torch
    from evaluation.config import load_eval_config, parse_eval_config

    config = load_eval_config(path, overrides)
    data = json.loads(json.dumps(config.to_dict()))
    data["runtime"]["address"] = None
    paths: dict[str, str | None] = {}

    def local(where: str, section: dict[str, Any], key: str, carry: str | None = None) -> None:
        if not section.get(key):
            return
        section[key] = absolute(section[key])
        carried = carry_checkpoint(section[key], staging, carry) if carry else None
        if carried:
            section[key] = carried
        else:
            paths[where] = section[key]

    local("run.output", data["run"], "output")
    local("data.shards", data["data"], "shards")
    local("data.test", data["data"], "test")
    if data["teacher"]:
        local("teacher.checkpoint", data["teacher"], "checkpoint", "teacher")
    for i, network in enumerate(data["fidelity"]["networks"]):
        local(f"fidelity.networks[{i}].checkpoint", network, "checkpoint", f"networks/{i}")
    parse_eval_config(json.loads(json.dumps(data)))  # what the job reads must still validate
    output = join(data["run"]["output"], config.run.name)
    return PreparedJob(data, config.run.name, output, local_path_notes(paths))
