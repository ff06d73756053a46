"""Which completed shards are intact, and discarding the ones that are not.

A shard is complete when its tar and its sidecar both exist (:func:`completed_shards`).
It is *intact* when, moreover, the sidecar reads back and the tar has the size the
sidecar records (``Sidecar.bytes``); with ``verify`` also the sha256 it records. The
size check is cheap: one listing of the shards folder gives every tar's size, and the
sidecars (which the manifest step reads anyway) are fetched in one batched call
(concurrent requests on an object store). Hashing reads every tar: only when asked.

A damaged shard is discarded, sidecar first (a shard without its sidecar does not
exist, so a crash in between leaves it missing, never half-trusted), then its tar; the
stage that owns the shard then regenerates it like any missing one.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from typing import Any

import numpy as np

from pipeline.errors import RunError
from pipeline.io.retries import is_transient
from pipeline.io.shards import (
    Sidecar,
    complete,
    listing,
    read_images,
    shard_sha256,
    shard_url,
    sidecar_url,
)
from pipeline.io.storage import filesystem

log = logging.getLogger("dreamshard.integrity")
REPAIR_HINT = (
    "rerun with --verify (dreamshard run CONFIG --verify, or dreamshard inspect --verify "
    "--repair RUN) to regenerate it"
)


class ShardDamaged(RunError):
    """A complete shard whose tar does not read back (exit 1; the message names it)."""

    def __init__(self, name: str, url: str, why: str) -> None:
        super().__init__(f"shard {name} ({url}) is damaged ({why}); {REPAIR_HINT}")
        self.name = name


def shard_images(
    run_url: str,
    name: str,
    options: dict[str, Any] | None = None,
    labels: set[int] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """(label, image) pairs of a complete shard (of the classes in ``labels`` when
    given), in order; :class:`ShardDamaged` naming it when the tar does not read back
    (a transient storage error is raised as is)."""
    url = shard_url(run_url, name)
    try:
        return read_images(url, None, options, labels)
    except (tarfile.TarError, EOFError, zlib.error, SyntaxError, ValueError, OSError) as error:
        if is_transient(error):
            raise
        raise ShardDamaged(name, url, f"{type(error).__name__}: {error}") from error


def read_sidecars(
    run_url: str, names: list[str], options: dict[str, Any] | None = None
) -> dict[str, Sidecar | None]:
    """The sidecars of ``names`` in one batched read; ``None`` for one that does not read
    back as a sidecar (gone, not JSON, not an object with the required fields)."""
    if not names:
        return {}
    fs, _ = filesystem(run_url, options)
    paths = {filesystem(sidecar_url(run_url, n), options)[1]: n for n in names}
    blobs = fs.cat(list(paths), on_error="return")
    sidecars: dict[str, Sidecar | None] = {}
    for path, name in paths.items():
        blob = blobs.get(path)
        try:
            if isinstance(blob, BaseException) or blob is None:
                raise ValueError("unreadable")
            sidecars[name] = Sidecar.from_json(json.loads(blob))
        except (ValueError, TypeError, AttributeError):  # not JSON, not a sidecar's fields
            sidecars[name] = None
    return sidecars


def damaged_shards(
    run_url: str,
    options: dict[str, Any] | None = None,
    verify: bool = False,
    files: dict[str, int] | None = None,
) -> dict[str, str]:
    """The complete shards that are not intact, each with why (for messages). ``files``:
    the shards folder's :func:`listing`, when the caller has it."""
    files = listing(run_url, options) if files is None else files
    damaged: dict[str, str] = {}
    for name, sidecar in read_sidecars(run_url, sorted(complete(files)), options).items():
        size = files[f"{name}.tar"]
        if sidecar is None:
            damaged[name] = "its sidecar does not read back"
        elif sidecar.bytes and size != sidecar.bytes:  # bytes 0: a sidecar without sizes
            damaged[name] = f"the tar has {size} bytes, its sidecar says {sidecar.bytes}"
        elif verify and shard_sha256(shard_url(run_url, name), options) != sidecar.sha256:
            damaged[name] = "the tar's sha256 differs from its sidecar's"
    return damaged


def discard(run_url: str, names: list[str], options: dict[str, Any] | None = None) -> None:
    """Remove each shard's sidecar, then its tar (whichever exists)."""
    fs, _ = filesystem(run_url, options)
    for name in names:
        for url in (sidecar_url(run_url, name), shard_url(run_url, name)):
            path = filesystem(url, options)[1]
            if fs.exists(path):
                fs.rm(path)


def intact_shards(
    run_url: str, options: dict[str, Any] | None = None, verify: bool = False
) -> set[str]:
    """The complete shards that are intact. Damaged ones are discarded (and logged) so
    that the caller regenerates them with the missing ones. Call it only while no writer
    of this run is running (the run's lease held)."""
    files = listing(run_url, options)
    damaged = damaged_shards(run_url, options, verify, files)
    for name, why in damaged.items():
        log.warning("shard %s is damaged (%s): regenerating it", name, why)
    discard(run_url, sorted(damaged), options)
    return complete(files) - set(damaged)
