"""One storage code path: every location is an fsspec URL (plain path, file://, s3://).

S3 options come from ``run.storage_options`` (``endpoint_url``, ``key``, ``secret``,
``profile`` …) or the standard AWS environment. Nothing here logs an option value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import InputError
from pipeline.io.s3config import S3_BOTOCORE_RETRIES, s3_config_kwargs

SECRET_WORDS = ("key", "secret", "token", "password", "credential")
URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^/\s@]*@")
PROBE_SECONDS = 5
SINGLE_ATTEMPT_AGENT = "dreamshard-retried-write"

log = logging.getLogger("dreamshard.storage")
T = TypeVar("T")


def normalise_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``url``; ``endpoint_url`` is routed where s3fs wants it,
    and every S3 request gets botocore's connect and read timeouts and a single botocore
    attempt (unless ``config_kwargs`` says otherwise)."""
    options = dict(options or {})
    check_acl(options)
    if protocol_of(url) != "s3":
        return options
    if "endpoint_url" in options:
        client = dict(options.pop("client_kwargs", {}) or {})
        client["endpoint_url"] = options.pop("endpoint_url")
        options["client_kwargs"] = client
    options["config_kwargs"] = s3_config_kwargs(options.get("config_kwargs"))
    return options


PRIVATE_ACLS = ("private", "bucket-owner-full-control", "bucket-owner-read")


def check_acl(options: dict[str, Any]) -> None:
    """Refuse storage options that would make written objects readable by others.

    dreamshard sends no ACL with its uploads (objects are private to the bucket owner,
    and buckets with ACLs disabled, the AWS default, accept nothing else); a private
    canned ACL may be asked for explicitly in ``s3_additional_kwargs``.
    """
    extra = options.get("s3_additional_kwargs") or {}
    for key, value in extra.items():
        if key.lower() == "acl" and str(value).lower() not in PRIVATE_ACLS:
            raise InputError(
                f"storage_options.s3_additional_kwargs.{key}: {value!r} would let others read "
                f"every object written; dreamshard writes private objects (allowed: "
                f"{', '.join(PRIVATE_ACLS)})"
            )
        if key.lower().startswith("grant"):
            raise InputError(
                f"storage_options.s3_additional_kwargs.{key}: grants to other accounts are "
                "refused; give access through the bucket's policy"
            )


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(
    url: str, options: dict[str, Any] | None = None, single_attempt: bool = False
) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url``.

    ``single_attempt``: for writes the caller retries itself (:class:`ShardStore`). s3fs
    repeats a request that timed out or was throttled up to 5 times on its own
    (``S3FileSystem.retries``, not a constructor option), which would multiply the caller's
    budget; such writes get a filesystem of their own (told apart by its user agent) that
    tries once. Other operations keep s3fs's repeats: dreamshard does not retry reads.
    """
    opts = normalise_options(url, options)
    single = single_attempt and protocol_of(url) == "s3"
    if single:
        config = opts["config_kwargs"]
        agent = config.get("user_agent_extra")
        config["user_agent_extra"] = (
            f"{agent} {SINGLE_ATTEMPT_AGENT}" if agent else SINGLE_ATTEMPT_AGENT
        )
    try:
        fs, path = url_to_fs(url, **opts)
    except (ValueError, ImportError) as error:
        raise InputError(f"{url}: unsupported storage URL ({error})") from error
    if single:
        fs.retries = 1  # this instance only (fsspec caches it under these options)
    return fs, path


def absolute(url: str) -> str:
    """A local path made absolute (workers run in other folders); other URLs unchanged."""
    if protocol_of(url) != "file":
        return url
    return os.path.abspath(url.removeprefix("file://"))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/' (fsspec URLs use '/' everywhere)."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with every secret-looking value replaced, for manifests and logs."""

    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if any(word in key.lower() for word in SECRET_WORDS):
            return "***"
        if isinstance(value, str):
            return redact_url(value)
        return value

    return clean(dict(options or {}))


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` replaced."""
    return URL_PASSWORD.sub(r"\1***@", text)


class RedactingFormatter(logging.Formatter):
    """Formats like ``formatter``, then removes URL passwords (from tracebacks too)."""

    def __init__(self, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = formatter or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(self.inner.format(record))


def exists(url: str, options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, options)
    return fs.exists(path)


def read_bytes(url: str, options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str, options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, options))


def write_json(
    url: str, value: Any, options: dict[str, Any] | None = None, single_attempt: bool = False
) -> None:
    with atomic_open(url, options, single_attempt) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


@contextmanager
def atomic_open(
    url: str, options: dict[str, Any] | None = None, single_attempt: bool = False
) -> Iterator[IO[bytes]]:
    """Open ``url`` for writing so that readers see the whole file or nothing.

    Object stores make an upload visible only when it completes (one PUT, or the
    completion of a multipart upload), so the final key is written directly. A local
    file is written under a temporary name and renamed. On an error nothing is left.
    ``single_attempt``: see :func:`filesystem` (for writes the caller retries).
    """
    fs, path = filesystem(url, options, single_attempt)
    local = protocol_of(url) == "file"
    target = f"{path}.partial-{uuid.uuid4().hex}" if local else path
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if local and parent:
        fs.makedirs(parent, exist_ok=True)
    f = fs.open(target, "wb")
    try:
        yield f
        f.close()  # completes the upload
        if local:
            os.replace(target, path)
        elif single_attempt:  # written by its own instance: the shared one's listings are stale
            filesystem(url, options)[0].invalidate_cache(path)
    except BaseException:  # in the caller's block, the upload, or the rename
        _discard(f, fs, target, local)
        raise


def _discard(f: Any, fs: Any, target: str, local: bool) -> None:
    if hasattr(f, "discard") and not local:
        f.discard()  # abandons an S3 multipart upload instead of completing it
        f.closed = True  # s3fs leaves it open: a later close (or __del__) would upload
    else:
        with contextlib.suppress(OSError):  # a close that already failed may fail again
            f.close()
    if local and fs.exists(target):
        fs.rm(target)


def check_writable(url: str, options: dict[str, Any] | None = None) -> None:
    """Raise :class:`InputError` unless ``url`` can be written, creating nothing.

    Local: the nearest existing ancestor must be a writable folder. Object stores:
    the endpoint must answer and the bucket must exist, within a few seconds.
    """
    protocol = protocol_of(url)
    if protocol == "file":
        probe = absolute(url)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise InputError(f"run.output: {probe} exists and is not a folder")
        try:  # os.access says yes to root even on read-only mounts: try for real
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as error:
            raise InputError(f"run.output: {probe} is not writable ({error.strerror})") from error
        return
    if protocol == "s3":
        _check_bucket(url, options)
        return
    filesystem(url, options)  # other fsspec backends: only check that the URL resolves


def _check_bucket(url: str, options: dict[str, Any] | None) -> None:
    opts = normalise_options(url, options)
    opts["config_kwargs"] = {
        **opts.get("config_kwargs", {}),
        "connect_timeout": PROBE_SECONDS,
        "read_timeout": PROBE_SECONDS,
        "retries": dict(S3_BOTOCORE_RETRIES),
    }
    opts["skip_instance_cache"] = True
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    endpoint = endpoint_of(url, options)
    try:
        fs = fsspec.filesystem("s3", **opts)
        fs.ls(bucket, refresh=True)
    except FileNotFoundError as error:
        raise InputError(f"run.output: bucket {bucket!r} does not exist at {endpoint}") from error
    except PermissionError as error:
        raise InputError(f"run.output: no permission to list bucket {bucket!r}") from error
    except Exception as error:  # botocore raises many types for an unreachable endpoint
        raise InputError(
            f"run.output: S3 endpoint {endpoint} did not answer for bucket {bucket!r} "
            f"({type(error).__name__}: {redact_url(str(error))})"
        ) from None  # the chained error would print the endpoint's password


def endpoint_of(url: str, options: dict[str, Any] | None = None) -> str:
    """Where ``url`` lives, for messages: the S3 endpoint (a password in it redacted), else
    the URL's scheme."""
    if protocol_of(url) != "s3":
        return f"{protocol_of(url)} storage"
    opts = normalise_options(url, options)
    endpoint = opts.get("client_kwargs", {}).get("endpoint_url") or os.environ.get(
        "AWS_ENDPOINT_URL", "the default AWS endpoint"
    )
    return redact_url(endpoint)


WEBDATASET_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "memory")


class FsspecOpener:
    """Opens URLs for reading through fsspec with fixed storage options (a plain class, so
    that DataLoader workers can pickle it). Holds the options: never log one."""

    def __init__(self, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
        fs, path = filesystem(url, self.storage_options)
        return fs.open(path, mode)

    def __repr__(self) -> str:
        return f"FsspecOpener({redact(self.storage_options)})"

    def streams(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A webdataset pipeline stage: ``{"url": …}`` -> the same with an open
        ``"stream"``, closed when the next shard is asked for (the tar is read by then)."""
        for sample in source:
            with self(sample["url"]) as stream:
                yield {**sample, "stream": stream}


def register_webdataset_opener(storage_options: dict[str, Any] | None = None) -> None:
    """Let the ``webdataset`` library open ``s3://`` (and other fsspec) URLs.

    ``storage_options`` are fsspec's, as ``run.storage_options`` takes them
    (``endpoint_url``, ``key``, ``secret``, ``profile``, ``client_kwargs`` …); without them
    the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …, profiles)
    is used. webdataset's openers are per process: a later call replaces this one.
    """
    from webdataset.gopen import gopen_schemes  # (webdataset.gopen is also a function)

    opener = FsspecOpener(storage_options)
    for scheme in WEBDATASET_SCHEMES:
        gopen_schemes[scheme] = opener
