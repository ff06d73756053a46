"""Transient storage failures: which errors are worth retrying, and bounded retries with
doubling waits for idempotent storage actions (a whole atomic write, a read)."""

from __future__ import annotations

import errno
import logging
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
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
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
            if status >= 500 or code in TRANSIENT_CODES:
                return True
        current = current.__cause__ or current.__context__
    return False


def with_retries(
    action: Callable[[], T],
    what: str,
    retries: int,
    backoff_s: float,
    endpoint: str = "storage",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``action()``, retried up to ``retries`` times on transient storage errors, waiting
    ``backoff_s``, then twice as long each time. Other errors pass through at once; a
    transient error that outlasts the budget becomes :class:`StorageUnavailable` naming
    ``what`` (a URL or shard) and ``endpoint``. ``action`` must be idempotent (a whole
    atomic write, a read)."""
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
            delay = backoff_s * 2**attempt
            log.warning(
                "%s: %s failed (%s); retry %d of %d in %.1f s",
                what,
                endpoint,
                reason,
                attempt + 1,
                retries,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")
