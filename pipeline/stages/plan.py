"""The plan: ``plan.num_images`` split into shards and batches, each with a derived seed.

A shard's name and seed are functions of (run seed, shard index) alone, so a rerun
regenerates exactly the shard that is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.io.shards import sample_key, shard_name


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard of ``len(labels)`` images."""

    index: int
    split: str
    seed: int
    labels: tuple[int, ...]  # the target class of every sample slot
    batch_size: int
    rows: tuple[int, ...] | None = None  # metadata row of every slot (None: its class)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def batches(self) -> list[list[int]]:
        """The slot labels of each batch, in order."""
        return self._cut(self.labels)

    def row_batches(self) -> list[list[int]]:
        """The metadata row of every slot of each batch (the labels when rows are classes)."""
        return self._cut(self.rows if self.rows is not None else self.labels)

    def _cut(self, values: tuple[int, ...]) -> list[list[int]]:
        size = self.batch_size
        return [list(values[i : i + size]) for i in range(0, len(values), size)]

    def batch_seed(self, batch: int, attempt: int) -> int:
        return derive_seed(self.seed, batch, attempt)

    def key(self, slot: int) -> str:
        """The WebDataset ``__key__`` of a sample slot."""
        return sample_key(self.index, slot)


def make_plan(config: Config, row_labels: list[int] | None = None) -> list[ShardTask]:
    """Class-balanced labels (sample i gets class ``classes[i % K]``), cut into shards.

    With ``row_labels`` (a seed-guided run: one metadata row per seed image), sample i
    targets row ``i % R`` instead and is labelled with that row's class.
    """
    classes = config.classes
    plan = config.plan
    tasks = []
    for index, start in enumerate(range(0, plan.num_images, plan.shard_size)):
        stop = min(start + plan.shard_size, plan.num_images)
        seed = derive_seed(config.run.seed, index)
        if row_labels is None:
            labels = tuple(classes[i % len(classes)] for i in range(start, stop))
            tasks.append(ShardTask(index, plan.split, seed, labels, plan.batch_size))
            continue
        rows = tuple(i % len(row_labels) for i in range(start, stop))
        labels = tuple(row_labels[r] for r in rows)
        tasks.append(ShardTask(index, plan.split, seed, labels, plan.batch_size, rows))
    return tasks
