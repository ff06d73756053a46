"""The retrieval stage's worker: score pool tasks, write the selected images as shards.

:class:`PoolWorker` runs in the executor's pool like every stage's worker; its ``run``
takes a :class:`ScoreTask` or a :class:`WriteJob`. Scoring keeps a bounded top-n
structure per target; writing reads a task a second time and keeps only the selected
positions, one shard at a time.
"""

from __future__ import annotations

import heapq
import logging
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.execution.device import worker_device
from pipeline.io.archives import UnsafeArchive
from pipeline.io.pool import PoolTask, decode_or_none, stream
from pipeline.io.shards import Sample, ShardStore, Sidecar, sample_key
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import load_teacher
from synthesizers.impression import distance, encode, flatten, template_layers
from synthesizers.precision import autocast_dtype

log = logging.getLogger("dreamshard.retrieval")

# (distance, pool task index, position in the task, key): a candidate, ordered by
# distance, ties broken by where it is in the pool, so the result never depends on
# which worker finished first.
Candidate = tuple[float, int, int, str]


class TopK:
    """The ``capacity`` smallest candidates pushed so far (a bounded max-heap)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.heap: list[tuple[float, int, int, str]] = []  # negated, the worst on top

    def push(self, candidate: Candidate) -> None:
        if self.capacity <= 0:
            return
        d, task, position, key = candidate
        entry = (-d, -task, -position, key)
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, entry)
        elif entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)

    def __len__(self) -> int:
        return len(self.heap)

    def items(self) -> list[Candidate]:
        """Best first."""
        return sorted((-d, -t, -p, k) for d, t, p, k in self.heap)


@dataclass
class ScoreTask:
    """Score one pool task, keeping at most ``quotas[t]`` candidates for target t."""

    task: PoolTask
    quotas: list[int]

    @property
    def name(self) -> str:
        return f"pool task {self.task.index}"


@dataclass
class WriteJob:
    """One pool task's share of the selection, cut into shards in stream order; shards
    in ``done`` are complete already."""

    task: PoolTask
    picks: dict[int, dict[str, Any]]  # position in the task -> what to record with it
    shards: list[tuple[str, int, list[int]]]  # (shard name, shard index, positions)
    pool_stats: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"pool task {self.task.index}"


class PoolWorker:
    """Holds one teacher; scores pool tasks against target codes and writes shards."""

    def __init__(
        self,
        config: Config,
        targets: torch.Tensor,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.device = worker_device(device, threads)
        self.config = config
        self.retrieval = config.retrieval
        self.store = ShardStore.for_run(config.run, config.runtime)
        teacher = load_teacher(config.teacher, config.run.storage_options)
        self.model = teacher.model.to(self.device, memory_format=torch.channels_last).eval()
        self.layers = template_layers(self.model, self.retrieval.layers)
        self.dtype = autocast_dtype("auto", self.device)
        self.targets = targets.to(self.device)  # (T, D)
        t = config.teacher
        self.mean, self.std = t.mean, t.std

    @property
    def pool_options(self) -> dict[str, Any]:
        options = self.retrieval.pool_storage_options
        return self.config.run.storage_options if options is None else options

    def batches(self, task: PoolTask, positions: set[int] | None = None):
        """Decoded images of a task in batches: (positions, keys, uint8 (B, S, S, 3)),
        and the skipped items as (position, key) on the side (``self.skipped``)."""
        size, batch_size = self.config.teacher.image_size, self.retrieval.batch_size
        self.skipped: list[tuple[int, str]] = []
        self.broken: str | None = None
        chunk: list[tuple[int, str, np.ndarray]] = []
        for position, (key, data) in enumerate(self._items(task)):
            if positions is not None and position not in positions:
                continue
            image = decode_or_none(data, key, size)
            if image is None:
                self.skipped.append((position, key))
                continue
            chunk.append((position, key, image))
            if len(chunk) == batch_size:
                yield self._unzip(chunk)
                chunk = []
        if chunk:
            yield self._unzip(chunk)

    def _items(self, task: PoolTask):
        """The task's items; an archive that breaks off ends the task, and is reported."""
        try:
            yield from stream(task, self.pool_options)
        except (tarfile.TarError, EOFError, zlib.error, OSError, UnsafeArchive) as error:
            log.warning("pool task %s breaks off: %s", task.url, error)
            self.broken = f"{type(error).__name__}: {error}"

    @staticmethod
    def _unzip(chunk: list) -> tuple[list[int], list[str], np.ndarray]:
        return [c[0] for c in chunk], [c[1] for c in chunk], np.stack([c[2] for c in chunk])

    def normalised(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)  # uint8 (B, 3, S, S)
        return normalise(x, self.mean, self.std).contiguous(memory_format=torch.channels_last)

    def run(self, task: ScoreTask | WriteJob) -> dict[str, Any] | list[Sidecar]:
        """Score a pool task (its best candidates and counts) or write a job's shards."""
        if isinstance(task, ScoreTask):
            return self.score(task.task, task.quotas)
        return self.write(task)

    def score(self, task: PoolTask, quotas: list[int]) -> dict[str, Any]:
        """The task's best candidates per target (at most ``quotas[t]`` each) and counts."""
        start = time.perf_counter()
        heaps = [TopK(q) for q in quotas]
        scored = 0
        per_class = self.retrieval.selection == "per_class"
        for positions, keys, images in self.batches(task):
            codes, _ = encode(
                self.model, self.normalised(images), self.layers, len(images), self.dtype
            )
            d = distance(flatten(codes, self.retrieval.mean_only), self.targets)  # (B, T)
            best, target = (
                d.min(dim=1) if per_class else (d[:, 0], torch.zeros(len(d), dtype=torch.int64))
            )
            for i, (value, t) in enumerate(zip(best.tolist(), target.tolist(), strict=True)):
                heaps[t].push((value, task.index, positions[i], keys[i]))
            scored += len(keys)
        return {
            "task": task.index,
            "candidates": [heap.items() for heap in heaps],
            "scored": scored,
            "skipped": len(self.skipped),
            "skipped_keys": [key for _, key in self.skipped[:5]],
            "broken": self.broken,
            "seconds": time.perf_counter() - start,
        }

    def write(self, job: WriteJob) -> list[Sidecar]:
        """Write the job's shards that are not done; returns their sidecars."""
        todo = [s for s in job.shards if s[0] not in job.done]
        wanted = {p for _, _, positions in todo for p in positions}
        if not wanted:
            return []
        images: dict[int, np.ndarray] = {}
        sidecars = []
        pending = list(todo)
        for positions, _, batch in self.batches(job.task, wanted):
            images.update(zip(positions, batch, strict=True))
            while pending and all(p in images for p in pending[0][2]):
                name, index, chosen = pending.pop(0)
                sidecars.append(
                    self.write_shard(job, name, index, [images.pop(p) for p in chosen], chosen)
                )
        if pending:
            raise RuntimeError(f"pool task {job.task.url}: selected images went missing on re-read")
        return sidecars

    @torch.no_grad()
    def write_shard(
        self, job: WriteJob, name: str, index: int, images: list[np.ndarray], positions: list[int]
    ) -> Sidecar:
        start = time.perf_counter()
        stack = np.stack(images)
        logits = self.model(self.normalised(stack)).float().cpu()
        probs = torch.softmax(logits, dim=1)
        confidence, labels = probs.max(dim=1)
        samples = []
        for slot, position in enumerate(positions):
            info = {
                **job.picks[position],
                "label": int(labels[slot]),
                "confidence": round(float(confidence[slot]), 6),
                "source": job.task.url,
                "selection": self.retrieval.selection,
            }
            samples.append(
                Sample(
                    sample_key(index, slot),
                    stack[slot],
                    int(labels[slot]),
                    info,
                    logits[slot].numpy(),
                )
            )
        return self.store.write(
            name,
            samples,
            "distance",
            seconds=round(time.perf_counter() - start, 3),
            device=str(self.device),
            pool_task={"url": job.task.url, "index": job.task.index, **job.pool_stats},
        )
