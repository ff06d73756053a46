"""Which shards to read: a source (a run folder, its ``manifest.json``, a shards folder,
a glob, or a list of tar URLs; local or ``s3://``) resolved to its complete shards, and
one shard read safely (sha256 against its sidecar, member names checked)."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import InputError
from pipeline.io.archives import UnsafeArchive, check_member
from pipeline.io.shards import completed_shards
from pipeline.io.storage import absolute, exists, filesystem, join, read_bytes, read_json

log = logging.getLogger("dreamshard.evaluation")


class ShardError(InputError):
    """A shard is corrupt or unsafe (sha256 mismatch, bad member); the message names it."""


@dataclass(frozen=True)
class ShardRef:
    """One complete shard: its tar URL, sample count and sha256 (from the sidecar)."""

    url: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """The resolved shards of a source plus what its manifest says (``{}`` without one)."""

    shards: list[ShardRef]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def resolve_shards(
    source: str | list[str],
    options: dict[str, Any] | None = None,
    allow_incomplete: bool = False,
) -> ShardSet:
    """The complete shards of ``source``; :class:`InputError` for an incomplete run.

    ``source``: a run folder (``OUTPUT/RUN``) or its ``manifest.json``, a ``shards``
    folder, a glob (``…/shards/train-*.tar``), or a list of tar URLs. A run without its
    manifest, or a tar without its sidecar, is incomplete: refused unless
    ``allow_incomplete``, in which case only the shards with sidecars are used.
    """
    # absolute: Ray Train workers run in other folders
    source = absolute(source) if isinstance(source, str) else [absolute(u) for u in source]
    if isinstance(source, str) and not source.endswith(".tar") and "*" not in source:
        run_url = source.removesuffix("/manifest.json").rstrip("/")
        if exists(join(run_url, "manifest.json"), options):
            manifest = read_json(join(run_url, "manifest.json"), options)
            shards = [
                ShardRef(s.get("url") or join(run_url, "shards", f"{s['name']}.tar"), **_counts(s))
                for s in manifest["shards"]
            ]
            return _non_empty(ShardSet(shards, manifest), source)
        if exists(join(run_url, "run.json"), options):
            _refuse_unless(allow_incomplete, f"{source}: the run has no manifest.json yet")
            done = sorted(completed_shards(run_url, options))
            urls = [join(run_url, "shards", f"{name}.tar") for name in done]
            return _non_empty(ShardSet(_with_sidecars(urls, options, True)), source)
        urls = _tars_in(run_url, "*.tar", options)
    elif isinstance(source, str):
        folder, _, pattern = source.rpartition("/")
        urls = _tars_in(folder, pattern, options) if "*" in source else [source]
    else:
        urls = list(source)
    return _non_empty(ShardSet(_with_sidecars(urls, options, allow_incomplete)), str(source))


def _counts(entry: dict[str, Any]) -> dict[str, Any]:
    return {"samples": int(entry["samples"]), "sha256": entry["sha256"]}


def _refuse_unless(allowed: bool, message: str) -> None:
    if not allowed:
        raise InputError(f"{message}: it is incomplete; pass --allow-incomplete to use its shards")
    log.warning("%s; using only the shards with sidecars", message)


def _non_empty(shards: ShardSet, source: str) -> ShardSet:
    if not shards.shards:
        raise InputError(f"{source}: no complete shards found")
    return shards


def _tars_in(folder: str, pattern: str, options: dict[str, Any] | None) -> list[str]:
    fs, path = filesystem(folder, options)
    if fs.isdir(join(path, "shards")):
        folder, path = join(folder, "shards"), join(path, "shards")
    if not fs.isdir(path):
        raise InputError(f"{folder}: no such folder (expected a run, its shards, or tar URLs)")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True))
    return [join(folder, n) for n in names if n.endswith(".tar") and fnmatch.fnmatch(n, pattern)]


def _with_sidecars(
    urls: list[str], options: dict[str, Any] | None, allow_incomplete: bool
) -> list[ShardRef]:
    shards, missing = [], []
    for url in urls:
        sidecar = url.removesuffix(".tar") + ".json"
        if not exists(sidecar, options):
            missing.append(url)
            continue
        stats = read_json(sidecar, options)
        shards.append(ShardRef(url, **_counts(stats)))
    if missing:
        _refuse_unless(
            allow_incomplete, f"{len(missing)} shard(s) without a sidecar (first: {missing[0]})"
        )
    return shards


def read_shard(shard: ShardRef, options: dict[str, Any] | None = None) -> list[dict[str, bytes]]:
    """The samples of one shard as ``{extension: bytes}`` dicts (with ``__key__``), in order.

    The whole tar is read and hashed first: a sha256 that differs from the sidecar's, a
    member with an absolute path or ``..``, or a link is a :class:`ShardError`.
    """
    data = read_bytes(shard.url, options)
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ShardError(
            f"{shard.url}: sha256 {digest[:16]}… does not match its sidecar's "
            f"{shard.sha256[:16]}…; the shard is corrupt, regenerate it (rerun the run)"
        )
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            name = member.name
            try:
                check_member(member, shard.url)
            except UnsafeArchive as error:
                raise ShardError(str(error)) from None
            if not member.isfile():
                raise ShardError(f"{shard.url}: unsafe tar member {name!r} (only plain files)")
            base = name.rsplit("/", 1)[-1]
            key, _, extension = base.partition(".")
            entry = samples.setdefault(key, {"__key__": key.encode()})
            entry[extension] = tar.extractfile(member).read()
    return list(samples.values())
