"""``dreamshard teacher train`` and ``teacher eval``.

The training defaults live in one place, :class:`pipeline.models.training.TrainConfig`:
an option left out here takes the dataclass's value.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.errors import InputError

TRAIN_OPTIONS = ("arch", "epochs", "batch_size", "lr", "schedule", "seed")


def add_commands(commands: argparse._SubParsersAction) -> None:
    teacher = commands.add_parser("teacher", help="train or evaluate a teacher")
    actions = teacher.add_subparsers(required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a classifier on class folders")
    train.add_argument("--data", required=True, help="class-folder training images (URL)")
    train.add_argument("--test", help="class-folder test images, evaluated every epoch")
    train.add_argument("--out", required=True, help="where to write the checkpoint (URL)")
    train.add_argument("--arch", help="architecture (default resnet20)")
    train.add_argument("--epochs", type=int, help="default 15")
    train.add_argument("--batch-size", type=int, help="default 256")
    train.add_argument("--lr", type=float, help="peak learning rate (default 0.2)")
    train.add_argument("--schedule", choices=["onecycle", "cosine"], help="default onecycle")
    train.add_argument("--image-size", type=int, default=32)
    train.add_argument("--seed", type=int, help="default 0")
    train.set_defaults(handler=cmd_teacher_train)

    evaluate = actions.add_parser("eval", help="accuracy on class-folder images")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True, help="class-folder test images (URL)")
    evaluate.add_argument("--arch", help="defaults to the checkpoint's own metadata")
    evaluate.add_argument("--num-classes", type=int)
    evaluate.add_argument("--image-size", type=int)
    evaluate.add_argument("--per-class", type=int, help="first N images of each class")
    evaluate.set_defaults(handler=cmd_teacher_eval)


# The handlers import torch when they run, so that the command line itself starts fast.


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from pipeline.io.images import open_image_folder
    from pipeline.models.accuracy import classifier_accuracy
    from pipeline.models.teachers import save_checkpoint
    from pipeline.models.training import TrainConfig, teacher_config_for, train_teacher

    logging.getLogger("dreamshard").setLevel(logging.INFO)
    given = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    try:
        config = TrainConfig(**given)
    except ValueError as error:
        raise InputError(f"teacher train: {error}") from error
    train_set = open_image_folder(args.data)
    images, labels = train_set.load(args.image_size)
    test = None
    if args.test:
        test = open_image_folder(args.test).load(args.image_size)
    num_classes = len(train_set.classes)
    model, info = train_teacher(config, images, labels, num_classes, test)
    extra = {"classes": train_set.classes, "epochs": config.epochs, "trained_on": args.data}
    if test is not None:
        result = classifier_accuracy(model, *test, config.mean, config.std, num_classes)
        extra["test_accuracy"] = result["accuracy"]
        extra["tested_on"] = args.test
    save_checkpoint(
        model, teacher_config_for(config, num_classes, args.image_size, args.out), args.out, **extra
    )
    print(json.dumps({"checkpoint": args.out, **extra, "seconds": info["seconds"]}, indent=2))
    return 0


def cmd_teacher_eval(args: argparse.Namespace) -> int:
    from pipeline.config import TeacherConfig
    from pipeline.io.images import open_image_folder
    from pipeline.models.accuracy import classifier_accuracy
    from pipeline.models.teachers import load_checkpoint, load_teacher

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
    result = classifier_accuracy(
        teacher.model, images, labels, config.mean, config.std, config.num_classes
    )
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result}, indent=2))
    return 0
