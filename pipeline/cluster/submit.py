"""``dreamshard submit`` and ``dreamshard jobs``: runs on a remote Ray cluster, through the
Ray Jobs API (the dashboard's HTTP port, 8265 by default).

What travels with a job: the validated config with ``run.name`` resolved (so a queued
job keeps the night it was submitted for), a local teacher checkpoint when there is one,
and, unless ``--package installed``, this machine's ``pipeline``/``synthesizers`` code.

Credentials never travel. Ray shows a job's entrypoint, runtime environment (its
``env_vars`` included) and metadata to anyone who can reach the dashboard, and keeps
uploaded files in the cluster's object store; so ``submit`` refuses a config with
credentials in ``run.storage_options`` and forwards no environment variables. The
cluster's own environment supplies them (a Kubernetes Secret, the nodes' environment,
an instance role): see ``deploy/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pipeline.cli.arguments import config_command
from pipeline.cluster.staging import CONFIG_NAME, job_command, stage, write_job
from pipeline.errors import InputError
from pipeline.io.storage import redact

__all__ = ["CONFIG_NAME", "stage", "submit"]  # CONFIG_NAME and stage: pipeline.cluster.staging

PROBE_SECONDS = 5.0  # an address that does not answer is reported within this
POLL_SECONDS = 2.0
LOG_TAIL_LINES = 30  # printed when a job fails
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError("--address is required (the dashboard URL, e.g. http://HOST:8265)")
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):  # auto, ray://…
        raise InputError(
            f"--address {address!r}: the Ray Jobs API needs the dashboard's http(s) URL, "
            "e.g. http://HOST:8265 (not a ray:// client address or 'auto')"
        )
    return address.rstrip("/")


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient``, after a bounded check that the address answers."""
    url = job_address(address)
    headers = auth_headers()
    probe = urllib.request.Request(f"{url}/api/version", headers=headers)
    try:
        with urllib.request.urlopen(probe, timeout=PROBE_SECONDS) as response:
            json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise InputError(
            f"--address {url}: HTTP {error.code} from /api/version; is this a Ray dashboard "
            "(with authentication, set RAY_AUTH_TOKEN)?"
        ) from error
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise InputError(
            f"--address {url}: no Ray dashboard answered within {PROBE_SECONDS:.0f} s "
            f"({reason}); check the host and the dashboard port (8265 by default)"
        ) from error
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url, headers=headers or None)
    except (ConnectionError, RuntimeError) as error:
        raise InputError(f"--address {url}: {error}") from error


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a dashboard with token authentication
    (``RAY_AUTH_MODE=token``; the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``, as Ray's own clients find it); none otherwise. Ray reads
    these once per process, so they are read here, for every connection."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    if not token:
        raise InputError(
            "RAY_AUTH_MODE=token but no token was found: set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH (or write ~/.ray/auth_token)"
        )
    return {"Authorization": f"Bearer {token}"}


def check_credentials(options: dict[str, Any]) -> None:
    """Refuse credentials in ``run.storage_options``: the cluster would store and show them."""
    secret = secret_fields(options, redact(options))
    if secret:
        raise InputError(
            f"run.storage_options.{secret[0]}: credentials are never sent with a job (Ray "
            "shows a job's config, environment and metadata on its dashboard). Give the "
            "cluster its own AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (a Kubernetes Secret, "
            "the nodes' environment or an instance role; see deploy/README.md) and keep only "
            "endpoint_url here"
        )


def secret_fields(options: dict[str, Any], redacted: dict[str, Any], where: str = "") -> list[str]:
    """Dotted names of the values :func:`redact` hides (nested mappings included)."""
    found = []
    for key, value in options.items():
        if isinstance(value, dict):
            found += secret_fields(value, redacted[key], f"{where}{key}.")
        elif redacted[key] != value:
            found.append(f"{where}{key}")
    return sorted(found)


def submit(args: argparse.Namespace) -> int:
    """``dreamshard submit``: validate locally, then hand the job to the cluster."""
    words, config = list(args.command), args.config
    if config is None:  # `submit --command eval kd CONFIG`: the option took CONFIG too
        if len(words) < 2:
            raise InputError("submit: CONFIG is required")
        config = words.pop()
    command = job_command(words)
    with tempfile.TemporaryDirectory(prefix="dreamshard-job-") as staging:
        prepared = command.prepare(config, list(args.overrides), Path(staging))
        check_credentials(prepared.data["run"]["storage_options"])
        for note in prepared.notes:
            print(f"dreamshard: note: {note}", file=sys.stderr)
        client = connect(args.address)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        submission_id = f"dreamshard-{prepared.run}-{stamp}-{uuid.uuid4().hex[:6]}"
        entrypoint, runtime_env, metadata = write_job(
            prepared, command, Path(staging), args.package
        )
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                metadata=metadata,
                submission_id=submission_id,
            )
        except RuntimeError as error:
            raise InputError(f"the cluster refused the job: {error}") from error
    print(f"submitted {job_id}: {' '.join(words)} {prepared.run} -> {prepared.output}")
    if not args.wait:
        print(f"  follow: dreamshard jobs logs {job_id} --follow --address {client.get_address()}")
        return 0
    return follow(client, job_id)


def follow(client: Any, job_id: str) -> int:
    """Stream the job's log until it ends; 0 if it succeeded, 1 (with its last lines) if not."""
    try:
        stream_logs(client, job_id)
        status = wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\ndreamshard: stopped following; the job keeps running "
            f"(dreamshard jobs stop {job_id} to end it)",
            file=sys.stderr,
        )
        return 1
    if status == "SUCCEEDED":
        return 0
    info = client.get_job_info(job_id)
    tail = client.get_job_logs(job_id).splitlines()[-LOG_TAIL_LINES:]
    print(
        f"dreamshard: job {job_id} {status}: {info.message or ''}\n"
        f"--- last {len(tail)} log lines\n" + "\n".join(tail),
        file=sys.stderr,
    )
    return 1


def stream_logs(client: Any, job_id: str) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except RuntimeError as error:  # the log stream broke; the status still tells the outcome
        print(f"dreamshard: log stream interrupted ({error}); waiting for the job", file=sys.stderr)


def wait_terminal(client: Any, job_id: str) -> str:
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(POLL_SECONDS)


def job_call(client: Any, method: str, job_id: str) -> Any:
    """A client call on one job; an unknown ID is bad input."""
    try:
        return getattr(client, method)(job_id)
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise InputError(f"no job {job_id!r} at {client.get_address()}") from error
        raise


def jobs(args: argparse.Namespace) -> int:
    """``dreamshard jobs {list,status,logs,stop}``."""
    client = connect(args.address)
    if args.action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            started = dt.datetime.fromtimestamp((job.start_time or 0) / 1000, dt.timezone.utc)
            run = (job.metadata or {}).get("dreamshard_run", "-")
            print(f"{job.submission_id}  {job.status.value:<9}  {started:%Y-%m-%d %H:%M}Z  {run}")
        return 0
    if args.action == "status":
        info = job_call(client, "get_job_info", args.job_id)
        fields = ("submission_id", "status", "message", "start_time", "end_time", "metadata")
        report = {name: getattr(info, name) for name in fields}
        report["status"] = str(info.status.value)
        print(json.dumps(report, indent=2, default=str))
        return 0 if report["status"] != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            job_call(client, "get_job_status", args.job_id)
            stream_logs(client, args.job_id)
        else:
            print(job_call(client, "get_job_logs", args.job_id), end="")
        return 0
    stopped = job_call(client, "stop_job", args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``submit`` and ``jobs`` on the top-level subparsers."""
    address_help = "the dashboard URL, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS)"
    submit_parser = config_command(
        commands, "submit", "run a config on a Ray cluster (Jobs API)", submit, config_nargs="?"
    )
    submit_parser.add_argument(
        "--command",
        nargs="+",
        default=["run"],
        metavar="WORD",
        help="what the job runs: run (default), or eval ACTION (kd, prune, scratch, fidelity) "
        "with an evaluation config",
    )
    submit_parser.add_argument("--address", help=address_help)
    submit_parser.add_argument(
        "--wait", action="store_true", help="stream the job's log; exit with its outcome"
    )
    submit_parser.add_argument(
        "--package",
        choices=["upload", "installed"],
        default="upload",
        help="upload this machine's dreamshard code (default), or use the cluster's install",
    )

    jobs_parser = commands.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    actions = jobs_parser.add_subparsers(required=True, metavar="ACTION", dest="action")
    actions.add_parser("list", help="every job on the cluster").add_argument(
        "--address", help=address_help
    )
    for action, text in (
        ("status", "a job's status, message and metadata"),
        ("logs", "a job's log"),
        ("stop", "stop a running job"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("job_id")
        parser.add_argument("--address", help=address_help)
        if action == "logs":
            parser.add_argument("--follow", action="store_true", help="stream until it ends")
    jobs_parser.set_defaults(handler=jobs)
