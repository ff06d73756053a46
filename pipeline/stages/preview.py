"""A run's ``preview.png``: a contact sheet, one row per class, a few samples each.

Its size does not grow with the teacher: at most :data:`MAX_CLASSES` rows (a teacher
with more classes shows the first ones that have samples, in ``plan.classes`` order),
:data:`PER_CLASS` columns, and tiles of at most :data:`MAX_TILE` pixels (larger images
are shrunk; smaller ones are enlarged, nearest, to about 256 px as before). Only shards
whose sidecar lists a class still short of samples are read, and only that class's
samples are decoded: the sheet of a 1,000-class, 224×224 run is at most 1,042 × 2,082 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.io.images import contact_sheet
from pipeline.io.integrity import shard_images
from pipeline.io.shards import Sidecar
from pipeline.io.storage import atomic_open, join

MAX_CLASSES = 16  # rows of the sheet
PER_CLASS = 8  # columns
MAX_TILE = 128  # pixels of a tile made from a larger image
ENLARGE_TO = 256  # pixels a smaller image is enlarged to (nearest)


def preview_classes(classes: list[int], sidecars: list[Sidecar], limit: int) -> list[int]:
    """The classes the sheet shows: all of them when there are at most ``limit``, else
    the first ``limit`` (in ``classes`` order) that have samples in some shard."""
    if len(classes) <= limit:
        return list(classes)
    present = {int(k) for s in sidecars for k, count in s.classes.items() if count}
    return [c for c in classes if c in present][:limit]


def tile(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 shrunk to (size, size, 3) when it is larger."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def write_preview(
    run_url: str,
    sidecars: list[Sidecar],
    config: Config,
    options: dict[str, Any] | None,
    per_class: int = PER_CLASS,
    max_classes: int = MAX_CLASSES,
) -> dict[str, Any]:
    """Write ``preview.png``; returns what it shows (for the manifest and the card)."""
    shown = preview_classes(config.classes, sidecars, max_classes)
    found: dict[int, list[np.ndarray]] = {c: [] for c in shown}
    size = min(config.teacher.image_size, MAX_TILE)
    for sidecar in sidecars:
        short = {c for c in shown if len(found[c]) < per_class}
        if not short:
            break
        listed = {int(k) for k in sidecar.classes}
        if listed and not listed & short:  # an empty histogram: a sidecar without one
            continue
        # shard_images names a damaged shard
        for label, image in shard_images(run_url, sidecar.shard, options, short):
            if len(found[label]) < per_class:
                found[label].append(tile(image, size))
    enlarge = ENLARGE_TO if config.teacher.image_size <= MAX_TILE else size
    png = contact_sheet([found[c] for c in shown], size, per_class, scale_to=enlarge)
    with atomic_open(join(run_url, "preview.png"), options) as f:
        f.write(png)
    return {"classes": shown, "classes_total": len(config.classes), "per_class": per_class}
