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
    by_class: bool = False  # each batch one class (the slots are in class order)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def batches(self) -> list[list[int]]:
        """The slot labels of each batch, in order."""
        return self._cut(self.labels)

    def row_batches(self) -> list[list[int]]:
        """The metadata row of every slot of each batch (the labels when rows are classes)."""
        return self._cut(self.rows if self.rows is not None else self.labels)

    def spans(self) -> list[tuple[int, int]]:
        """(first slot, end) of each batch: ``batch_size`` slots in turn; by class, each
        run of one class's slots, cut at ``batch_size``."""
        labels, spans, start = self.labels, [], 0
        for end in range(1, len(labels) + 1):
            full = end - start == self.batch_size or end == len(labels)
            if full or (self.by_class and labels[end] != labels[start]):
                spans.append((start, end))
                start = end
        return spans

    def _cut(self, values: tuple[int, ...]) -> list[list[int]]:
        return [list(values[start:end]) for start, end in self.spans()]

    def batch_seed(self, batch: int, attempt: int) -> int:
        return derive_seed(self.seed, batch, attempt)

    def key(self, slot: int) -> str:
        """The WebDataset ``__key__`` of a sample slot."""
        return sample_key(self.index, slot)


def make_plan(config: Config, row_labels: list[int] | None = None) -> list[ShardTask]:
    """Class-balanced labels (sample i gets class ``classes[i % K]``), cut into shards.

    With ``row_labels`` (a seed-guided run: one metadata row per seed image), sample i
    targets row ``i % R`` instead and is labelled with that row's class. With
    ``plan.batching: by_class`` a shard's slots are put in class order (stable), so that
    its batches hold one class each.
    """
    classes = config.classes
    plan = config.plan
    by_class = plan.batching == "by_class"
    tasks = []
    for index, start in enumerate(range(0, plan.num_images, plan.shard_size)):
        stop = min(start + plan.shard_size, plan.num_images)
        seed = derive_seed(config.run.seed, index)
        if row_labels is None:
            labels = [classes[i % len(classes)] for i in range(start, stop)]
            rows = None
        else:
            rows = [i % len(row_labels) for i in range(start, stop)]
            labels = [row_labels[r] for r in rows]
        if by_class:
            order = sorted(range(len(labels)), key=labels.__getitem__)
            labels = [labels[i] for i in order]
            rows = None if rows is None else [rows[i] for i in order]
        task = ShardTask(
            index,
            plan.split,
            seed,
            tuple(labels),
            plan.batch_size,
            None if rows is None else tuple(rows),
            by_class,
        )
        tasks.append(task)
    return tasks
