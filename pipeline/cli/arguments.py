"""Argument helpers every command module shares: a config command with ``--set``, and
``KEY=VALUE`` storage options."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.keypaths import assignments


def config_command(
    commands: argparse._SubParsersAction,
    name: str,
    text: str,
    handler: Any,
    config_help: str | None = None,
    config_nargs: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand that takes CONFIG and repeatable ``--set key.path=value`` overrides."""
    parser = commands.add_parser(name, help=text, description=text)
    parser.add_argument("config", help=config_help, nargs=config_nargs)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field (repeatable)",
    )
    parser.set_defaults(handler=handler)
    return parser


def storage_option_argument(parser: argparse.ArgumentParser) -> None:
    """A repeatable ``--storage-option KEY=VALUE`` (read with :func:`storage_options`)."""
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="an fsspec storage option, parsed like --set: YAML values, nested keys "
        "(client_kwargs.endpoint_url=http://HOST:9000); repeatable",
    )


def storage_options(items: list[str]) -> dict[str, Any]:
    """``--storage-option`` values as one (nested) mapping."""
    return assignments(items, "--storage-option")
