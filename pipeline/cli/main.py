"""``dreamshard``: the command line. Exit 0 on success, 2 on bad input, 1 on a failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.cli import imagine, impression, run, teacher
from pipeline.cluster import nightly, submit
from pipeline.errors import InputError, RunError
from pipeline.io.storage import RedactingFormatter, redact_url

log = logging.getLogger("dreamshard")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    for handler in logging.getLogger().handlers:  # tracebacks too: no URL password in logs
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
    try:
        return args.handler(args) or 0
    except InputError as error:
        print(f"dreamshard: error: {redact_url(str(error))}", file=sys.stderr)
        return 2
    except RunError as error:  # named and explained: no traceback
        print(f"dreamshard: failed: {redact_url(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "dreamshard: interrupted; completed shards are kept, rerun to resume", file=sys.stderr
        )
        return 1
    except Exception as error:
        log.exception("run failed")
        message = redact_url(f"{type(error).__name__}: {error}")
        print(f"dreamshard: failed: {message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamshard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for module in (run, teacher, submit, nightly, impression, imagine):
        module.add_commands(commands)
    for add_commands in plugin_commands():
        add_commands(commands)
    return parser


def plugin_commands() -> list:
    """``add_commands(subparsers)`` functions registered under the ``dreamshard.commands``
    entry-point group: how ``evaluation`` (which nothing here imports) adds ``eval``."""
    from importlib.metadata import entry_points

    return [entry.load() for entry in entry_points(group="dreamshard.commands")]
