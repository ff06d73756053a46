"""``dreamshard eval …``: added to the CLI through the ``dreamshard.commands`` entry point."""

from __future__ import annotations

import argparse
import json

from evaluation.jobs import register
from pipeline.cli.arguments import config_command

ACTIONS = {
    "kd": "distil a student from the teacher on the shards",
    "prune": "prune the teacher (L1 filters) and fine-tune it on the shards, per ratio",
    "scratch": "train a fresh network on the shards with hard labels only",
    "fidelity": (
        "teacher/independent accuracy, Fréchet distance (fd_<network>), precision/recall, "
        "diversity, t-SNE"
    ),
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``eval`` and its actions on the top-level subparsers."""
    evaluate = commands.add_parser("eval", help="KD, pruning, from-scratch training, fidelity")
    actions = evaluate.add_subparsers(required=True, metavar="ACTION")
    for name, description in ACTIONS.items():
        action = config_command(
            actions, name, description, cmd_eval, "evaluation YAML (see configs/eval/)"
        )
        action.add_argument(
            "--allow-incomplete",
            action="store_true",
            help="use the complete shards of an unfinished run (shards without sidecars skipped)",
        )
        action.set_defaults(action=name)
    register(list(ACTIONS))  # dreamshard submit --command eval ACTION CONFIG


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.config import load_eval_config

    overrides = list(args.overrides)
    if args.allow_incomplete:
        overrides.append("data.allow_incomplete=true")
    config = load_eval_config(args.config, overrides)
    if args.action == "fidelity":
        from evaluation.fidelity import run_fidelity

        results = run_fidelity(config)
    elif args.action == "prune":
        from evaluation.prune import run_prune

        results = run_prune(config)
    else:
        from evaluation.kd import train_student

        results = train_student(config, args.action)
    summary = {k: v for k, v in results.items() if k not in ("history", "per_class")}
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
