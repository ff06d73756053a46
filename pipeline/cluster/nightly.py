"""Nightly runs' retention: ``dreamshard runs clean`` removes old complete runs.

Dated run names (``{date}``, ``{datetime}``) are resolved with the config
(:mod:`pipeline.config.resolution`): rerunning the same night resolves the same name, and the
run resumes (``record_run`` accepts an identical config) instead of starting a duplicate.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from pipeline.cli.arguments import storage_option_argument, storage_options
from pipeline.errors import InputError
from pipeline.io.storage import exists, filesystem, join


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
    from pipeline.stages.manifest import inspect_run  # torch: only when cleaning

    if older_than_days < 0:
        raise InputError(f"--older-than-days must be non-negative, got {older_than_days}")
    now = now or dt.datetime.now(dt.timezone.utc)
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
    storage_option_argument(clean)
    clean.set_defaults(handler=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> int:
    options = storage_options(args.storage_options)
    entries = clean_runs(args.output, args.older_than_days, options, args.dry_run)
    for entry in entries:
        detail = entry.get("reason") or f"{entry['age_days']} days old"
        print(f"{entry['action']:>12}  {entry['run_url']}  ({detail})")
    removed = sum(e["action"] != "keep" for e in entries)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} of {len(entries)} runs under {args.output}")
    return 0
