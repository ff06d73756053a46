"""``dreamshard``: the command line. Exit 0 on success, 2 on bad input, 1 on a failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.errors import InputError

log = logging.getLogger("dreamshard")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    from pipeline.storage import RedactingFormatter, redact_url

    for handler in logging.getLogger().handlers:  # tracebacks too: no URL password in logs
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
    try:
        return args.handler(args) or 0
    except InputError as error:
        print(f"dreamshard: error: {redact_url(str(error))}", file=sys.stderr)
        return 2
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

    config_command(commands, "run", "run the whole task graph for a config", cmd_run)
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
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE"
    )
    inspect.set_defaults(handler=cmd_inspect)

    teacher = commands.add_parser("teacher", help="train or evaluate a teacher")
    teacher_commands = teacher.add_subparsers(required=True, metavar="ACTION")
    train = teacher_commands.add_parser("train", help="train a classifier on class folders")
    train.add_argument("--data", required=True, help="class-folder training images (URL)")
    train.add_argument("--test", help="class-folder test images, evaluated every epoch")
    train.add_argument("--out", required=True, help="where to write the checkpoint (URL)")
    train.add_argument("--arch", default="resnet20")
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=0.2)
    train.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    train.add_argument("--image-size", type=int, default=32)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=cmd_teacher_train)

    evaluate = teacher_commands.add_parser("eval", help="accuracy on class-folder images")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True, help="class-folder test images (URL)")
    evaluate.add_argument("--arch", help="defaults to the checkpoint's own metadata")
    evaluate.add_argument("--num-classes", type=int)
    evaluate.add_argument("--image-size", type=int)
    evaluate.add_argument("--per-class", type=int, help="first N images of each class")
    evaluate.set_defaults(handler=cmd_teacher_eval)

    from pipeline import impression_commands, nightly, submit

    for module in (submit, nightly, impression_commands):
        module.add_commands(commands)
    from pipeline import imagine_commands

    imagine_commands.add_commands(commands)
    for add_commands in plugin_commands():
        add_commands(commands)
    return parser


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


def plugin_commands() -> list:
    """``add_commands(subparsers)`` functions registered under the ``dreamshard.commands``
    entry-point group: how ``evaluation`` (which nothing here imports) adds ``eval``."""
    from importlib.metadata import entry_points

    return [entry.load() for entry in entry_points(group="dreamshard.commands")]


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runtime import format_summary, run_job

    config = load_config(args.config, args.overrides)
    summary = run_job(config)
    print(format_summary(summary))
    for label, entry in summary["totals"].get("failing_classes", {}).items():
        print(
            f"  class {label}: {entry['missing']} of {entry['planned']} images missing; "
            f"{entry['passed']} of {entry['synthesized']} synthesized passed the filter "
            f"({entry['accept_rate']:.0%})"
        )
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipeline.config import load_config
    from pipeline.metadata import ensure_metadata
    from pipeline.storage import absolute, check_writable
    from pipeline.teachers import load_teacher

    config = load_config(args.config, args.overrides)
    if not config.metadata.configured:
        raise InputError("metadata.source (or metadata.artifact) is not set in the config")
    config = replace(config, run=replace(config.run, output=absolute(config.run.output)))
    options = config.run.storage_options
    check_writable(config.run.output, options)
    teacher = load_teacher(config.teacher, options)
    metadata = ensure_metadata(config, teacher)
    info = {k: v for k, v in metadata.info.items() if k != "seeds"}
    print(json.dumps({"artifact": metadata.url, **info}, indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.manifest import inspect_run

    options = dict(_key_value(item) for item in args.storage_options)
    report = inspect_run(args.url, options, verify=args.verify)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["complete"] and not report.get("corrupt") else 1


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise InputError(f"--storage-option {item!r}: expected KEY=VALUE")
    return key, value


def cmd_teacher_train(args: argparse.Namespace) -> int:
    import torch

    from pipeline.images import open_image_folder
    from pipeline.teachers import save_checkpoint
    from pipeline.train import TrainConfig, evaluate, teacher_config_for, train_teacher

    logging.getLogger("dreamshard").setLevel(logging.INFO)
    try:
        config = TrainConfig(
            arch=args.arch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule=args.schedule,
            seed=args.seed,
        )
    except ValueError as error:
        raise InputError(f"teacher train: {error}") from error
    train_set = open_image_folder(args.data)
    images, labels = train_set.load(args.image_size)
    test = None
    if args.test:
        test = open_image_folder(args.test).load(args.image_size)
    num_classes = len(train_set.classes)
    torch.set_num_threads(torch.get_num_threads())
    model, info = train_teacher(config, images, labels, num_classes, test)
    extra = {"classes": train_set.classes, "epochs": config.epochs, "trained_on": args.data}
    if test is not None:
        result = evaluate(model, *test, config.mean, config.std, num_classes)
        extra["test_accuracy"] = result["accuracy"]
        extra["tested_on"] = args.test
    save_checkpoint(
        model, teacher_config_for(config, num_classes, args.image_size, args.out), args.out, **extra
    )
    print(json.dumps({"checkpoint": args.out, **extra, "seconds": info["seconds"]}, indent=2))
    return 0


def cmd_teacher_eval(args: argparse.Namespace) -> int:
    from pipeline.config import TeacherConfig
    from pipeline.images import open_image_folder
    from pipeline.teachers import load_checkpoint, load_teacher
    from pipeline.train import evaluate

    _, meta, _ = load_checkpoint(args.checkpoint)
    fields = {
        "arch": args.arch or meta.get("arch"),
        "num_classes": args.num_classes or meta.get("num_classes"),
        "image_size": args.image_size or meta.get("image_size", 32),
    }
    if not fields["arch"] or not fields["num_classes"]:
        raise InputError(
            "teacher eval: give --arch and --num-classes (the checkpoint carries no metadata)"
        )
    spec = {k: tuple(meta[k]) for k in ("mean", "std") if k in meta}
    config = TeacherConfig(checkpoint=args.checkpoint, **fields, **spec)
    teacher = load_teacher(config)
    images, labels = open_image_folder(args.data).subset(args.per_class).load(config.image_size)
    result = evaluate(teacher.model, images, labels, config.mean, config.std, config.num_classes)
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
