"""``dreamshard counterfactual``: IMAGINE's counterfactual explanation (Eq. 13) of one
query image, from the command line.

The config gives the teacher and the ``imagine`` synthesizer's fields (its other
sections are validated but unused). Regions are mask images: pixels above half
brightness are the region. Writes ``counterfactual-{i}.png`` (the variations),
``sheet.png`` (query | example | variations) and ``counterfactual.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import io
from typing import TYPE_CHECKING, Any

from pipeline.cli.arguments import config_command
from pipeline.errors import InputError

if TYPE_CHECKING:  # torch is imported when the command runs: the CLI starts fast
    import numpy as np
    import torch


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``counterfactual`` to the top-level subcommands."""
    parser = config_command(
        commands,
        "counterfactual",
        "why class A and not B: the query with a region of an image of class B translated in",
        cmd_counterfactual,
        config_help="a config whose teacher and synthesizer (imagine) sections are used",
    )
    parser.add_argument("--query", required=True, help="the image to explain (URL)")
    parser.add_argument("--query-region", required=True, help="mask image of its region")
    parser.add_argument("--example", required=True, help="an image of the counterfactual class")
    parser.add_argument("--example-region", required=True, help="mask image of its region")
    parser.add_argument("--out", required=True, help="folder (URL) for the results")
    parser.add_argument("--target-class", type=int, help="default: the teacher's call on --example")
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    import json

    from pipeline.config import load_config
    from pipeline.io.images import contact_sheet
    from pipeline.io.storage import atomic_open, check_writable, join, write_json
    from pipeline.models.teachers import load_teacher
    from synthesizers.imagine_counterfactual import counterfactual

    config = load_config(args.config, args.overrides)
    if config.synthesizer.name != "imagine":
        raise InputError(
            f"{args.config}: synthesizer.name is {config.synthesizer.name!r}; the counterfactual "
            "needs an imagine config (e.g. configs/cifar10-imagine.yaml)"
        )
    if args.variations < 1:
        raise InputError(f"--variations must be positive, got {args.variations}")
    options = config.run.storage_options
    size = config.teacher.image_size
    query, example = (read_image(url, size, options) for url in (args.query, args.example))
    regions = [read_mask(url, size, options) for url in (args.query_region, args.example_region)]
    check_writable(args.out, options)
    teacher = load_teacher(config.teacher, options)
    classes = config.teacher.num_classes
    if args.target_class is not None and not 0 <= args.target_class < classes:
        raise InputError(f"--target-class {args.target_class}: the teacher has {classes} classes")
    try:
        result = counterfactual(
            teacher.model,
            query,
            regions[0],
            example,
            regions[1],
            config.teacher.mean,
            config.teacher.std,
            config.synthesizer.params,
            seed=args.seed,
            target_class=args.target_class,
            variations=args.variations,
        )
    except ValueError as error:
        raise InputError(f"counterfactual: {error}") from error
    pixels = [to_pixels(image) for image in result.images]
    for i, image in enumerate(pixels):
        with atomic_open(join(args.out, f"counterfactual-{i}.png"), options) as f:
            f.write(png(image))
    sheet = contact_sheet([[to_pixels(query), to_pixels(example), *pixels]], size, 2 + len(pixels))
    with atomic_open(join(args.out, "sheet.png"), options) as f:
        f.write(sheet)
    target = int(result.labels[0])
    summary: dict[str, Any] = {
        "query": args.query,
        "example": args.example,
        "target_class": target,
        "confidence_in_target": [round(float(p[target]), 4) for p in result.probs],
        "losses": {k: round(v, 6) for k, v in result.losses.items()},
        "seconds": round(result.seconds, 3),
    }
    write_json(join(args.out, "counterfactual.json"), summary, options)
    print(json.dumps(summary, indent=2))
    return 0


def read_image(url: str, size: int, options: dict[str, Any]) -> torch.Tensor:
    """An image file as RGB (3, S, S) in [0, 1]; InputError naming an unreadable one."""
    from pipeline.io.images import decode
    from pipeline.io.storage import read_bytes

    try:
        data = read_bytes(url, options)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputError(f"{url}: no such file") from error
    import torch

    return torch.from_numpy(decode(data, url, size).copy()).permute(2, 0, 1).float() / 255.0


def read_mask(url: str, size: int, options: dict[str, Any]) -> torch.Tensor:
    """A mask image as 0/1 (S, S): pixels above half brightness are the region."""
    mask = (read_image(url, size, options).mean(dim=0) > 0.5).float()
    if not mask.any():
        raise InputError(f"{url}: the region mask is empty (no pixel above half brightness)")
    return mask


def to_pixels(image: torch.Tensor) -> np.ndarray:
    import torch

    return (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
