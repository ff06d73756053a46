"""One writer per run: a lease object in the run folder, ``{run}/lease.json``.

A driver takes the lease before it writes anything in the run folder and gives it back
when it stops (success or failure). While it holds it, a background thread rewrites the
lease every ``runtime.lease_heartbeat_s`` seconds. A second driver on the same run finds
a fresh lease and refuses (:class:`LeaseHeld`, exit 2), naming the holder's host, pid and
start time. A lease whose last heartbeat is older than its ``timeout_s`` (recorded in
the lease: ``runtime.lease_timeout_s`` of its holder), or whose holder is a process of
this host that no longer exists, belonged to a crashed driver: it is taken over, with a
warning. Heartbeats compare wall clocks: the machines' clocks must agree to well within
the timeout (NTP does).

Taking the lease: locally the file is created exclusively (``O_EXCL``: atomic). Object
stores do not all offer a create-if-absent, so there the lease is written, then read
back to confirm it is ours. Two drivers that both read "no lease" before either wrote
can both confirm (each reads back its own write before the other's lands): the window is
one read-write round trip (milliseconds to a few hundred on S3). The next heartbeat of
the driver whose write was overwritten finds another token and marks the lease lost
(:meth:`Lease.check` then fails that driver with exit 1); until then both may write the
same deterministic shards, each tar and sidecar atomically. Taking over a stale lease has
the same window, locally too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import uuid
from typing import Any, ClassVar

from pipeline.errors import InputError, RunError
from pipeline.io.storage import filesystem, join, protocol_of, read_bytes, write_json

log = logging.getLogger("dreamshard.lease")
KIND = "dreamshard-lease"
FIELDS = {"host": str, "pid": int, "started": str, "heartbeat": str, "token": str}


class LeaseHeld(InputError):
    """Another live driver holds the run's lease (exit 2: nothing was written)."""


class LeaseLost(RunError):
    """This driver's lease was taken by another driver while it ran (exit 1)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_lease(url: str, blob: bytes) -> dict[str, Any]:
    """The lease at ``url`` from its bytes; :class:`InputError` if it is not a lease."""
    try:
        data = json.loads(blob)
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError("not a dreamshard lease object")
        for name, kind in FIELDS.items():
            if not isinstance(data.get(name), kind):
                raise ValueError(f"no valid {name!r}")
        if dt.datetime.fromisoformat(data["heartbeat"]).tzinfo is None:
            raise ValueError("a heartbeat without a time zone")
        float(data.get("timeout_s", 0))
    except (ValueError, TypeError) as error:
        raise InputError(
            f"{url}: not a dreamshard lease ({error}); if no driver is running on this run, "
            "remove the file and rerun"
        ) from None
    return data


def describe(holder: dict[str, Any]) -> str:
    return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"


class Lease:
    """The lease of the run at ``run_url``: ``with Lease(...):`` holds it for the block."""

    # The tokens this process holds now. A lease naming this process with a token not
    # here was left by an earlier driver of this process whose release the storage
    # refused (an object store down): it is stale, and a rerun in-process takes it over.
    held_here: ClassVar[set[str]] = set()

    def __init__(
        self,
        run_url: str,
        options: dict[str, Any] | None = None,
        heartbeat_s: float = 10.0,
        timeout_s: float = 60.0,
    ) -> None:
        self.url = join(run_url, "lease.json")
        self.options, self.heartbeat_s, self.timeout_s = options, heartbeat_s, timeout_s
        self.record = {
            "kind": KIND,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now().isoformat(timespec="seconds"),
            "heartbeat": now().isoformat(),
            "token": uuid.uuid4().hex,
            "heartbeat_s": heartbeat_s,
            "timeout_s": timeout_s,
        }
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(cls, run: Any, runtime: Any) -> Lease:
        """The lease of a run section with a runtime section's heartbeat and timeout."""
        return cls(
            run.run_url, run.storage_options, runtime.lease_heartbeat_s, runtime.lease_timeout_s
        )

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def current(self) -> dict[str, Any] | None:
        """The lease as stored now, or ``None`` when there is none."""
        try:
            return parse_lease(self.url, read_bytes(self.url, self.options))
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder."""
        holder = self.current()
        if holder is not None:
            self._check_stale(holder)
        if holder is None and protocol_of(self.url) == "file":
            self._create_exclusive()
        else:
            self._write()
        confirmed = self.current()
        if confirmed is None or confirmed["token"] != self.record["token"]:
            raise LeaseHeld(self._held_message(confirmed or holder or self.record))
        Lease.held_here.add(self.record["token"])
        self._thread = threading.Thread(target=self._beat, name="dreamshard-lease", daemon=True)
        self._thread.start()

    def _check_stale(self, holder: dict[str, Any]) -> None:
        age = (now() - dt.datetime.fromisoformat(holder["heartbeat"])).total_seconds()
        timeout = float(holder.get("timeout_s", self.timeout_s))
        if age <= timeout and not self._holder_is_gone(holder):
            raise LeaseHeld(self._held_message(holder))
        log.warning(
            "taking over the lease %s of a driver that stopped without releasing it "
            "(%s; last heartbeat %.0f s ago, timeout %.0f s)",
            self.url,
            describe(holder),
            age,
            timeout,
        )

    @staticmethod
    def _holder_is_gone(holder: dict[str, Any]) -> bool:
        """A holder on this host whose process no longer exists (a killed driver), or an
        earlier driver of this process that could not remove its lease."""
        if holder["host"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return holder["token"] not in Lease.held_here
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _held_message(self, holder: dict[str, Any]) -> str:
        return (
            f"{self.url}: another driver holds this run ({describe(holder)}; last heartbeat "
            f"{holder['heartbeat']}); wait for it to finish, or choose another run.name. A "
            f"crashed driver's lease is taken over once its heartbeat is "
            f"{float(holder.get('timeout_s', self.timeout_s)):.0f} s old"
        )

    def _create_exclusive(self) -> None:
        fs, path = filesystem(self.url, self.options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        draft = f"{path}.draft-{self.record['token']}"
        with open(draft, "w") as f:  # complete before it appears under its name
            f.write(json.dumps(self.record, indent=2, sort_keys=True) + "\n")
        try:
            os.link(draft, path)  # fails if the name exists: an atomic create-if-absent
        except FileExistsError:  # another driver created it first: it holds the run
            raise LeaseHeld(self._held_message(self.current() or self.record)) from None
        finally:
            os.unlink(draft)

    def _write(self) -> None:
        self.record["heartbeat"] = now().isoformat()
        write_json(self.url, self.record, self.options)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.current()
                if holder is None or holder["token"] != self.record["token"]:
                    self.lost = True
                    who = describe(holder) if holder else "nobody"
                    log.error("the lease %s was taken over (now: %s)", self.url, who)
                    return
                self._write()
            except Exception as error:  # a storage hiccup: the next beat tries again
                log.warning("lease heartbeat to %s failed: %s", self.url, error)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another driver took the lease while this one ran."""
        if self.lost:
            raise LeaseLost(
                f"{self.url}: another driver took over this run's lease while this one ran "
                "(a heartbeat older than the timeout); its shards are kept, rerun to finish"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this driver's."""
        self._stop.set()
        Lease.held_here.discard(self.record["token"])
        if self._thread is not None:  # bounded: a beat may hang on a store that is down
            self._thread.join(max(self.heartbeat_s, 5.0))
        if self.lost:
            return
        try:
            holder = self.current()
            if holder is not None and holder["token"] == self.record["token"]:
                fs, path = filesystem(self.url, self.options)
                fs.rm(path)
        except Exception as error:  # a lease left behind is taken over after its timeout
            log.warning("could not remove the lease %s: %s", self.url, error)
