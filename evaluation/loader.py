"""Stream a run's WebDataset shards into PyTorch training.

:func:`resolve_shards` (from :mod:`evaluation.sources`) turns a source (a run folder,
its ``manifest.json``, a shards folder, a glob, or a list of tar URLs; local or
``s3://``) into the list of complete shards with their sidecars.
:class:`ShardDataset` is an ``IterableDataset`` that reads
them, checks every tar against its sidecar's sha256 and every member name, decodes PNG,
applies the teacher's normalisation and yields ``(image, label)`` or
``(image, label, logits)``.

Splitting without overlap (:mod:`evaluation.split`). The consumers are
``world_size`` Ray Train ranks times ``num_workers`` DataLoader workers per rank. The
epoch's samples (shards in an order shuffled per epoch, the same on every consumer) are
cut into contiguous ranges by sample count, so each sample is seen exactly once per
epoch whatever the shard sizes. With ``batch_size`` the dataset yields whole batches
(use ``DataLoader(dataset, batch_size=None, ...)``) and every rank yields exactly
:meth:`ShardDataset.steps` of them, known before reading anything (DDP needs the same
number of steps on all ranks).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from evaluation.sources import ShardError, ShardRef, ShardSet, read_shard, resolve_shards
from evaluation.split import Consumer, Part, part_of, steps_per_rank
from evaluation.views import jpeg
from pipeline.errors import InputError
from pipeline.io.images import decode
from pipeline.io.storage import redact
from pipeline.models.training import random_crop_flip

__all__ = [
    "Consumer",
    "ShardDataset",
    "ShardError",
    "ShardRef",
    "ShardSet",
    "load_all",
    "probe",
    "read_shard",
    "resolve_shards",
]


class ShardDataset(IterableDataset):
    """Samples of ``shards`` for one Ray Train rank, split over its DataLoader workers.

    Yields ``(image (3, H, W) float32 normalised, label)`` and, with ``logits=True``,
    the stored teacher logits ``(K,)`` float32 as a third item; with ``batch_size``, the
    same stacked into batches ``(B, 3, H, W)``, ``(B,)``, ``(B, K)`` of the planned sizes.
    ``augment`` applies a random 4-pixel-padded crop and horizontal flip; ``jpeg`` > 0
    then re-encodes each image as JPEG at a quality drawn from [``jpeg``, 95]
    (:func:`evaluation.views.jpeg`), and with ``jpeg_teacher="stored"`` the image before
    re-encoding (cropped and flipped alike) follows the label, for the teacher to answer
    (``(view, label, image for the teacher)``). Call
    :meth:`set_epoch` before each epoch: the shard order and the shuffle buffer are
    seeded by (seed, epoch).
    """

    def __init__(
        self,
        shards: list[ShardRef],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        logits: bool = False,
        augment: bool = False,
        jpeg: int = 0,
        jpeg_teacher: str = "view",
        seed: int = 0,
        storage_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_size = image_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.logits = logits
        self.augment = augment
        self.jpeg = jpeg
        self.jpeg_teacher = jpeg_teacher
        self.seed = seed
        self.epoch = 0
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if logits and (augment or jpeg):  # see evaluation.kd.uses_stored_logits
            raise ValueError(
                "stored logits describe the stored image: with augment or jpeg, run the "
                "teacher on the view instead of asking for logits"
            )

    def __repr__(self) -> str:  # no storage secrets in logs
        return (
            f"ShardDataset({len(self.shards)} shards, rank {self.rank}/{self.world_size}, "
            f"options={redact(self.storage_options)})"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def consumer(self) -> Consumer:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return Consumer(self.rank, self.world_size, worker, workers)

    def epoch_order(self) -> list[int]:
        """Shard indices in this epoch's order (the same on every consumer)."""
        order = list(range(len(self.shards)))
        if self.shuffle_buffer:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def total(self) -> int:
        """Samples in an epoch (from the sidecars' counts)."""
        return sum(shard.samples for shard in self.shards)

    def part(self, consumer: Consumer) -> Part:
        """The positions and batch sizes ``consumer`` yields this epoch."""
        return part_of(self.total(), consumer, self.batch_size)

    def sample_count(self, consumer: Consumer) -> int:
        """How many samples ``consumer`` yields this epoch."""
        return self.part(consumer).samples

    def steps(self) -> int:
        """Batches every rank yields this epoch (the same on all ranks; needs batch_size)."""
        if self.batch_size is None:
            raise ValueError("steps() needs a batch_size")
        return steps_per_rank(self.total(), self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        consumer = self.consumer()
        seed = f"{self.seed}-{self.epoch}-{consumer.index}"
        generator = torch.Generator().manual_seed(random.Random(seed).getrandbits(62))
        part = self.part(consumer)
        samples = self._samples(part)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(seed))
        decoded = (self._decode(sample, url, generator) for sample, url in samples)
        if not part.batches:
            yield from decoded
            return
        for size in part.batches:
            items = [next(decoded) for _ in range(size)]  # the counts were checked
            yield tuple(_stacked(column) for column in zip(*items, strict=True))

    def _samples(self, part: Part) -> Iterator[tuple[dict[str, bytes], str]]:
        """The samples at positions ``[part.start, part.stop)`` of this epoch's sequence."""
        offset = 0
        for index in self.epoch_order():
            shard = self.shards[index]
            first, last = max(part.start - offset, 0), min(part.stop - offset, shard.samples)
            offset += shard.samples
            if first >= last:
                continue
            samples = read_shard(shard, self.storage_options)
            if len(samples) != shard.samples:
                raise ShardError(
                    f"{shard.url}: holds {len(samples)} samples but was counted as "
                    f"{shard.samples}; the shard changed, rerun to recount it"
                )
            for sample in samples[first:last]:
                yield sample, shard.url

    def _decode(
        self, sample: dict[str, bytes], url: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        key = sample["__key__"].decode()
        if "png" not in sample or "cls" not in sample:
            raise ShardError(f"{url}: sample {key} lacks png or cls")
        array = decode(sample["png"], f"{url}:{key}.png")
        if self.image_size and array.shape[:2] != (self.image_size, self.image_size):
            raise InputError(
                f"{url}: images are {array.shape[1]}x{array.shape[0]}, the model expects "
                f"{self.image_size}x{self.image_size}"
            )
        image = torch.tensor(array).permute(2, 0, 1)  # (3, H, W) uint8
        if self.augment:
            image = random_crop_flip(image[None], generator)[0]
        view = jpeg(image, self.jpeg, generator)
        label = int(sample["cls"])
        if self.jpeg and self.jpeg_teacher == "stored":
            return self._normalised(view), label, self._normalised(image)
        if not self.logits:
            return self._normalised(view), label
        if "logits.npy" not in sample:
            raise ShardError(f"{url}: sample {key} has no logits.npy (stored logits asked for)")
        logits = load_logits(sample["logits.npy"], f"{url}: sample {key}")
        return self._normalised(view), label, torch.from_numpy(logits.astype(np.float32))

    def _normalised(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255.0 - self.mean) / self.std


def _stacked(column: tuple) -> torch.Tensor:
    """One batch column: images (B, 3, H, W), labels (B,), logits (B, K) or the teacher's
    images."""
    return torch.stack([torch.as_tensor(item) for item in column])


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of ``size`` items (as webdataset's ``shuffle``)."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def load_logits(data: bytes, where: str) -> np.ndarray:
    """A sample's ``logits.npy``: a plain numeric array (never a pickle), else ShardError."""
    try:
        logits = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # pickled objects, not .npy at all
        raise ShardError(f"{where}: logits.npy is not a plain array ({error})") from None
    if logits.dtype.kind not in "fiu":
        raise ShardError(f"{where}: logits.npy holds {logits.dtype}, not numbers")
    return logits


def probe(shards: ShardSet, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Image size, logits presence and class count of the first sample (cheap checks)."""
    first = read_shard(shards.shards[0], options)[0]
    array = decode(first["png"], f"{shards.shards[0].url}:{first['__key__'].decode()}.png")
    logits = None
    if "logits.npy" in first:
        key = first["__key__"].decode()
        logits = load_logits(first["logits.npy"], f"{shards.shards[0].url}: sample {key}").shape[-1]
    return {"image_size": array.shape[:2], "logits": logits}


def load_all(
    shards: ShardSet, limit: int | None = None, options: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``limit`` samples as uint8 images (N, 3, H, W) and labels (N,), in order."""
    images, labels = [], []
    for shard in shards.shards:
        if limit is not None and len(images) >= limit:
            break
        for sample in read_shard(shard, options)[: None if limit is None else limit - len(images)]:
            key = sample["__key__"].decode()
            images.append(decode(sample["png"], f"{shard.url}:{key}.png"))
            labels.append(int(sample["cls"]))
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)
