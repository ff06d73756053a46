"""Argument helpers every command module shares: a config command with ``--set``, and
``KEY=VALUE`` storage options."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.errors import InputError


def config_command(
    commands: argparse._SubParsersAction,
    name: str,
    text: str,
    handler: Any,
    config_help: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand that takes CONFIG and repeatable ``--set key.path=value`` overrides."""
    parser = commands.add_parser(name, help=text, description=text)
    parser.add_argument("config", help=config_help)
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
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )


def storage_options(items: list[str]) -> dict[str, str]:
    """``--storage-option`` values as a mapping."""
    return dict(key_value(item) for item in items)


def key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise InputError(f"--storage-option {item!r}: expected KEY=VALUE")
    return key, value
