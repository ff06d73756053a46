"""``dreamshard eval …``: added to the CLI through the ``dreamshard.commands`` entry point."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``eval`` and its actions on the top-level subparsers."""
    evaluate = commands.add_parser("eval", help="KD, pruning, from-scratch training, fidelity")
    evaluate.add_subparsers(required=True, metavar="ACTION")
