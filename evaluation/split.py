"""Who reads which samples in an epoch: every sample exactly once, equal steps per rank.

The consumers are ``world_size`` Ray Train ranks times ``num_workers`` DataLoader workers
per rank. An epoch's samples form one sequence: the shards in the epoch's order (the
same on every consumer), each shard's samples in tar order; the counts come from the
sidecars (or a first pass over plain shards), so every consumer computes the same plan
without reading anything.

* Rank ``r`` takes the contiguous positions ``[N·r/R, N·(r+1)/R)``: the ranks' shares
  differ by at most one sample, whatever the shard sizes.
* With a batch size ``b`` every rank takes the same number of steps,
  ``S = ceil(floor(N/R) / b)``, and splits its share into ``S`` batches as evenly as
  possible. A batch holds at most ``b`` samples, except when ``floor(N/R)`` is a multiple
  of ``b`` and the rank's share is one larger: then one batch holds ``b + 1``. Nothing is
  dropped, repeated or padded, and DDP gets the same number of steps everywhere.
* A rank's batches go to its DataLoader workers in contiguous blocks (worker ``w`` gets
  ``S // W`` batches, one more for the first ``S % W``); without a batch size its share
  is split evenly over the workers. A shard on a boundary is read by both neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class Consumer:
    """Who reads: Ray Train rank and DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class Part:
    """A consumer's share of an epoch: positions ``[start, stop)`` of the epoch's sample
    sequence, and the sizes of the batches it yields (empty: single samples)."""

    start: int
    stop: int
    batches: tuple[int, ...] = ()

    @property
    def samples(self) -> int:
        return self.stop - self.start


def even(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``total`` is split into ``parts`` evenly."""
    return total * index // parts, total * (index + 1) // parts


def steps_per_rank(total: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields in an epoch of ``total`` samples (the same on all)."""
    smallest = total // world_size
    if smallest < 1:
        raise InputError(
            f"data.shards: {total} sample(s) cannot be split over {world_size} Ray Train "
            "workers (each needs at least one); lower runtime.num_workers"
        )
    return -(-smallest // batch_size)


def part_of(total: int, consumer: Consumer, batch_size: int | None = None) -> Part:
    """The share of ``consumer`` in an epoch of ``total`` samples."""
    start, stop = even(total, consumer.world_size, consumer.rank)
    if batch_size is None:
        first, last = even(stop - start, consumer.num_workers, consumer.worker)
        return Part(start + first, start + last)
    steps = steps_per_rank(total, consumer.world_size, batch_size)
    share = stop - start
    sizes = [share // steps + (i < share % steps) for i in range(steps)]
    first, last = _block(steps, consumer.num_workers, consumer.worker)
    begin = start + sum(sizes[:first])
    return Part(begin, begin + sum(sizes[first:last]), tuple(sizes[first:last]))


def _block(steps: int, workers: int, worker: int) -> tuple[int, int]:
    """Batches ``[first, last)`` of ``worker``: ``steps // workers``, one more for the first
    ``steps % workers`` workers."""
    base, extra = divmod(steps, workers)
    first = worker * base + min(worker, extra)
    return first, first + base + (worker < extra)
