"""The task graph: validate, plan, run the missing shards through the executor, finalise.

Everything the user can get wrong is checked before anything is written. The graph:
metadata (when the method needs it) -> inversion -> filter -> shards, then the
retrieval stage when ``retrieval`` is configured. A ``translation`` section makes the
source images the plan: the run is that translation.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import replace
from typing import Any

from pipeline.config import Config, resolve
from pipeline.execution.executor import ActorPool
from pipeline.execution.metrics import record_failure
from pipeline.io.integrity import intact_shards
from pipeline.io.lease import Lease
from pipeline.io.retries import with_retries
from pipeline.io.shards import remove_partials
from pipeline.io.storage import endpoint_of, join
from pipeline.stages.manifest import finalise_run, record_run
from pipeline.stages.metadata import ensure_metadata
from pipeline.stages.plan import ShardTask, make_plan
from pipeline.stages.preflight import preflight
from pipeline.stages.retrieval import run_retrieval
from pipeline.stages.synthesis import ShardWorker
from pipeline.stages.translation import run_translation
from synthesizers import get_synthesizer

log = logging.getLogger("dreamshard.graph")


def run_job(config: Config, now: dt.datetime | None = None) -> dict[str, Any]:
    """Run the whole job for ``config``; returns the manifest (with ``this_run``: what
    this invocation did, for the summary). The config is resolved here, once (a config
    from :func:`pipeline.config.load_config` already is)."""
    started = time.monotonic()
    config = resolve(config, now)
    if config.translation is not None:
        return run_translation(config)
    teacher = preflight(config)  # everything a user can get wrong, before any write
    metadata = None
    if get_synthesizer(config.synthesizer.name).uses_metadata:
        metadata = ensure_metadata(config, teacher)
    row_labels = None
    if config.metadata.scenario == "seeds" and metadata is not None:
        row_labels = metadata.labels
        if config.metadata.variations:
            count = config.metadata.variations * metadata.rows
            config = replace(config, plan=replace(config.plan, num_images=count))
    plan = make_plan(config, row_labels)
    with Lease.for_run(config.run, config.runtime) as lease:  # refuses a second driver
        manifest, todo = _write_run(config, plan, teacher.digest, metadata, lease)
    written = {task.name for task in todo}
    manifest["this_run"] = {
        "shards_written": len(todo),
        "shards_resumed": len(plan) - len(todo),
        "written": sorted(written),  # missing or damaged before this run
        "images": sum(s["samples"] for s in manifest["shards"] if s["name"] in written),
        "seconds": round(time.monotonic() - started, 3),
    }
    if config.retrieval is not None:
        manifest["retrieval"] = run_retrieval(config)["totals"]
    return manifest


def _write_run(
    config: Config, plan: list[ShardTask], digest: str, metadata: Any, lease: Lease
) -> tuple[dict[str, Any], list[ShardTask]]:
    """Everything the run writes, under its lease: ``run.json``, the shards that are
    missing or damaged, then index, preview and manifest. Returns (manifest, tasks run)."""
    run_url, options = config.run.run_url, config.run.storage_options
    record_run(run_url, config, digest, options)  # refuses a different config
    done = intact_shards(run_url, options, config.runtime.verify)  # damaged: discarded
    todo = [task for task in plan if task.name not in done]
    log.info("%d shards planned, %d already complete", len(plan), len(plan) - len(todo))
    if todo:
        _remove_partials(run_url, options)  # a killed run's half-written files
        pool = ActorPool(
            ShardWorker,
            (config, metadata.url if metadata else None),
            config.runtime,
            on_failure=lambda: record_failure(config.run.name, config.synthesizer.name),
        )
        with pool:
            pool.map(todo)
        _remove_partials(run_url, options)  # those of actors killed in this run
    lease.check()  # another driver took the run over: leave the records to it
    manifest = with_retries(  # idempotent: reads the sidecars, rewrites index and manifest
        lambda: finalise_run(run_url, config, plan, digest, options, metadata),
        join(run_url, "manifest.json"),
        config.runtime.io_retries,
        config.runtime.io_backoff_s,
        endpoint_of(run_url, options),
    )
    return manifest, todo


def _remove_partials(run_url: str, options: dict[str, Any] | None) -> None:
    removed = remove_partials(run_url, options)
    if removed:
        log.warning("removed %d half-written file(s) of killed writers", len(removed))
