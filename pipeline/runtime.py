"""The task graph: validate, plan, run the missing shards on Ray actors, finalise.

Everything the user can get wrong is checked before anything is written. Each actor
holds one teacher and does whole shards; a failed shard is retried a bounded number of
times (on a fresh actor if its actor died); completed shards are skipped on rerun.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from tqdm import tqdm

from pipeline.config import Config, absolute_paths, check_inversion
from pipeline.errors import InputError
from pipeline.guidance import guidance_images
from pipeline.manifest import finalise_run, record_run
from pipeline.metadata import ensure_metadata, feature_layers
from pipeline.metrics import record_failure
from pipeline.nightly import resolve_run_name
from pipeline.plan import ShardTask, make_plan
from pipeline.shards import completed_shards, remove_partials
from pipeline.storage import (
    StorageUnavailable,
    check_writable,
    endpoint_of,
    join,
    with_retries,
)
from pipeline.teachers import load_teacher, load_verifier
from pipeline.worker import ShardWorker
from synthesizers import get_synthesizer

log = logging.getLogger("dreamshard.runtime")


class RunFailed(RuntimeError):
    """Some shards failed every try. Completed shards are kept; a rerun resumes."""


def run_job(config: Config) -> dict[str, Any]:
    """Run the whole job for ``config``; returns the manifest (with ``this_run``: what
    this invocation did, for the summary).

    The graph: metadata (when the method needs it) -> inversion -> filter -> shards,
    then the retrieval stage when ``retrieval`` is configured. A ``translation`` section
    makes the source images the plan: the run is that translation.
    """
    started = time.monotonic()
    config = resolve_run_name(config)  # {date}/{datetime}, unless a submission pinned it
    if config.translation is not None:
        from pipeline.translation import run_translation

        return run_translation(config)
    check_inversion(config)
    config = absolute_paths(config)
    options = config.run.storage_options
    check_writable(config.run.output, options)
    teacher = load_teacher(config.teacher, options)
    if config.filter.verifier is not None:  # the workers load it: a bad one fails here first
        load_verifier(config.filter.verifier, options)
    feature_layers(config, teacher.model)  # unknown layer names fail before anything is written
    guidance_images(config)  # so do image files the synthesizer config names
    metadata = None
    if get_synthesizer(config.synthesizer.name).uses_metadata:
        metadata = ensure_metadata(config, teacher)
    row_labels = None
    if config.metadata.scenario == "seeds" and metadata is not None:
        row_labels = metadata.labels
        if config.metadata.variations:
            count = config.metadata.variations * metadata.rows
            config = replace(config, plan=replace(config.plan, num_images=count))
    run_url = join(config.run.output, config.run.name)
    plan = make_plan(config, row_labels)
    record_run(run_url, config, teacher.digest, options)  # refuses a different config
    done = completed_shards(run_url, options)
    todo = [task for task in plan if task.name not in done]
    log.info("%d shards planned, %d already complete", len(plan), len(plan) - len(todo))
    if todo:
        executor = InlineExecutor if config.runtime.executor == "inline" else RayExecutor
        _remove_partials(run_url, options)  # a killed run's half-written files
        executor(config, run_url, metadata.url if metadata else None).run(todo)
        _remove_partials(run_url, options)  # those of actors killed in this run
    manifest = with_retries(  # idempotent: reads the sidecars, rewrites index and manifest
        lambda: finalise_run(run_url, config, plan, teacher.digest, options, metadata),
        join(run_url, "manifest.json"),
        config.runtime.io_retries,
        config.runtime.io_backoff_s,
        endpoint_of(run_url, options),
    )
    written = {task.name for task in todo}
    manifest["this_run"] = {
        "shards_written": len(todo),
        "shards_resumed": len(plan) - len(todo),
        "images": sum(s["samples"] for s in manifest["shards"] if s["name"] in written),
        "seconds": round(time.monotonic() - started, 3),
    }
    if config.retrieval is not None:
        from pipeline.retrieval import run_retrieval

        manifest["retrieval"] = run_retrieval(config)["totals"]
    return manifest


def _remove_partials(run_url: str, options: dict[str, Any] | None) -> None:
    removed = remove_partials(run_url, options)
    if removed:
        log.warning("removed %d half-written file(s) of killed writers", len(removed))


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

    def update(self, stats: dict | None = None) -> None:
        """One more unit done; ``stats`` (a shard's sidecar) adds images and accept rate."""
        self.done += 1
        if stats is not None:
            self.images += stats["samples"]
            self.synthesized += stats["synthesized"]
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


def format_summary(manifest: dict[str, Any]) -> str:
    """The end-of-run summary the CLI prints (from :func:`run_job`'s return value)."""
    totals, url = manifest["totals"], manifest["run_url"]
    lines = [f"wrote {totals['images']} images in {len(manifest['shards'])} shards to {url}"]
    stage = manifest.get("stage")  # translation: the stage's own manifest
    if stage:
        return "\n".join([*lines, f"  manifest: {url}/{stage}.json"])
    this_run = manifest.get("this_run")
    if this_run:
        rate = this_run["images"] / max(this_run["seconds"], 1e-9)
        lines.append(
            f"  this run: {this_run['shards_written']} shards written, "
            f"{this_run['shards_resumed']} already complete, {duration(this_run['seconds'])} "
            f"({rate:.2f} images/s)"
        )
    accept = totals["images"] / max(totals["synthesized"], 1)
    counts = list(totals["classes"].values()) or [0]
    lines += [
        f"  accepted {totals['images']} of {totals['synthesized']} synthesized ({accept:.0%}); "
        f"images per class {min(counts)}-{max(counts)}",
        f"  manifest: {url}/manifest.json",
        f"  preview:  {url}/preview.png",
    ]
    retrieval = manifest.get("retrieval")
    if retrieval:
        lines.append(
            f"  retrieval: {retrieval['images']} pool images selected of "
            f"{retrieval['pool_scored']} scored ({retrieval['pool_skipped']} skipped); "
            f"manifest: {url}/retrieval.json"
        )
    return "\n".join(lines)


class InlineExecutor:
    """Runs the shards one after another in this process (no Ray)."""

    def __init__(self, config: Config, run_url: str, metadata_url: str | None = None) -> None:
        self.config = config
        self.run_url = run_url
        self.metadata_url = metadata_url

    def run(self, tasks: list[ShardTask]) -> None:
        worker = ShardWorker(self.config, self.run_url, metadata_url=self.metadata_url)
        progress = Progress(len(tasks), self.config.runtime.progress)
        failures = []
        try:
            for task in tasks:
                for attempt in range(self.config.runtime.max_retries + 1):
                    try:
                        progress.update(worker.run(task))
                        break
                    except StorageUnavailable as error:  # down past the retry budget: stop
                        raise RunFailed(f"shard {task.name}: {error}") from error
                    except Exception as error:  # retried, then reported
                        log.warning("shard %s failed (try %d): %s", task.name, attempt + 1, error)
                        record_failure(self.config.run.name, self.config.synthesizer.name)
                        last = error
                else:
                    failures.append((task.name, last))
        finally:
            progress.close()
        raise_failures(failures, self.config.runtime.max_retries)


def raise_failures(failures: list[tuple[str, BaseException]], retries: int) -> None:
    if failures:
        name, error = failures[0]
        raise RunFailed(
            f"{len(failures)} shard(s) failed after {retries + 1} tries each (first: {name}: "
            f"{error}); completed shards are kept, rerun the same command to resume"
        )


def connect_ray(config: Config) -> Any:
    """Ray, connected to ``runtime.address`` (or RAY_ADDRESS), else a fresh local cluster."""
    try:
        import ray
    except ImportError as error:
        raise InputError(
            "runtime.executor is ray but Ray is not installed; "
            "install ray[default] or set runtime.executor=inline"
        ) from error
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    address = config.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # the embedded default: a fresh local cluster on this machine
        start_local_ray(ray)
    return ray


LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(ray: Any, **options: Any) -> None:
    """``ray.init`` of a fresh local cluster whose servers all listen on 127.0.0.1.

    On Linux Ray binds its gRPC servers, agents and workers to every interface, whatever
    ``_node_ip_address`` says; it keeps them on loopback only when it takes the machine
    for a single-node laptop cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), a switch
    it reads once, at import: so the environment (for the processes it starts) and the
    constant (for this one) are both set. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` opts out.
    """
    if os.environ.setdefault(LOOPBACK_SWITCH, "0") == "0":
        try:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        except (ImportError, AttributeError):  # another Ray: the environment still applies
            pass
        options.setdefault("_node_ip_address", "127.0.0.1")
    options.setdefault("include_dashboard", False)
    ray.init(address="local", logging_level=logging.WARNING, **options)


class RayExecutor:
    """One actor per GPU (or per ``cpus_per_worker`` CPUs); each does whole shards."""

    def __init__(self, config: Config, run_url: str, metadata_url: str | None = None) -> None:
        self.config = config
        self.run_url = run_url
        self.metadata_url = metadata_url

    def connect(self) -> None:
        self.ray = connect_ray(self.config)

    def actor_options(self) -> tuple[dict[str, Any], int]:
        """Resources per actor and the number of actors, from the cluster's resources."""
        runtime = self.config.runtime
        resources = self.ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
        if gpus >= runtime.gpus_per_worker:
            count = runtime.num_workers or int(gpus // runtime.gpus_per_worker)
            return {"num_gpus": runtime.gpus_per_worker, "num_cpus": runtime.cpus_per_worker}, count
        count = runtime.num_workers or max(1, int(cpus // runtime.cpus_per_worker))
        return {"num_cpus": runtime.cpus_per_worker, "num_gpus": 0}, count

    def run(self, tasks: list[ShardTask]) -> None:
        self.connect()
        options, count = self.actor_options()
        count = min(count, len(tasks))
        device = "cuda" if options["num_gpus"] else "cpu"
        threads = max(1, int(options["num_cpus"]))
        actor_class = self.ray.remote(ShardWorker).options(max_restarts=0, **options)

        def new_actor():
            return actor_class.remote(self.config, self.run_url, device, threads, self.metadata_url)

        log.info("%d %s actors with %s", count, device, options)
        actors = [new_actor() for _ in range(count)]
        self._dispatch(tasks, actors, new_actor)

    def _dispatch(self, tasks: list[ShardTask], actors: list, new_actor) -> None:
        ray = self.ray
        retries = self.config.runtime.max_retries
        pending = deque(tasks)
        tries: dict[str, int] = {}
        idle = list(range(len(actors)))
        in_flight: dict[Any, tuple[int, ShardTask]] = {}
        failures: list[tuple[str, BaseException]] = []
        progress = Progress(len(tasks), self.config.runtime.progress)
        try:
            while pending or in_flight:
                while idle and pending:
                    slot, task = idle.pop(), pending.popleft()
                    in_flight[actors[slot].run.remote(task)] = (slot, task)
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                slot, task = in_flight.pop(ref)
                try:
                    progress.update(ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                    if isinstance(error, ray.exceptions.RayActorError):
                        log.warning("actor for %s died; starting a new one", task.name)
                        actors[slot] = new_actor()
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, InputError):
                        raise cause from error
                    if isinstance(cause, StorageUnavailable):  # past the retry budget: stop
                        raise RunFailed(f"shard {task.name}: {cause}") from error
                    tries[task.name] = tries.get(task.name, 0) + 1
                    record_failure(self.config.run.name, self.config.synthesizer.name)
                    log.warning("shard %s failed (try %d): %s", task.name, tries[task.name], error)
                    if tries[task.name] > retries:
                        failures.append((task.name, error))
                    else:
                        pending.append(task)
                idle.append(slot)
        finally:
            progress.close()
            for actor in actors:
                ray.kill(actor)
        raise_failures(failures, retries)
