"""The task graph: validate, plan, run the missing shards on Ray actors, finalise.

Everything the user can get wrong is checked before anything is written. Each actor
holds one teacher and does whole shards; a failed shard is retried a bounded number of
times (on a fresh actor if its actor died); completed shards are skipped on rerun.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.manifest import finalise_run, record_run
from pipeline.metadata import ensure_metadata, feature_layers
from pipeline.plan import ShardTask, make_plan
from pipeline.shards import completed_shards
from pipeline.storage import absolute, check_writable, join
from pipeline.teachers import load_teacher
from pipeline.worker import ShardWorker
from synthesizers import get_synthesizer

log = logging.getLogger("dreamshard.runtime")


class RunFailed(RuntimeError):
    """Some shards failed every try. Completed shards are kept; a rerun resumes."""


def run_job(config: Config) -> dict[str, Any]:
    """Run the whole job for ``config``; returns the manifest."""
    config = replace(
        config,
        run=replace(config.run, output=absolute(config.run.output)),
        teacher=replace(config.teacher, checkpoint=absolute(config.teacher.checkpoint)),
    )
    options = config.run.storage_options
    check_writable(config.run.output, options)
    teacher = load_teacher(config.teacher, options)
    feature_layers(config, teacher.model)  # unknown layer names fail before anything is written
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
        executor(config, run_url, metadata.url if metadata else None).run(todo)
    return finalise_run(run_url, config, plan, teacher.digest, options, metadata)


class Progress:
    """Shards, images, accept rate and ETA on one line."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="shard", disable=not enabled, dynamic_ncols=True)
        self.images = self.synthesized = 0

    def update(self, stats: dict) -> None:
        self.images += stats["samples"]
        self.synthesized += stats["synthesized"]
        rate = self.images / max(self.synthesized, 1)
        self.bar.set_postfix(images=self.images, accept=f"{rate:.0%}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
                    except Exception as error:  # retried, then reported
                        log.warning("shard %s failed (try %d): %s", task.name, attempt + 1, error)
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
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return ray


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
                    tries[task.name] = tries.get(task.name, 0) + 1
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
