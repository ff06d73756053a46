"""``dreamshard retrieve`` and ``dreamshard translate``: the Impression Space stages."""

from __future__ import annotations

import argparse
import json

from pipeline import api
from pipeline.cli.arguments import config_command


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``retrieve`` and ``translate`` to the top-level subcommands."""
    for name, handler, text in (
        ("retrieve", cmd_retrieve, "select pool images near labeled ones (retrieval section)"),
        ("translate", cmd_translate, "translate images toward a target set (translation section)"),
    ):
        config_command(commands, name, text, handler)


def cmd_retrieve(args: argparse.Namespace) -> int:
    report(api.retrieve(args.config, args.overrides), "retrieval.json")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.stages.translation import run_translation

    manifest = run_translation(load_config(args.config, args.overrides))
    report(manifest, "translation.json")
    return 0


def report(manifest: dict, name: str) -> None:
    totals = manifest["totals"]
    print(
        f"wrote {totals['images']} images in {len(manifest['shards'])} shards to "
        f"{manifest['run_url']}"
    )
    print(f"  manifest: {manifest['run_url']}/{name}")
    print(json.dumps({k: v for k, v in totals.items() if not isinstance(v, list)}, indent=2))
