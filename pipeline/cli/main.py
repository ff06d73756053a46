"""``dreamshard``: the command line. Exit 0 on success, 2 on bad input, 1 on a failure,
130 when interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pipeline
from pipeline.cli import imagine, impression, run, teacher
from pipeline.cluster import nightly, submit
from pipeline.errors import InputError, RunError
from pipeline.io.storage import RedactingFormatter, redact_url

log = logging.getLogger("dreamshard")
INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
LOG_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LOG_LEVELS[getattr(args, "verbosity", 0)],
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
        return INTERRUPTED
    except Exception as error:
        log.exception("run failed")
        message = redact_url(f"{type(error).__name__}: {error}")
        print(f"dreamshard: failed: {message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamshard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dreamshard {pipeline.__version__}")
    add_verbosity(parser, argparse.SUPPRESS)
    parser.set_defaults(verbosity=0)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for module in (run, teacher, submit, nightly, impression, imagine):
        module.add_commands(commands)
    for add_commands in plugin_commands():
        add_commands(commands)
    for subparser in subparsers_of(parser):  # `dreamshard run CONFIG -v` works too
        add_verbosity(subparser, argparse.SUPPRESS)
    return parser


def add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v``/``--verbose`` (progress details) and ``-q``/``--quiet`` (errors only).

    The default is ``SUPPRESS`` so that a subcommand that was not given the flag leaves
    the value from before the subcommand (or the top-level default) alone."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=1,
        default=default,
        help="log progress details",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=-1,
        default=default,
        help="log errors only",
    )


def subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, at any depth (``eval kd``, ``jobs list``)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += [child, *subparsers_of(child)]
    return found


def plugin_commands() -> list:
    """``add_commands(subparsers)`` functions registered under the ``dreamshard.commands``
    entry-point group: how ``evaluation`` (which nothing here imports) adds ``eval``."""
    from importlib.metadata import entry_points

    return [entry.load() for entry in entry_points(group="dreamshard.commands")]
