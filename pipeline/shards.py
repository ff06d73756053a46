"""WebDataset shards: one tar per shard, then the sidecar json that marks completion.

A sample is ``__key__`` = ``{shard:06d}-{slot:05d}``, ``png`` (lossless RGB), ``cls``
(ASCII class index), ``json`` (teacher label and confidence, synthesizer, seed, final
loss terms) and optionally ``logits.npy`` (float16 teacher logits).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.archives import check_member
from pipeline.storage import atomic_open, filesystem, join, protocol_of, read_json, write_json

FIXED_MTIME = 0.0  # reproducible tar bytes


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    info: dict[str, Any]  # goes to the sample's json
    logits: np.ndarray | None = None  # (K,)


def shard_url(run_url: str, name: str) -> str:
    return join(run_url, "shards", f"{name}.tar")


def sidecar_url(run_url: str, name: str) -> str:
    return join(run_url, "shards", f"{name}.json")


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


def write_shard(
    url: str, samples: list[Sample], options: dict[str, Any] | None = None
) -> tuple[str, int]:
    """Write ``samples`` as one tar at ``url``; returns (sha256, bytes).

    The file is opened with fsspec and wrapped in ``webdataset.TarWriter``; both are
    closed explicitly, and the upload is visible only once complete.
    """
    with atomic_open(url, options) as f:
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


def completed_shards(run_url: str, options: dict[str, Any] | None = None) -> set[str]:
    """Names of the shards whose sidecar exists (the others do not exist)."""
    fs, path = filesystem(join(run_url, "shards"), options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    names = {entry.rsplit("/", 1)[-1] for entry in entries}
    return {n[:-5] for n in names if n.endswith(".json") and f"{n[:-5]}.tar" in names}


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


def read_sidecar(run_url: str, name: str, options: dict[str, Any] | None = None) -> dict:
    return read_json(sidecar_url(run_url, name), options)


def write_sidecar(
    run_url: str, name: str, stats: dict, options: dict[str, Any] | None = None
) -> None:
    write_json(sidecar_url(run_url, name), stats, options)


def shard_sha256(url: str, options: dict[str, Any] | None = None) -> str:
    fs, path = filesystem(url, options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_images(
    url: str, limit: int | None = None, options: dict[str, Any] | None = None
) -> list[tuple[int, np.ndarray]]:
    """(label, image) pairs from a shard, in order, without webdataset (for previews)."""
    fs, path = filesystem(url, options)
    found: dict[str, dict[str, bytes]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            check_member(member, url)
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if extension in ("png", "cls"):
                found.setdefault(key, {})[extension] = tar.extractfile(member).read()
            if limit is not None and len(found) > limit:
                break
    pairs = []
    for entry in list(found.values())[:limit]:
        if "png" in entry and "cls" in entry:
            image = np.asarray(Image.open(io.BytesIO(entry["png"])).convert("RGB"))
            pairs.append((int(entry["cls"]), image))
    return pairs
