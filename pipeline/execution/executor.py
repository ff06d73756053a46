"""The one executor: the Ray connection and one pool of workers, in this process
(``runtime.executor: inline``) or on Ray actors, with bounded retries and progress.

A stage's work is a worker class with one method, ``run(task) -> result`` (a
:class:`pipeline.io.shards.Sidecar` for the stages that write shards). The pool builds
workers as ``worker(*args, device=..., threads=...)``: one in this process, or one per
Ray actor (placement: how many, GPU or CPU, and what each asks for). Tasks go only to
actors that are ready. A failed task is retried ``runtime.max_retries`` times (on a fresh
actor if its actor died); bad input, a GPU without CUDA, storage that stays down and
storage that denies permission stop the run at once.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from pipeline.config import RuntimeConfig
from pipeline.errors import DeviceUnavailable, InputError
from pipeline.execution.placement import actor_resources, resolve_device
from pipeline.execution.progress import Progress
from pipeline.io.retries import StorageUnavailable
from pipeline.node import describe, this_node

log = logging.getLogger("dreamshard.executor")
Task = TypeVar("Task")
WAIT_REPORT_S = 30.0  # how often a pool with actors still waiting for room says so


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


class Host:
    """The body of every Ray actor of a pool. It builds the stage's worker in :meth:`start`,
    not in the actor's constructor, so that an error there (bad input, a GPU its node
    does not have) reaches the driver with its type; ``start`` returning is the actor's
    readiness, and it says which node the actor is on."""

    def __init__(self, worker: type, *args: Any, device: str, threads: int) -> None:
        self.build = lambda: worker(*args, device=device, threads=threads)
        self.instance: Any = None

    def start(self) -> dict[str, str]:
        self.instance = self.build()
        return this_node()

    def run(self, task: Any) -> Any:
        return self.instance.run(task)


class ActorPool:
    """Workers of one class that run tasks, with bounded retries and progress.

    ``with ActorPool(worker, args, runtime) as pool: pool.map(tasks)``; the workers are
    started on the first ``map`` and reused by later ones. Every actor is asked for at
    once (``runtime.max_workers``, else as many as fit what is up), but tasks go only to
    actors that are ready: a run starts with the actors that can start now and grows as
    the autoscaler adds nodes for the others. ``per_worker`` tasks are kept in flight on
    each actor (2 keeps an actor busy while its next task's input travels). ``device``
    (``gpu``/``cpu``) overrides ``runtime.device``; ``max_workers`` caps the actors.
    """

    def __init__(
        self,
        worker: type,
        args: tuple[Any, ...],
        runtime: RuntimeConfig,
        label: str = "shard",
        device: str | None = None,
        max_workers: int | None = None,
        per_worker: int = 1,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.worker, self.args, self.runtime = worker, args, runtime
        self.label, self.device, self.max_workers = label, device, max_workers
        self.per_worker, self.on_failure = per_worker, on_failure
        self.inline = runtime.executor == "inline"
        self.local: Any = None  # the inline worker
        self.ray: Any = None
        self.actors: list[Any] = []  # by slot; None where an actor could never start
        self.starting: dict[Any, int] = {}  # readiness call -> slot
        self.start_failures = 0
        self.new_actor: Callable[[], Any] | None = None
        self.options: dict[str, Any] = {}

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)
        self.actors, self.starting = [], {}

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

    def _stop_if_fatal(self, what: str, error: BaseException) -> None:
        """Bad input, a device the node lacks, storage past its retry budget and storage
        that refuses (permission denied: no retry can fix it) stop everything."""
        if isinstance(error, (InputError, DeviceUnavailable)):
            raise error
        if isinstance(error, StorageUnavailable):
            raise RunFailed(f"{self.label} {what}: {error}") from error
        if isinstance(error, PermissionError):
            raise RunFailed(
                f"{self.label} {what}: permission denied ({error}); completed shards are "
                "kept, fix the permissions and rerun to resume"
            ) from error

    def _failed(self, what: str, error: BaseException, tries: int) -> None:
        """Stop on a fatal error; the rest is retried (reported by the caller)."""
        self._stop_if_fatal(what, error)
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

    def _start(self, tasks: int) -> None:
        """Connect and ask for the actors (at most one per task); none is waited for."""
        self.ray = ray = connect_ray(self.runtime.address)
        resources = ray.cluster_resources()
        device = resolve_device(resources, self.runtime, self.device)
        options, count = actor_resources(resources, self.runtime, device)
        count = max(1, min(count, tasks, self.max_workers or count))
        threads = max(1, int(options["num_cpus"]))
        # named after the stage's worker: Ray titles processes and lists actors by it
        host = type(self.worker.__name__, (Host,), {"__module__": __name__})
        remote = ray.remote(host).options(max_restarts=0, **options)
        shared = [ray.put(arg) for arg in self.args]  # stored once, fetched by each actor
        torch_device = "cuda" if device == "gpu" else "cpu"

        def new_actor() -> Any:
            return remote.remote(self.worker, *shared, device=torch_device, threads=threads)

        log.info("%d %s actors of %s with %s", count, device, self.worker.__name__, options)
        self.new_actor, self.options = new_actor, options
        self.actors = [None] * count
        for slot in range(count):
            self._launch(slot)

    def _launch(self, slot: int) -> None:
        """A new actor in ``slot``; it takes tasks once its readiness call returns."""
        assert self.new_actor is not None
        actor = self.actors[slot] = self.new_actor()
        self.starting[actor.start.remote()] = slot

    def _started(self, ref: Any, slot: int) -> bool:
        """Whether the actor in ``slot`` is ready; one that failed to start is replaced
        (``runtime.max_retries`` times per actor asked for, in all), unless its error is
        fatal."""
        ray = self.ray
        try:
            node = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            cause = getattr(error, "cause", None)
            self._stop_if_fatal("worker start", cause if cause is not None else error)
            self.start_failures += 1
            if self.start_failures > self.runtime.max_retries * len(self.actors):
                log.warning("an actor could not start (%s); not replaced", error)
                self.actors[slot] = None
            else:
                log.warning("an actor could not start (%s); starting a new one", error)
                self._launch(slot)
            return False
        log.info("%s actor %d ready on %s", self.worker.__name__, slot, describe(node))
        return True

    def _report_waiting(self, ready: int) -> None:
        """Every ``WAIT_REPORT_S`` while actors wait for room: how many, for what."""
        waiting = len(self.starting)
        message = (
            f"{ready} of {ready + waiting} actors ready; {waiting} wait for room on the "
            f"cluster ({self.options} each): an autoscaler adds nodes for them, a cluster "
            "without one starts them only when resources free up"
        )
        (log.warning if ready == 0 else log.info)(message)

    def _map_ray(
        self, tasks: list, name: Callable[[Any], str], meter: Progress, reduce: Callable
    ) -> tuple[list, list]:
        if not self.actors:
            self._start(len(tasks))
        ray = self.ray
        pending = deque(tasks)
        tries: dict[int, int] = {}
        waiting = set(self.starting.values())
        ready = [s for s, a in enumerate(self.actors) if a is not None and s not in waiting]
        idle = [slot for slot in ready for _ in range(self.per_worker)]
        in_flight: dict[Any, tuple[int, Any, Any]] = {}  # ref -> slot, task, actor
        results, failures = [], []
        while pending or in_flight:
            while idle and pending:
                slot, task = idle.pop(0), pending.popleft()
                actor = self.actors[slot]
                in_flight[actor.run.remote(task)] = (slot, task, actor)
            if not in_flight and not self.starting:
                raise RunFailed(
                    f"no actor of {self.worker.__name__} could start ({self.start_failures} "
                    f"tries); {len(pending)} {self.label}(s) left undone"
                )
            done, _ = ray.wait([*in_flight, *self.starting], num_returns=1, timeout=WAIT_REPORT_S)
            if not done:
                self._report_waiting(sum(a is not None for a in self.actors) - len(self.starting))
                continue
            [ref] = done
            if ref in self.starting:
                slot = self.starting.pop(ref)
                if self._started(ref, slot):
                    idle += [slot] * self.per_worker
                continue
            slot, task, actor = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                if not isinstance(error, ray.exceptions.RayActorError):
                    idle.append(slot)
                elif self.actors[slot] is actor:  # not replaced yet (by its other tasks)
                    log.warning("actor for %s died; starting a new one", name(task))
                    idle = [s for s in idle if s != slot]
                    self._launch(slot)
                cause = getattr(error, "cause", None)
                tries[id(task)] = tries.get(id(task), 0) + 1
                self._failed(name(task), cause if cause is not None else error, tries[id(task)])
                if tries[id(task)] > self.runtime.max_retries:
                    failures.append((name(task), error))
                else:
                    pending.append(task)
                continue
            idle.append(slot)
            meter.update(result)
            results.append(reduce(result))
        return results, failures
