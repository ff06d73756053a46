"""``dreamshard inspect --verify --repair``: a run's config rebuilt from its ``run.json``,
so that the task graph can regenerate its damaged and missing shards without the
original config file."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.config import Config, parse_config
from pipeline.errors import InputError
from pipeline.io.storage import exists, join, read_json


def run_folder(url: str) -> str:
    """The run folder of ``url`` (the folder itself, or its ``manifest.json``)."""
    return url.removesuffix("/manifest.json").rstrip("/")


def recorded_config(url: str, options: dict[str, Any] | None = None) -> Config:
    """The config the run at ``url`` recorded in ``run.json``, with ``options`` as its
    storage options (``run.json`` holds them redacted) and ``runtime.verify`` on.

    The recorded config is already resolved (absolute paths, ``run.name`` with its date
    filled in), so the rebuilt one names the same run folder and passes the same-config
    check; the storage options must be those the run was made with (secrets aside)."""
    run_url = run_folder(url)
    record_url = join(run_url, "run.json")
    if not exists(record_url, options):
        raise InputError(f"{url}: not a dreamshard run (no run.json); nothing to repair")
    try:
        record = read_json(record_url, options)
        data = {name: dict(section) for name, section in record["config"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{record_url}: not a dreamshard run record ({error})") from None
    data["run"]["storage_options"] = dict(options or {})
    config = parse_config(data)
    return replace(config, runtime=replace(config.runtime, verify=True))
