"""Transient storage failures: which errors are worth retrying, and bounded retries with
doubling, fully jittered waits for idempotent storage actions (a whole atomic write, a read).

Full jitter (each wait drawn uniformly from 0 to ``backoff_s * 2**attempt``, capped at
:data:`MAX_WAIT_S`) keeps many actors that met the same outage from retrying in lockstep;
the waits of one call add up to at most :func:`retry_budget_s`.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import InputError

log = logging.getLogger("dreamshard.storage")
T = TypeVar("T")


class StorageUnavailable(OSError):
    """The object store did not answer within the retry budget (``runtime.io_retries``)."""


# Errors that say "try again later", by class name anywhere in an error's MRO or cause
# chain (botocore, aiohttp and fsspec raise their own types for a dead endpoint).
TRANSIENT_NAMES = {
    "ConnectionError",  # the builtin (refused, reset, aborted, broken pipe) and botocore's
    "TimeoutError",
    "HTTPClientError",  # botocore: connection closed, read timeout, proxy errors
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "FSTimeoutError",
    "IncompleteRead",
}
TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}
TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "TooManyRequests",  # HTTP 429 from S3-compatible stores
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
TOO_MANY_REQUESTS = 429
MAX_WAIT_S = 60.0  # the cap of one wait, however many retries are allowed
# What a retry cannot fix: the user's input, or a definite answer from the store.
PERMANENT = (
    InputError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a transient storage failure: connection
    refused or reset, a timeout, an HTTP 5xx. Never bad input or a missing object."""
    if isinstance(error, PERMANENT):
        return False
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if {c.__name__ for c in type(current).__mro__} & TRANSIENT_NAMES:
            return True
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == TOO_MANY_REQUESTS or code in TRANSIENT_CODES:
                return True
        current = current.__cause__ or current.__context__
    return False


def retry_wait(
    attempt: int, backoff_s: float, uniform: Callable[[], float] = random.random
) -> float:
    """The wait before retry ``attempt + 1`` (``attempt`` counts from 0): full jitter,
    ``uniform(0, min(MAX_WAIT_S, backoff_s * 2**attempt))``; ``uniform()`` is in [0, 1)."""
    return uniform() * min(MAX_WAIT_S, backoff_s * 2**attempt)


def retry_budget_s(retries: int, backoff_s: float) -> float:
    """The most :func:`with_retries` can wait in all: the sum of every wait's upper bound."""
    return sum(min(MAX_WAIT_S, backoff_s * 2**attempt) for attempt in range(retries))


def with_retries(
    action: Callable[[], T],
    what: str,
    retries: int,
    backoff_s: float,
    endpoint: str = "storage",
    sleep: Callable[[float], None] = time.sleep,
    uniform: Callable[[], float] = random.random,
) -> T:
    """``action()``, retried up to ``retries`` times on transient storage errors, waiting
    a random time up to ``backoff_s``, then up to twice as long each time (full jitter,
    :func:`retry_wait`; ``uniform`` and ``sleep`` are injectable for tests). Other errors
    pass through at once; a transient error that outlasts the budget becomes
    :class:`StorageUnavailable` naming ``what`` (a URL or shard) and ``endpoint``.
    ``action`` must be idempotent (a whole atomic write, a read)."""
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if not is_transient(error):
                raise
            reason = f"{type(error).__name__}: {error}"
            if attempt == retries:
                raise StorageUnavailable(
                    f"{what}: {endpoint} did not answer after {attempt + 1} tries over "
                    f"{time.monotonic() - start:.0f} s ({reason}); completed shards are kept, "
                    "rerun to resume"
                ) from error
            delay = retry_wait(attempt, backoff_s, uniform)
            log.warning(
                "%s: %s failed (%s); retry %d of %d in %.2f s (jittered, at most %.1f s)",
                what,
                endpoint,
                reason,
                attempt + 1,
                retries,
                delay,
                min(MAX_WAIT_S, backoff_s * 2**attempt),
            )
            sleep(delay)
    raise AssertionError("unreachable")
