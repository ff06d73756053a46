"""Progress of a long stage: a tqdm bar on a terminal; elsewhere (batch jobs, Ray Jobs
logs, CI) one plain line every ``interval`` seconds and at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    """Shards, images, accept rate and ETA: a tqdm bar on a terminal; elsewhere (batch
    jobs, Ray Jobs logs, CI) one plain line every ``interval`` seconds and at the end.

    Any long stage can use it: ``unit`` names what is counted, and ``update()`` without
    shard stats just counts one more.
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        stream: TextIO | None = None,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "shards",
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done = total, 0
        self.images = self.synthesized = 0
        self.tty = enabled and self.stream.isatty()
        self.lines = enabled and not self.tty
        self.interval, self.clock = interval, clock
        self.start = self.last = clock()
        self.reported = -1  # units done at the last line written
        self.unit = unit
        self.bar = tqdm(total=total, unit=unit, disable=not self.tty, file=self.stream)

    def update(self, result: Any = None) -> None:
        """One more unit done; a synthesis shard's sidecar (a result with ``samples`` and
        ``synthesized``) adds images and the accept rate; any other result just counts."""
        self.done += 1
        if getattr(result, "synthesized", None) is not None:
            self.images += result.samples
            self.synthesized += result.synthesized
            self.bar.set_postfix(images=self.images, accept=f"{self.accept_rate:.0%}")
        self.bar.update(1)
        if self.lines and self.clock() - self.last >= self.interval:
            self.write_line()

    @property
    def accept_rate(self) -> float:
        return self.images / max(self.synthesized, 1)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        images = (
            f"{self.images} images, accept {self.accept_rate:.0%}, " if self.synthesized else ""
        )
        return (
            f"progress: {self.done}/{self.total} {self.unit}, {images}"
            f"elapsed {duration(elapsed)}, ETA {duration(eta) if eta is not None else '?'}"
        )

    def write_line(self) -> None:
        self.last, self.reported = self.clock(), self.done
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} dreamshard {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.lines and self.reported != self.done:  # the final state, unless just written
            self.write_line()


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
