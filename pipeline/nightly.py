"""Nightly runs: dated run names, and a retention command that removes old complete runs.

``run.name`` may hold ``{date}`` (``2026-11-21``) or ``{datetime}`` (``20261121T023000Z``),
both UTC. The name is resolved once: ``dreamshard submit`` resolves it on the submitting
machine and sends the resolved config, so a job that waits in a queue past midnight keeps
the night it was submitted for; ``dreamshard run`` resolves it when it starts. Rerunning
the same night therefore resolves the same name, and the run resumes (``record_run``
accepts an identical config) instead of starting a duplicate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.storage import exists, filesystem, join

if TYPE_CHECKING:  # the CLI imports this module to register commands: keep it light
    from pipeline.config import Config

PLACEHOLDERS = {
    "date": "%Y-%m-%d",
    "datetime": "%Y%m%dT%H%M%SZ",
}


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def resolve_name(name: str, now: dt.datetime | None = None) -> str:
    """``name`` with ``{date}``/``{datetime}`` filled in (UTC); other names unchanged.

    A resolved name holds no braces, so resolving it again changes nothing.
    """
    now = (now or utc_now()).astimezone(dt.timezone.utc)

    def fill(match: re.Match) -> str:
        field = match.group(1)
        if field not in PLACEHOLDERS:
            raise InputError(
                f"run.name {name!r}: unknown placeholder {{{field}}}; valid: "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            )
        return now.strftime(PLACEHOLDERS[field])

    resolved = re.sub(r"\{([^{}]*)\}", fill, name)
    if "{" in resolved or "}" in resolved:
        raise InputError(f"run.name {name!r}: unbalanced brace (placeholders are {{date}}, …)")
    return resolved


def resolve_run_name(config: Config, now: dt.datetime | None = None) -> Config:
    """``config`` with ``run.name`` resolved (a no-op for a name without placeholders)."""
    name = resolve_name(config.run.name, now)
    if name == config.run.name:
        return config
    return replace(config, run=replace(config.run, name=name))


def modified(url: str, options: dict[str, Any] | None) -> dt.datetime:
    """When ``url`` was last written (UTC), from the storage's own metadata."""
    fs, path = filesystem(url, options)
    when = fs.modified(path)
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when


def clean_runs(
    output: str,
    older_than_days: float,
    options: dict[str, Any] | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Remove the complete runs under ``output`` finished more than ``older_than_days`` ago.

    A run counts as finished when its ``manifest.json`` was written (its age is that
    file's age) and every planned shard has its sidecar. Incomplete runs, and folders
    that are not dreamshard runs, are never touched. Returns one entry per run looked at.
    """
    from pipeline.manifest import inspect_run

    if older_than_days < 0:
        raise InputError(f"--older-than-days must be non-negative, got {older_than_days}")
    now = now or utc_now()
    fs, root = filesystem(output, options)
    if not fs.isdir(root):
        raise InputError(f"{output}: no such folder")
    entries = []
    for path in sorted(fs.ls(root, detail=False, refresh=True)):
        run_url = join(output, path.rstrip("/").rsplit("/", 1)[-1])
        if not exists(join(run_url, "run.json"), options):
            continue  # not a run: never ours to remove
        report = inspect_run(run_url, options)
        entry: dict[str, Any] = {"run_url": run_url, "action": "keep"}
        if not (report["complete"] and report["finalised"]):
            entry["reason"] = "incomplete"
        else:
            age = (now - modified(join(run_url, "manifest.json"), options)).total_seconds() / 86400
            entry["age_days"] = round(age, 2)
            if age < older_than_days:
                entry["reason"] = "recent"
            else:
                entry["action"] = "would remove" if dry_run else "removed"
                if not dry_run:
                    run_fs, run_path = filesystem(run_url, options)
                    run_fs.rm(run_path, recursive=True)
        entries.append(entry)
    return entries


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``dreamshard runs clean OUTPUT --older-than-days N [--dry-run]``."""
    runs = commands.add_parser("runs", help="manage the runs under an output folder")
    actions = runs.add_subparsers(required=True, metavar="ACTION")
    clean = actions.add_parser(
        "clean", help="remove complete runs older than N days (incomplete runs are kept)"
    )
    clean.add_argument("output", help="the run.output URL holding the runs")
    clean.add_argument("--older-than-days", type=float, required=True, metavar="N")
    clean.add_argument("--dry-run", action="store_true", help="list what would be removed")
    clean.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )
    clean.set_defaults(handler=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> int:
    from pipeline.cli import _key_value

    options = dict(_key_value(item) for item in args.storage_options)
    entries = clean_runs(args.output, args.older_than_days, options, args.dry_run)
    for entry in entries:
        detail = entry.get("reason") or f"{entry['age_days']} days old"
        print(f"{entry['action']:>12}  {entry['run_url']}  ({detail})")
    removed = sum(e["action"] != "keep" for e in entries)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} of {len(entries)} runs under {args.output}")
    return 0
