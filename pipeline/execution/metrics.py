"""Ray custom metrics: what a run produced and what it is doing, on the cluster's
Prometheus endpoint.

Ray exports them with a ``ray_`` prefix (``ray_dreamshard_images_synthesized_total`` …)
from every node's metrics agent; the Ray dashboard's Grafana panels and any Prometheus
that scrapes the cluster see them. Outside a Ray worker (the inline executor) every call
does nothing: metrics never decide whether a run works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.io.shards import Sidecar

log = logging.getLogger("dreamshard.metrics")

TAGS = ("run", "synthesizer")
WRITE_SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
# a shard's synthesis: seconds on a GPU for small shards, up to hours on CPUs
SYNTHESIS_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]


class ShardMetrics:
    """The metrics one process reports to; created once per process, on first use."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.synthesized = Counter(
            "dreamshard_images_synthesized",
            description="Images synthesized, every filter attempt included.",
            tag_keys=TAGS,
        )
        self.accepted = Counter(
            "dreamshard_images_accepted",
            description="Images that passed the filter and were written to a shard.",
            tag_keys=TAGS,
        )
        self.shards = Counter(
            "dreamshard_shards_written", description="Shards written.", tag_keys=TAGS
        )
        self.failures = Counter(
            "dreamshard_shard_failures",
            description="Shard tries that failed (each is retried up to runtime.max_retries).",
            tag_keys=TAGS,
        )
        self.write_seconds = Histogram(
            "dreamshard_shard_write_seconds",
            description="Seconds to encode and store one shard's tar (after synthesis).",
            boundaries=WRITE_SECONDS_BOUNDARIES,
            tag_keys=TAGS,
        )
        self.synthesis_seconds = Histogram(
            "dreamshard_shard_synthesis_seconds",
            description="Seconds of synthesis (every filter attempt) for one written shard.",
            boundaries=SYNTHESIS_SECONDS_BOUNDARIES,
            tag_keys=TAGS,
        )
        # One series per worker process (Ray adds a WorkerId label): 1 while it works on
        # a shard, 0 after; sum by (run, synthesizer) for the shards in flight.
        self.in_flight = Gauge(
            "dreamshard_shards_in_flight",
            description="Shards this worker is synthesizing now (0 or 1); sum over workers.",
            tag_keys=TAGS,
        )


_metrics: ShardMetrics | None = None


def _get() -> ShardMetrics | None:
    """The process's metrics, or None where Ray is not running here."""
    global _metrics
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    if _metrics is None:
        _metrics = ShardMetrics()
    return _metrics


def _safely(record: Callable[[ShardMetrics], None]) -> None:
    """Record, unless Ray is absent here; a metrics error is logged, never raised."""
    try:
        metrics = _get()
        if metrics is not None:
            record(metrics)
    except Exception as error:  # metrics must never fail a shard
        log.warning("could not record metrics: %s", error)


def tags(run: str, synthesizer: str) -> dict[str, str]:
    return {"run": run, "synthesizer": synthesizer}


def record_shard(sidecar: Sidecar, run: str, synthesizer: str) -> None:
    """Count one written synthesis shard from its sidecar."""
    labels = tags(run, synthesizer)

    def record(metrics: ShardMetrics) -> None:
        counts = (
            (metrics.synthesized, sidecar.synthesized or 0),
            (metrics.accepted, sidecar.accepted or 0),
        )
        for counter, value in counts:
            if value > 0:  # Ray counters refuse an increment of 0
                counter.inc(value, tags=labels)
        metrics.shards.inc(1, tags=labels)
        write = max(0.0, sidecar.seconds - (sidecar.synthesis_seconds or 0.0))
        metrics.write_seconds.observe(write, tags=labels)
        if sidecar.synthesis_seconds is not None:
            metrics.synthesis_seconds.observe(sidecar.synthesis_seconds, tags=labels)
        metrics.in_flight.set(0, tags=labels)

    _safely(record)


def record_shard_started(run: str, synthesizer: str) -> None:
    """This worker starts a shard: its in-flight gauge is 1 until :func:`record_shard`
    (a try that fails leaves it at 1 until this worker's next shard, or its end)."""
    _safely(lambda metrics: metrics.in_flight.set(1, tags=tags(run, synthesizer)))


def record_failure(run: str, synthesizer: str) -> None:
    """Count one failed shard try."""
    _safely(lambda metrics: metrics.failures.inc(1, tags=tags(run, synthesizer)))
