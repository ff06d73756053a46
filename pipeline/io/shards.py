"""The one shard writer: a tar of WebDataset samples, its sha256, then the typed sidecar
that marks it complete. Every stage writes through :func:`write_shard`, and every reader
of sidecars goes through :class:`Sidecar`.

A sample is ``__key__`` = ``{shard:06d}-{slot:05d}``, ``png`` (lossless RGB), ``cls``
(ASCII class index), ``json`` (teacher label and confidence, the stage's own fields) and
optionally ``logits.npy`` (float16 teacher logits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.io.archives import tar_files
from pipeline.io.retries import with_retries
from pipeline.io.storage import (
    atomic_open,
    endpoint_of,
    filesystem,
    join,
    protocol_of,
    read_json,
    write_json,
)
from pipeline.node import this_node

FIXED_MTIME = 0.0  # reproducible tar bytes
T = TypeVar("T")


def shard_name(split: str, index: int) -> str:
    """A shard's name: ``{split}-{index:06d}``."""
    return f"{split}-{index:06d}"


def sample_key(index: int, slot: int) -> str:
    """A sample's WebDataset ``__key__``: ``{shard index:06d}-{slot:05d}``."""
    return f"{index:06d}-{slot:05d}"


def shard_url(run_url: str, name: str) -> str:
    return join(run_url, "shards", f"{name}.tar")


def sidecar_url(run_url: str, name: str) -> str:
    return join(run_url, "shards", f"{name}.json")


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    info: dict[str, Any]  # goes to the sample's json
    logits: np.ndarray | None = None  # (K,)


@dataclass
class Sidecar:
    """A shard's completion record (``{split}-{index:06d}.json`` beside the tar).

    Every shard written here has the first block; the stage that wrote it fills in its own
    fields and leaves the others ``None`` (they are not written). A reader needs only
    ``shard``, ``samples`` and ``sha256`` (a sidecar another tool wrote may hold no more).
    """

    shard: str
    samples: int
    sha256: str
    classes: dict[str, int] = field(default_factory=dict)  # label (a string) -> samples
    bytes: int = 0
    seconds: float = 0.0
    device: str = ""
    node: dict[str, str] = field(default_factory=dict)  # hostname, ray_node_id: who wrote it
    index: list[list[Any]] = field(default_factory=list)  # key, label, confidence, seed|distance
    # storage retries the tar and this sidecar needed, together (each sidecar attempt
    # carries its own count: the one that landed says how many went before it)
    write_retries: int = 0
    # synthesis
    planned: int | None = None
    accepted: int | None = None
    rejected: int | None = None
    synthesized: int | None = None
    attempts: int | None = None
    nonfinite_seeds: list[int] | None = None
    per_class: dict[str, dict[str, int]] | None = None
    seed: int | None = None
    synthesis_seconds: float | None = None
    peak_rss_bytes: int | None = None
    # retrieval
    pool_task: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sidecar:
        """A sidecar from its json (fields this version does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, run_url: str, name: str, options: dict[str, Any] | None = None) -> Sidecar:
        """The sidecar of shard ``name`` of the run at ``run_url``."""
        return cls.load(sidecar_url(run_url, name), options)

    @classmethod
    def load(cls, url: str, options: dict[str, Any] | None = None) -> Sidecar:
        """The sidecar at ``url`` (beside its tar: ``{name}.json``; a sidecar that does not
        name its shard is named by its file)."""
        data = read_json(url, options)
        data.setdefault("shard", url.rsplit("/", 1)[-1].removesuffix(".json"))
        return cls.from_json(data)


def class_histogram(labels: list[int]) -> dict[str, int]:
    """Samples per class, by ascending class, keys as strings (JSON)."""
    return {str(k): v for k, v in sorted(Counter(labels).items())}


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class HashingWriter:
    """A write-only stream that hashes and counts what passes through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def write_tar(
    url: str,
    samples: list[Sample],
    options: dict[str, Any] | None = None,
    single_attempt: bool = False,
) -> tuple[str, int]:
    """Write ``samples`` as one tar at ``url``; returns (sha256, bytes).

    The file is opened with fsspec and wrapped in ``webdataset.TarWriter``; both are
    closed explicitly, and the upload is visible only once complete. ``single_attempt``:
    the caller retries (see :func:`pipeline.io.storage.filesystem`).
    """
    with atomic_open(url, options, single_attempt) as f:
        stream = HashingWriter(f)
        writer = wds.TarWriter(stream, encoder=False, mtime=FIXED_MTIME)
        try:
            for sample in samples:
                record = {
                    "__key__": sample.key,
                    "png": encode_png(sample.image),
                    "cls": str(sample.label).encode(),
                    "json": json.dumps(sample.info, sort_keys=True).encode(),
                }
                if sample.logits is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, sample.logits.astype(np.float16))
                    record["logits.npy"] = buffer.getvalue()
                writer.write(record)
        finally:
            writer.close()
    return stream.sha256.hexdigest(), stream.size


@dataclass(frozen=True)
class ShardStore:
    """Where a stage's shards go and how hard to retry a write: the run folder, its
    storage options, and ``runtime.io_retries`` / ``runtime.io_backoff_s``."""

    run_url: str
    options: dict[str, Any] | None = None
    retries: int = 0
    backoff_s: float = 1.0

    @classmethod
    def for_run(cls, run: Any, runtime: Any) -> ShardStore:
        """The store of a run section (``run_url``, ``storage_options``) with a runtime
        section's retry budget (``io_retries``, ``io_backoff_s``)."""
        return cls(run.run_url, run.storage_options, runtime.io_retries, runtime.io_backoff_s)

    def write(self, name: str, samples: list[Sample], index_field: str, **fields: Any) -> Sidecar:
        """The tar, then the sidecar (the completion mark); both atomic and retried on
        transient storage errors. ``index_field`` names the sample json field that ends
        each index row (``seed`` or ``distance``); ``fields`` are the stage's own."""
        url = shard_url(self.run_url, name)
        tries = [0]

        def tar() -> tuple[str, int]:
            tries[0] += 1
            return write_tar(url, samples, self.options, single_attempt=True)

        sha256, size = self._retrying(tar, url)
        sidecar = Sidecar(
            shard=name,
            samples=len(samples),
            classes=class_histogram([s.label for s in samples]),
            sha256=sha256,
            bytes=size,
            index=[[s.key, s.label, s.info["confidence"], s.info[index_field]] for s in samples],
            write_retries=tries[0] - 1,
            node=this_node(),
            **fields,
        )
        target = sidecar_url(self.run_url, name)

        def mark() -> None:
            tries[0] += 1
            sidecar.write_retries = tries[0] - 2  # the tar's one success is not a retry
            write_json(target, sidecar.to_json(), self.options, single_attempt=True)

        self._retrying(mark, target)
        return sidecar

    def _retrying(self, action: Callable[[], T], url: str) -> T:
        endpoint = endpoint_of(url, self.options)
        return with_retries(action, url, self.retries, self.backoff_s, endpoint)

    def completed(self) -> set[str]:
        return completed_shards(self.run_url, self.options)


def listing(run_url: str, options: dict[str, Any] | None = None) -> dict[str, int]:
    """Every file of the run's shards folder, by file name, with its size (one listing)."""
    fs, path = filesystem(join(run_url, "shards"), options)
    try:
        entries = fs.ls(path, detail=True, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}


def complete(files: dict[str, int] | set[str]) -> set[str]:
    """The shards of a listing that have both their tar and their sidecar."""
    return {n[:-5] for n in files if n.endswith(".json") and f"{n[:-5]}.tar" in files}


def completed_shards(run_url: str, options: dict[str, Any] | None = None) -> set[str]:
    """Names of the shards whose sidecar exists (the others do not exist)."""
    return complete(listing(run_url, options))


def remove_partials(run_url: str, options: dict[str, Any] | None = None) -> list[str]:
    """Delete the temporary ``*.partial-*`` files a killed writer left in a local run's
    shards folder (object stores have none: an unfinished upload is never visible).
    Call it only while no writer of this run is running; returns the names removed."""
    if protocol_of(run_url) != "file":
        return []
    fs, path = filesystem(join(run_url, "shards"), options)
    if not fs.exists(path):
        return []
    stale = [p for p in fs.ls(path, detail=False) if ".partial-" in p.rsplit("/", 1)[-1]]
    for entry in stale:
        fs.rm(entry)
    return [entry.rsplit("/", 1)[-1] for entry in stale]


def shard_sha256(url: str, options: dict[str, Any] | None = None) -> str:
    fs, path = filesystem(url, options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_images(
    url: str,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    labels: set[int] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """(label, image) pairs from a shard, in order, without webdataset (for previews):
    the first ``limit`` samples, of the classes in ``labels`` when given. Samples are
    decoded one at a time as their ``png`` and ``cls`` arrive, and only the wanted ones,
    so a shard of large images is never held whole."""
    fs, path = filesystem(url, options)
    pending: dict[str, dict[str, bytes]] = {}  # a sample's members seen so far
    pairs: list[tuple[int, np.ndarray]] = []
    with fs.open(path, "rb") as f:
        for name, data in tar_files(f, url):
            key, _, extension = name.partition(".")
            if extension not in ("png", "cls"):
                continue
            entry = pending.setdefault(key, {})
            entry[extension] = data
            if len(entry) < 2:
                continue
            del pending[key]
            label = int(entry["cls"])
            if labels is None or label in labels:
                image = np.asarray(Image.open(io.BytesIO(entry["png"])).convert("RGB"))
                pairs.append((label, image))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs
