"""The plan: ``plan.num_images`` split into shards and batches, each with a derived seed.

A shard's name and seed are functions of (run seed, shard index) alone, so a rerun
regenerates exactly the shard that is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.config import Config


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

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def batches(self) -> list[list[int]]:
        """The slot labels of each batch, in order."""
        labels = list(self.labels)
        return [labels[i : i + self.batch_size] for i in range(0, len(labels), self.batch_size)]

    def batch_seed(self, batch: int, attempt: int) -> int:
        return derive_seed(self.seed, batch, attempt)

    def key(self, slot: int) -> str:
        """The WebDataset ``__key__`` of a sample slot."""
        return f"{self.index:06d}-{slot:05d}"


def make_plan(config: Config) -> list[ShardTask]:
    """Class-balanced labels (sample i gets class ``classes[i % K]``), cut into shards."""
    classes = config.classes
    plan = config.plan
    tasks = []
    for index, start in enumerate(range(0, plan.num_images, plan.shard_size)):
        stop = min(start + plan.shard_size, plan.num_images)
        labels = tuple(classes[i % len(classes)] for i in range(start, stop))
        tasks.append(
            ShardTask(
                index, plan.split, derive_seed(config.run.seed, index), labels, plan.batch_size
            )
        )
    return tasks
