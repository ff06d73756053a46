"""Which shards to read: a source (a run folder, its ``manifest.json``, a shards folder,
a glob, or a list of tar URLs; local or ``s3://``) resolved to its complete shards, and
one shard read safely (sha256 against its sidecar, member names checked).

Plain WebDataset shards (tars without any dreamshard sidecar, from another tool or a
real-data baseline) are read too: their sample counts come from a wids index json next
to them when there is one, else from a first pass over the tars; they have no checksums,
which the log and the report say. Sidecars are read in one function,
:func:`shard_from_sidecar`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.errors import InputError
from pipeline.io.archives import UnsafeArchive, tar_files
from pipeline.io.shards import Sidecar, completed_shards
from pipeline.io.storage import absolute, exists, filesystem, join, read_bytes, read_json

log = logging.getLogger("dreamshard.evaluation")


class ShardError(InputError):
    """A shard is corrupt or unsafe (sha256 mismatch, bad member); the message names it."""


@dataclass(frozen=True)
class ShardRef:
    """One complete shard: its tar URL, sample count and sha256 (from the sidecar;
    ``None`` for a plain WebDataset shard, which is then read unverified)."""

    url: str
    samples: int
    sha256: str | None


@dataclass(frozen=True)
class ShardSet:
    """The resolved shards of a source plus what its manifest says (``{}`` without one)."""

    shards: list[ShardRef]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def summary(self) -> dict[str, Any]:
        """Count, samples and how the shards are checked (for reports)."""
        unverified = sum(s.sha256 is None for s in self.shards)
        checksums = (
            f"none for {unverified} of {len(self.shards)} shards: plain WebDataset shards "
            "without dreamshard sidecars, read unverified"
            if unverified
            else "sha256 of every tar checked against its sidecar"
        )
        return {"count": len(self.shards), "samples": self.samples, "checksums": checksums}


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
            sidecars = {url: shard_from_sidecar(url, options) for url in urls}
            return _non_empty(ShardSet(_complete(sidecars, True)), source)
        urls = _tars_in(run_url, "*.tar", options)
    elif isinstance(source, str):
        folder, _, pattern = source.rpartition("/")
        urls = _tars_in(folder, pattern, options) if "*" in source else [source]
    else:
        urls = list(source)
    shards = {url: shard_from_sidecar(url, options) for url in urls}
    if urls and not any(shards.values()) and not _in_dreamshard_run(urls[0], options):
        return _non_empty(ShardSet(plain_shards(urls, options)), str(source))
    return _non_empty(ShardSet(_complete(shards, allow_incomplete)), str(source))


def shard_from_sidecar(url: str, options: dict[str, Any] | None) -> ShardRef | None:
    """The shard at tar ``url`` as its sidecar describes it; ``None`` without a sidecar.

    The only reader of sidecar files in ``evaluation``, through the pipeline's :class:`Sidecar`.
    """
    location = url.removesuffix(".tar") + ".json"
    if not exists(location, options):
        return None
    sidecar = Sidecar.load(location, options)
    return ShardRef(url, samples=sidecar.samples, sha256=sidecar.sha256)


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


def _complete(shards: dict[str, ShardRef | None], allow_incomplete: bool) -> list[ShardRef]:
    missing = [url for url, shard in shards.items() if shard is None]
    if missing:
        _refuse_unless(
            allow_incomplete, f"{len(missing)} shard(s) without a sidecar (first: {missing[0]})"
        )
    return [shard for shard in shards.values() if shard is not None]


def _in_dreamshard_run(url: str, options: dict[str, Any] | None) -> bool:
    """Whether the tar lies in a dreamshard run's ``shards`` folder (``run.json`` above)."""
    folder = url.rsplit("/", 1)[0]
    return folder.endswith("/shards") and exists(
        join(folder.removesuffix("/shards"), "run.json"), options
    )


def plain_shards(urls: list[str], options: dict[str, Any] | None) -> list[ShardRef]:
    """Tars without sidecars: counts from a wids index json next to them, else a first
    pass over each tar; no sha256 (logged, and reported by :meth:`ShardSet.summary`)."""
    index = wids_counts(urls[0].rsplit("/", 1)[0], options)
    counted = [u for u in urls if u.rsplit("/", 1)[-1] not in index]
    log.warning(
        "%d plain WebDataset shard(s) without dreamshard sidecars: no checksums, the tars "
        "are read unverified; samples counted %s",
        len(urls),
        f"by a first pass over {len(counted)} tar(s)" if counted else "from the wids index",
    )
    return [
        ShardRef(u, index.get(u.rsplit("/", 1)[-1]) or count_samples(u, options), None)
        for u in urls
    ]


def wids_counts(folder: str, options: dict[str, Any] | None) -> dict[str, int]:
    """``{tar name: samples}`` from a wids shard index (``{"shardlist": [{"url",
    "nsamples"}, …]}``) among the json files of ``folder``; ``{}`` without one."""
    fs, path = filesystem(folder, options)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    counts: dict[str, int] = {}
    for name in sorted(n for n in names if n.endswith(".json")):
        try:
            index = read_json(join(folder, name), options)
        except ValueError:  # not json: not an index
            continue
        entries = index.get("shardlist") if isinstance(index, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("nsamples"), int):
                counts[str(entry.get("url", "")).rsplit("/", 1)[-1]] = entry["nsamples"]
    return counts


def count_samples(url: str, options: dict[str, Any] | None = None) -> int:
    """Samples in the tar at ``url`` (distinct keys), streamed, members checked."""
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        return len({sample_key(name)[0] for name, _ in _files(f, url)})


def first_sample(shard: ShardRef, options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The first sample of a shard (``{extension: bytes}`` with ``__key__``), reading only
    the head of the tar (unverified: the sha256 needs the whole tar)."""
    fs, path = filesystem(shard.url, options)
    sample: dict[str, bytes] = {}
    with fs.open(path, "rb") as f:
        for name, data in _files(f, shard.url):
            key, extension = sample_key(name)
            if sample and sample["__key__"] != key.encode():
                break
            sample.setdefault("__key__", key.encode())
            sample[extension] = data
    return sample


def sample_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a tar member, as webdataset splits it: the key is the path
    up to the first dot of the file name (``a/b.seg.png`` -> ``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def _files(stream: IO[bytes], url: str) -> Iterator[tuple[str, bytes]]:
    """The tar's plain files (the one checked reader), an unsafe member a ShardError."""
    try:
        yield from tar_files(stream, url)
    except UnsafeArchive as error:
        raise ShardError(str(error)) from None


def read_shard(shard: ShardRef, options: dict[str, Any] | None = None) -> list[dict[str, bytes]]:
    """The samples of one shard as ``{extension: bytes}`` dicts (with ``__key__``), in order.

    The whole tar is read and hashed first: a sha256 that differs from the sidecar's, a
    member with an absolute path or ``..``, or a link is a :class:`ShardError`. A plain
    shard (no sha256) is read unverified. Folder members are skipped.
    """
    data = read_bytes(shard.url, options)
    digest = hashlib.sha256(data).hexdigest()
    if shard.sha256 is not None and digest != shard.sha256:
        raise ShardError(
            f"{shard.url}: sha256 {digest[:16]}… does not match its sidecar's "
            f"{shard.sha256[:16]}…; the shard is corrupt, regenerate it (rerun the run)"
        )
    samples: dict[str, dict[str, bytes]] = {}
    for name, content in _files(io.BytesIO(data), shard.url):
        key, extension = sample_key(name)
        entry = samples.setdefault(key, {"__key__": key.encode()})
        entry[extension] = content
    return list(samples.values())
