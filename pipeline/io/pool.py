"""Unlabeled image pools, listed as independent tasks and streamed from any fsspec URL.

A pool is a folder of images (any depth, no classes), a ``.tar``/``.tar.gz``/``.tgz``
of images, or WebDataset shards (a folder of tars, or a glob such as
``s3://bucket/pool/shard-*.tar``). Every tar is one task, streamed member by member;
loose files are grouped ``files_per_task`` at a time. A task yields ``(key, bytes)`` in
a fixed order, so a second pass over the same task sees the same items in the same
positions. Nothing here holds more than one item of a task in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io.archives import tar_files
from pipeline.io.images import IMAGE_SUFFIXES, decode
from pipeline.io.storage import filesystem

log = logging.getLogger("dreamshard.pool")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class PoolTask:
    """A piece of the pool: one tar (``files`` empty) or a list of image files."""

    index: int
    url: str  # the tar's URL, or the pool folder's URL for loose files
    files: tuple[str, ...] = ()  # paths inside the filesystem, for loose files

    @property
    def is_tar(self) -> bool:
        return not self.files


def protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def list_pool(
    url: str,
    options: dict[str, Any] | None = None,
    files_per_task: int = 1024,
    where: str = "retrieval.pool",
) -> list[PoolTask]:
    """The tasks of the pool at ``url``; :class:`InputError` (naming the config field
    ``where``) when it holds no image."""
    fs, path = filesystem(url, options)
    prefix = protocol_prefix(url)
    if any(c in url for c in GLOB_CHARACTERS):
        tars = sorted(p for p in fs.glob(path) if p.lower().endswith(TAR_SUFFIXES))
        files: list[str] = []
    elif url.lower().endswith(TAR_SUFFIXES):
        if not fs.isfile(path):
            raise InputError(f"{where}: {url}: no such file")
        return [PoolTask(0, url)]
    elif fs.isdir(path):
        found = sorted(fs.find(path))
        tars = [p for p in found if p.lower().endswith(TAR_SUFFIXES)]
        files = [p for p in found if p.lower().endswith(IMAGE_SUFFIXES)]
    else:
        raise InputError(f"{where}: {url}: no such folder or file")
    tasks = [PoolTask(i, prefix + p if prefix else p) for i, p in enumerate(tars)]
    for start in range(0, len(files), files_per_task):
        tasks.append(PoolTask(len(tasks), url, tuple(files[start : start + files_per_task])))
    if not tasks:
        raise InputError(
            f"{where}: {url} is empty (no image files, no .tar/.tar.gz shards); "
            f"images end in {', '.join(IMAGE_SUFFIXES)}"
        )
    return tasks


def known_size(tasks: list[PoolTask]) -> int | None:
    """The number of pool images when every task is a file list (tars are unknown)."""
    return None if any(t.is_tar for t in tasks) else sum(len(t.files) for t in tasks)


def stream(task: PoolTask, options: dict[str, Any] | None = None) -> Iterator[tuple[str, bytes]]:
    """``(key, bytes)`` of every image in the task, in a fixed order. A file that cannot
    be read yields empty bytes (it is then counted as skipped, not fatal)."""
    fs, path = filesystem(task.url, options)
    if not task.is_tar:
        for file in task.files:
            try:
                with fs.open(file, "rb") as f:
                    data = f.read()
            except OSError as error:
                log.warning("pool file %s cannot be read: %s", file, error)
                data = b""
            yield file, data
        return
    with fs.open(path, "rb") as raw:
        for name, data in tar_files(raw, task.url):
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield name, data


def decode_or_none(data: bytes, name: str, image_size: int) -> np.ndarray | None:
    """RGB uint8 (S, S, 3) resized to the teacher's resolution, or None when the bytes
    are not a readable image (empty, truncated, not an image, too large)."""
    try:
        return decode(data, name, image_size)
    except Exception:  # InputError, and whatever else a malformed file makes PIL raise
        return None
