"""The botocore settings of every S3 request dreamshard makes: bounded waits, one attempt.

A request waits at most ``connect_timeout`` for the connection and ``read_timeout`` for
each read of the answer; botocore makes one attempt (its retries would stack with
dreamshard's own, ``runtime.io_retries``). Each may be overridden in
``storage_options.config_kwargs``.

botocore asks every upload (``PutObject``, ``UploadPart``) to wait for ``100 Continue``
before sending the body, and aiohttp bounds that wait by no timeout: a server that
accepts the connection and never answers held a write forever, whatever
``read_timeout`` said. ``NoExpectSession`` sends the body at once instead, so the
read timeout bounds the wait for the answer (a refused upload is then sent whole before
its error arrives).
"""

from __future__ import annotations

import functools
from typing import Any

S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 15
S3_BOTOCORE_RETRIES = {"mode": "standard", "total_max_attempts": 1}


@functools.cache
def no_expect_session() -> type:
    """``NoExpectSession``: aiobotocore's HTTP session without ``Expect: 100-continue``
    (not signed). Built on first use, so that a run on local folders never imports the S3
    stack (a machine without it, such as a GPU node running ``executor: inline``)."""
    from aiobotocore.httpsession import AIOHTTPSession

    class NoExpectSession(AIOHTTPSession):
        async def send(self, request: Any) -> Any:
            if "Expect" in request.headers:
                del request.headers["Expect"]
            return await super().send(request)

    NoExpectSession.__qualname__ = "NoExpectSession"  # pickled by reference: see below
    return NoExpectSession


def __getattr__(name: str) -> Any:
    """``NoExpectSession`` as a module attribute, so that storage options holding it
    pickle (to Ray actors) by reference, as a class defined at module level does."""
    if name == "NoExpectSession":
        return no_expect_session()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def s3_config_kwargs(config: dict[str, Any] | None) -> dict[str, Any]:
    """``botocore.client.Config`` arguments: ``config`` with dreamshard's defaults filled in."""
    config = dict(config or {})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", S3_READ_TIMEOUT_S)
    config.setdefault("retries", dict(S3_BOTOCORE_RETRIES))
    config.setdefault("http_session_cls", no_expect_session())
    return config
