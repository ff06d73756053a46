"""``dreamshard run``, ``metadata`` and ``inspect``: the task graph and its records."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline import api
from pipeline.cli.arguments import config_command, storage_option_argument, storage_options
from pipeline.execution.progress import duration


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = config_command(commands, "run", "run the whole task graph for a config", cmd_run)
    run.add_argument(
        "--verify",
        action="store_true",
        help="also hash every completed shard and regenerate those whose sha256 differs "
        "from their sidecar's (a rerun always checks their sizes)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and the plan (shards, batches, actors, "
        "iterations); write nothing, start no Ray",
    )
    config_command(
        commands,
        "metadata",
        "the metadata stage alone: per-class feature statistics of a source",
        cmd_metadata,
    )
    inspect = commands.add_parser("inspect", help="a run's manifest, totals, completeness")
    inspect.add_argument("url", help="the run folder (OUTPUT/RUN) or its manifest.json")
    inspect.add_argument(
        "--verify", action="store_true", help="also check every tar against its sidecar's sha256"
    )
    inspect.add_argument(
        "--repair",
        action="store_true",
        help="regenerate damaged and missing shards from run.json, then rewrite the "
        "manifest (implies --verify; no config needed)",
    )
    storage_option_argument(inspect)
    inspect.set_defaults(handler=cmd_inspect)


# The handlers call pipeline.api, which imports the stages (torch, Ray) when they run, so
# that the command line itself starts fast.


def cmd_run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *(["runtime.verify=true"] if args.verify else [])]
    if args.dry_run:
        print(json.dumps(api.run(args.config, overrides, dry_run=True), indent=2))
        return 0
    summary = api.run(args.config, overrides)
    print(format_summary(summary))
    for label, entry in summary["totals"].get("failing_classes", {}).items():
        print(
            f"  class {label}: {entry['missing']} of {entry['planned']} images missing; "
            f"{entry['passed']} of {entry['synthesized']} synthesized passed the filter "
            f"({entry['accept_rate']:.0%})"
        )
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    print(json.dumps(api.metadata(args.config, args.overrides), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    options = storage_options(args.storage_options)
    report = api.inspect(args.url, options, verify=args.verify, repair=args.repair)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["complete"] and not report.get("corrupt") else 1


def format_summary(manifest: dict[str, Any]) -> str:
    """The end-of-run summary the CLI prints (from :func:`run_job`'s return value)."""
    totals, url = manifest["totals"], manifest["run_url"]
    lines = [f"wrote {totals['images']} images in {len(manifest['shards'])} shards to {url}"]
    stage = manifest.get("stage")  # translation: the stage's own manifest
    if stage:
        return "\n".join([*lines, f"  manifest: {url}/{stage}.json"])
    this_run = manifest.get("this_run")
    if this_run:
        rate = this_run["images"] / max(this_run["seconds"], 1e-9)
        lines.append(
            f"  this run: {this_run['shards_written']} shards written, "
            f"{this_run['shards_resumed']} already complete, {duration(this_run['seconds'])} "
            f"({rate:.2f} images/s)"
        )
    accept = totals["images"] / max(totals["synthesized"], 1)
    counts = list(totals["classes"].values()) or [0]
    lines += [
        f"  accepted {totals['images']} of {totals['synthesized']} synthesized ({accept:.0%}); "
        f"images per class {min(counts)}-{max(counts)}",
        f"  manifest: {url}/manifest.json",
        f"  preview:  {url}/preview.png",
    ]
    retrieval = manifest.get("retrieval")
    if retrieval:
        lines.append(
            f"  retrieval: {retrieval['images']} pool images selected of "
            f"{retrieval['pool_scored']} scored ({retrieval['pool_skipped']} skipped); "
            f"manifest: {url}/retrieval.json"
        )
    return "\n".join(lines)
