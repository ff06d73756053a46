"""The one executor: the Ray connection and one pool of workers, in this process
(``runtime.executor: inline``) or on Ray actors, with bounded retries and progress.

A stage's work is a worker class with one method, ``run(task) -> result`` (a
:class:`pipeline.io.shards.Sidecar` for the stages that write shards). The pool builds
workers as ``worker(*args, device=..., threads=...)``: one in this process, or one Ray
actor per GPU (or per ``cpus_per_worker`` CPUs). A failed task is retried
``runtime.max_retries`` times (on a fresh actor if its actor died); bad input, storage
that stays down and storage that denies permission stop the run at once.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from pipeline.config import RuntimeConfig
from pipeline.errors import InputError
from pipeline.execution.progress import Progress
from pipeline.io.retries import StorageUnavailable

log = logging.getLogger("dreamshard.executor")
Task = TypeVar("Task")


class RunFailed(RuntimeError):
    """Some tasks failed every try. Completed shards are kept; a rerun resumes."""


class Worker(Protocol):
    """What a stage gives the executor: a plain class whose ``run`` does one task."""

    def run(self, task: Any) -> Any: ...


def connect_ray(address: str | None = None) -> Any:
    """Ray: already initialised, else connected to ``address`` (or RAY_ADDRESS), else a
    fresh local cluster on this machine (every server on 127.0.0.1)."""
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
    address = address or os.environ.get("RAY_ADDRESS")
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


def actor_resources(
    resources: dict[str, float], runtime: RuntimeConfig, use_gpus: bool = True
) -> tuple[dict[str, float], int]:
    """Resources per actor and the number of actors, from the cluster's resources: one
    actor per ``gpus_per_worker`` GPUs when the cluster has GPUs, else one per
    ``cpus_per_worker`` CPUs; ``runtime.num_workers`` overrides the count."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if use_gpus and gpus >= runtime.gpus_per_worker:
        count = runtime.num_workers or int(gpus // runtime.gpus_per_worker)
        return {"num_gpus": runtime.gpus_per_worker, "num_cpus": runtime.cpus_per_worker}, count
    count = runtime.num_workers or max(1, int(cpus // runtime.cpus_per_worker))
    return {"num_cpus": runtime.cpus_per_worker, "num_gpus": 0}, count


class ActorPool:
    """Workers of one class that run tasks, with bounded retries and progress.

    ``with ActorPool(worker, args, runtime) as pool: pool.map(tasks)``; the workers are
    started on the first ``map`` and reused by later ones. ``per_worker`` tasks are kept
    in flight on each actor (2 keeps an actor busy while its next task's input travels).
    """

    def __init__(
        self,
        worker: type,
        args: tuple[Any, ...],
        runtime: RuntimeConfig,
        label: str = "shard",
        use_gpus: bool = True,
        max_workers: int | None = None,
        per_worker: int = 1,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.worker, self.args, self.runtime = worker, args, runtime
        self.label, self.use_gpus, self.max_workers = label, use_gpus, max_workers
        self.per_worker, self.on_failure = per_worker, on_failure
        self.inline = runtime.executor == "inline"
        self.local: Any = None  # the inline worker
        self.ray: Any = None
        self.actors: list[Any] = []
        self.new_actor: Callable[[], Any] | None = None

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def map(
        self,
        tasks: Iterable[Task],
        name: Callable[[Task], str] = lambda task: getattr(task, "name", str(task)),
        progress: bool | None = None,
        reduce: Callable[[Any], Any] = lambda result: result,
    ) -> list[Any]:
        """Run every task; ``reduce(result)`` of each, in the order they complete (the
        driver keeps only what ``reduce`` returns). ``progress`` (default
        ``runtime.progress``) shows a bar or periodic lines. Raises :class:`RunFailed`
        once every task is done or given up, if any was given up."""
        tasks = list(tasks)
        if not tasks:
            return []
        enabled = self.runtime.progress if progress is None else progress
        meter = Progress(len(tasks), enabled, unit=f"{self.label}s")
        try:
            run = self._map_inline if self.inline else self._map_ray
            results, failures = run(tasks, name, meter, reduce)
        finally:
            meter.close()
        if failures:
            first, error = failures[0]
            raise RunFailed(
                f"{len(failures)} {self.label}(s) failed after {self.runtime.max_retries + 1} "
                f"tries each (first: {first}: {error}); completed shards are kept, rerun the "
                "same command to resume"
            )
        return results

    def _failed(self, what: str, error: BaseException, tries: int) -> None:
        """Bad input, storage past its retry budget and storage that refuses (permission
        denied: no retry can fix it) stop everything; the rest is retried (reported by
        the caller)."""
        if isinstance(error, InputError):
            raise error
        if isinstance(error, StorageUnavailable):
            raise RunFailed(f"{self.label} {what}: {error}") from error
        if isinstance(error, PermissionError):
            raise RunFailed(
                f"{self.label} {what}: permission denied ({error}); completed shards are "
                "kept, fix the permissions and rerun to resume"
            ) from error
        if self.on_failure is not None:
            self.on_failure()
        log.warning("%s %s failed (try %d): %s", self.label, what, tries, error)

    def _map_inline(
        self, tasks: list, name: Callable[[Any], str], meter: Progress, reduce: Callable
    ) -> tuple[list, list]:
        if self.local is None:
            self.local = self.worker(*self.args)
        results, failures = [], []
        for task in tasks:
            for attempt in range(self.runtime.max_retries + 1):
                try:
                    result = self.local.run(task)
                except Exception as error:  # retried, then reported
                    self._failed(name(task), error, attempt + 1)
                    last = error
                    continue
                meter.update(result)
                results.append(reduce(result))
                break
            else:
                failures.append((name(task), last))
        return results, failures

    def _start(self, count: int) -> None:
        """Connect and start ``count`` actors (fewer if the cluster is smaller)."""
        self.ray = ray = connect_ray(self.runtime.address)
        options, fits = actor_resources(ray.cluster_resources(), self.runtime, self.use_gpus)
        count = max(1, min(fits, count, self.max_workers or fits))
        device = "cuda" if options["num_gpus"] else "cpu"
        threads = max(1, int(options["num_cpus"]))
        remote = ray.remote(self.worker).options(max_restarts=0, **options)
        shared = [ray.put(arg) for arg in self.args]  # stored once, fetched by each actor

        def new_actor() -> Any:
            return remote.remote(*shared, device=device, threads=threads)

        log.info("%d %s actors of %s with %s", count, device, self.worker.__name__, options)
        self.new_actor = new_actor
        self.actors = [new_actor() for _ in range(count)]

    def _map_ray(
        self, tasks: list, name: Callable[[Any], str], meter: Progress, reduce: Callable
    ) -> tuple[list, list]:
        if not self.actors:
            self._start(len(tasks))
        ray = self.ray
        pending = deque(tasks)
        tries: dict[int, int] = {}
        idle = [slot for slot in range(len(self.actors)) for _ in range(self.per_worker)]
        in_flight: dict[Any, tuple[int, Any]] = {}
        results, failures = [], []
        while pending or in_flight:
            while idle and pending:
                slot, task = idle.pop(0), pending.popleft()
                in_flight[self.actors[slot].run.remote(task)] = (slot, task)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, task = in_flight.pop(ref)
            idle.append(slot)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                if isinstance(error, ray.exceptions.RayActorError):
                    log.warning("actor for %s died; starting a new one", name(task))
                    self.actors[slot] = self.new_actor()
                cause = getattr(error, "cause", None)
                tries[id(task)] = tries.get(id(task), 0) + 1
                self._failed(name(task), cause if cause is not None else error, tries[id(task)])
                if tries[id(task)] > self.runtime.max_retries:
                    failures.append((name(task), error))
                else:
                    pending.append(task)
                continue
            meter.update(result)
            results.append(reduce(result))
        return results, failures
