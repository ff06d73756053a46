"""Security: secrets never leak, servers listen on loopback, tar members and checkpoints
are validated on read, objects are written without public ACLs."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from seaweed import S3Server, free_port
from tests_support import config_dict

from pipeline.cli.main import main

REPO = Path(__file__).resolve().parents[1]
# Distinctive values: any occurrence outside the config file that holds them is a leak.
FAKE_KEY, FAKE_SECRET = "AKIALEAKCANARY000001", "leak-canary-secret-7f3e9b2c"
URL_PASSWORD = "leak-canary-url-password-4d1a"


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def leaks(texts: dict[str, bytes], secrets: list[str]) -> list[str]:
    """``name: secret`` for every text that contains a secret."""
    return [
        f"{name}: {secret}"
        for name, data in texts.items()
        for secret in secrets
        if secret.encode() in data
    ]


def bucket_texts(server: S3Server, bucket: str) -> dict[str, bytes]:
    fs = server.filesystem()
    return {path: fs.cat(path) for path in fs.find(bucket)}


def clean_env() -> dict[str, str]:
    """This environment without AWS_* and Ray's address (a run gets only what we give)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    return env


def run_process(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-v", *args],
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("via", ["storage_options", "environment"])
def test_a_ray_run_on_s3_leaks_no_credentials(
    via: str, s3_server: S3Server, tmp_path: Path, teacher_checkpoint: str
) -> None:
    """A real run (embedded Ray, one actor, SeaweedFS) with the credentials in the config
    or in the environment: nothing it prints, logs (Ray's session logs included) or
    writes to the bucket contains them."""
    bucket = s3_server.make_bucket("leak")
    env = clean_env()
    options = {"endpoint_url": s3_server.endpoint_url}
    if via == "storage_options":
        options = s3_server.storage_options()
    else:
        env.update(s3_server.env())
    config = config_dict(
        f"s3://{bucket}/runs",
        teacher_checkpoint,
        run={"name": "leakcheck", "storage_options": options},
        plan={"num_images": 16, "batch_size": 8, "shard_size": 8},
        runtime={"executor": "ray", "num_workers": 1, "progress": True},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_dir = Path(tempfile.mkdtemp(prefix="rl-"))  # short: Ray's socket paths must be short
    try:
        env["RAY_TMPDIR"] = str(ray_dir)
        result = run_process(["run", str(path)], env, tmp_path)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        texts = {"stdout": result.stdout, "stderr": result.stderr}
        texts.update({str(p): p.read_bytes() for p in files_under(ray_dir)})
    finally:
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)
    objects = bucket_texts(s3_server, bucket)
    assert any(name.endswith("manifest.json") for name in objects)
    assert sum(name.endswith(".tar") for name in objects) == 2
    assert any("worker-" in name for name in texts), "Ray's session logs were not read"
    assert b"wrote 16 images" in result.stdout
    texts.update(objects)
    assert leaks(texts, [s3_server.secret, s3_server.key]) == []


def failing_output(server: S3Server, how: str, port: int) -> tuple[str, dict]:
    """(run.output, run.storage_options) of a run that must fail, with canary secrets."""
    canary = {"key": FAKE_KEY, "secret": FAKE_SECRET}
    if how == "missing-bucket":
        return "s3://no-such-bucket-leak/runs", {**server.storage_options(), **canary}
    if how == "wrong-credentials":
        bucket = server.make_bucket("leak")
        return f"s3://{bucket}/runs", {"endpoint_url": server.endpoint_url, **canary}
    endpoint = f"http://canary:{URL_PASSWORD}@127.0.0.1:{port}"
    return "s3://quiet/runs", {"endpoint_url": endpoint, **canary}


@pytest.mark.parametrize("how", ["missing-bucket", "wrong-credentials", "unreachable"])
def test_failing_runs_name_the_problem_but_not_the_credentials(
    how: str, s3_server: S3Server, tmp_path: Path, teacher_checkpoint: str, capsys, caplog
) -> None:
    caplog.set_level(logging.INFO)  # what -v shows
    output, options = failing_output(s3_server, how, free_port())
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(config_dict(output, teacher_checkpoint, run={"storage_options": options}))
    )
    code = main(["-v", "run", str(config)])
    captured = capsys.readouterr()
    assert code == 2 and "run.output" in captured.err
    texts = {
        "stdout": captured.out.encode(),
        "stderr": captured.err.encode(),
        "log": "\n".join(r.getMessage() for r in caplog.records).encode(),
    }
    texts.update({str(p): p.read_bytes() for p in files_under(tmp_path) if p != config})
    assert leaks(texts, [FAKE_KEY, FAKE_SECRET, URL_PASSWORD]) == []
    if how == "unreachable":
        assert "canary:***@127.0.0.1" in captured.err  # the endpoint is named, redacted


def test_manifests_redact_every_storage_option(make_config, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.config import RetrievalConfig
    from pipeline.stages.manifest import resolved_config

    secrets = {
        "endpoint_url": f"https://user:{URL_PASSWORD}@s3.example:9000",
        "key": FAKE_KEY,
        "client_kwargs": {"aws_secret_access_key": FAKE_SECRET},
    }
    config = make_config(run={"storage_options": secrets})
    pool = RetrievalConfig(pool="s3://p/x", labeled="l", pool_storage_options=dict(secrets))
    data = resolved_config(replace(config, retrieval=pool))
    text = yaml.safe_dump(data)
    assert FAKE_KEY not in text and FAKE_SECRET not in text and URL_PASSWORD not in text
    assert data["run"]["storage_options"]["endpoint_url"] == "https://user:***@s3.example:9000"
    assert data["retrieval"]["pool_storage_options"]["key"] == "***"


# --- loopback -----------------------------------------------------------------------------


def process_tree(root: int) -> dict[int, str]:
    """``{pid: command name}`` of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat.split(" (", 1)[1].rsplit(")", 1)
            children.setdefault(int(rest.split()[1]), []).append(int(entry.name))
            names[int(entry.name)] = name
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        tree[pid] = names.get(pid, "?")
        stack += children.get(pid, [])
    return tree


def socket_inodes(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(target[len("socket:[") : -1])
    return found


def listening_sockets() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """``{inode: (address, port)}`` of every listening TCP socket (``/proc/net/tcp[6]``)."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (ipaddress.ip_address(packed), int(port, 16))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


EMBEDDED_RAY = """
import sys
from tests_support import config_dict
from pipeline.config import parse_config
from pipeline.execution.executor import connect_ray

config = parse_config(config_dict("out", "t.pt", runtime={"executor": "ray"}))
ray = connect_ray(config.runtime.address)
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.mark.slow
def test_the_embedded_ray_listens_on_loopback_only() -> None:
    env = clean_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the default a user gets
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'tests'}"
    ray_dir = Path(tempfile.mkdtemp(prefix="rl-"))
    env["RAY_TMPDIR"] = str(ray_dir)
    child = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_RAY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ray_dir,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(2)  # agents open their ports shortly after the cluster answers
        sockets = listening_sockets()
        bound = [
            (name, *sockets[inode])
            for pid, name in process_tree(child.pid).items()
            for inode in socket_inodes(pid)
            if inode in sockets
        ]
    finally:
        child.stdin.close()
        child.wait(60)
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)
    names = {name for name, _, _ in bound}
    assert {"gcs_server", "raylet"} <= names and len(bound) >= 6, bound  # Ray's servers seen
    exposed = [
        (name, str(address), port) for name, address, port in bound if not is_loopback(address)
    ]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_the_test_s3_server_listens_on_loopback_only() -> None:
    """The SeaweedFS the tests and benchmarks start is no more exposed than the run."""
    from seaweed import seaweed

    with seaweed() as server:
        sockets = listening_sockets()
        bound = [
            (name, *sockets[inode])
            for pid, name in process_tree(server.process.pid).items()
            for inode in socket_inodes(pid)
            if inode in sockets
        ]
    ports = {port for _, _, port in bound}
    assert server.ports["s3"] in ports, bound  # the S3 endpoint itself was seen
    exposed = [
        (name, str(address), port) for name, address, port in bound if not is_loopback(address)
    ]
    assert exposed == [], f"listening beyond loopback: {exposed}"


# --- tar members ----------------------------------------------------------------------------


def png_bytes(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


UNSAFE = {
    "absolute": ("/tmp/evil/0.png", tarfile.REGTYPE, ""),
    "dotdot": ("root/a/../../../evil.png", tarfile.REGTYPE, ""),
    "symlink": ("root/b/1.png", tarfile.SYMTYPE, "/etc/passwd"),
    "hardlink": ("root/b/2.png", tarfile.LNKTYPE, "root/a/0.png"),
    "device": ("root/b/3.png", tarfile.CHRTYPE, ""),
    "fifo": ("root/b/4.png", tarfile.FIFOTYPE, ""),
}


def crafted_tar(path: Path, kind: str) -> tuple[Path, str]:
    """A tar of class folders (root/a, root/b), WebDataset-named samples and one unsafe
    member; returns (path, the unsafe member's name)."""
    name, kind_type, target = UNSAFE[kind]
    with tarfile.open(path, "w") as tar:
        for member in ("root/a/0.png", "root/b/0.png", "000000-00000.png", "000000-00000.cls"):
            data = png_bytes() if member.endswith(".png") else b"1"
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind_type, target
        data = png_bytes(9) if kind_type == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path, name


def read_class_folders(path: Path) -> Any:
    from pipeline.io.images import open_image_folder

    return open_image_folder(f"{path}/root")


def read_pool(path: Path) -> Any:
    from pipeline.io.pool import list_pool, stream

    return [list(stream(task)) for task in list_pool(str(path))]


def read_preview(path: Path) -> Any:
    from pipeline.io.shards import read_images

    return read_images(str(path))


def read_evaluation_shard(path: Path) -> Any:
    from evaluation.sources import ShardRef, read_shard

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return read_shard(ShardRef(str(path), samples=1, sha256=digest))


READERS = {
    "image-folder": read_class_folders,  # metadata sources, teacher train/eval, test sets
    "pool": read_pool,  # retrieval pools, translation sources and targets
    "shard-preview": read_preview,  # preview.png, contact sheets
    "evaluation-loader": read_evaluation_shard,  # dreamshard eval
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", UNSAFE)
def test_every_tar_reader_refuses_unsafe_members(reader: str, kind: str, tmp_path: Path) -> None:
    from pipeline.errors import InputError

    path, member = crafted_tar(tmp_path / "crafted.tar", kind)
    with pytest.raises(InputError, match=rf"crafted\.tar: unsafe tar member '{re.escape(member)}'"):
        READERS[reader](path)
    assert not Path("/tmp/evil").exists() and not (tmp_path.parent / "evil.png").exists()


def test_the_same_tar_without_the_unsafe_member_reads(tmp_path: Path) -> None:
    path = tmp_path / "safe.tar"
    with tarfile.open(path, "w") as tar:
        for member in ("root/a/0.png", "root/b/0.png"):
            info = tarfile.TarInfo(member)
            data = png_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_class_folders(path).classes == ["a", "b"]
    assert len(read_pool(path)[0]) == 2


def test_an_unsafe_translation_source_exits_2_naming_the_member(
    tmp_path: Path, teacher_checkpoint: str, capsys
) -> None:
    path, member = crafted_tar(tmp_path / "crafted.tar", "symlink")
    target = tmp_path / "target"
    target.mkdir()
    (target / "0.png").write_bytes(png_bytes(3))
    config = tmp_path / "config.yaml"
    translation = {"source": str(path), "target": str(target)}
    data = config_dict(
        str(tmp_path / "out"),
        teacher_checkpoint,
        synthesizer={"name": "impression", "iterations": 2},
        translation=translation,
    )
    config.write_text(yaml.safe_dump(data))
    assert main(["translate", str(config)]) == 2
    assert f"crafted.tar: unsafe tar member '{member}' (a link" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- checkpoints ----------------------------------------------------------------------------

SOURCES = [REPO / "pipeline", REPO / "evaluation", REPO / "synthesizers"]


def calls(name: str) -> Iterator[tuple[Path, ast.Call]]:
    """Every call of ``name`` (e.g. ``torch.load``) in the package sources."""
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                    yield path, node


def keyword(call: ast.Call, name: str) -> Any:
    for item in call.keywords:
        if item.arg == name:
            return ast.literal_eval(item.value)
    return None


def test_every_loader_of_serialised_objects_refuses_pickles() -> None:
    loads = list(calls("torch.load"))
    assert loads, "torch.load is not called at all: this check would pass vacuously"
    assert [str(p) for p, call in loads if keyword(call, "weights_only") is not True] == []
    assert [
        str(p) for p, call in calls("np.load") if keyword(call, "allow_pickle") is not False
    ] == []
    for unsafe in ("pickle.load", "pickle.loads", "pickle.Unpickler", "yaml.load", "eval", "exec"):
        assert [str(p) for p, _ in calls(unsafe)] == [], unsafe
    # torch.load appears only in the one helper that turns refusals into InputError
    assert {p.relative_to(REPO).as_posix() for p, _ in loads} == {"pipeline/models/teachers.py"}


class Exploit:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Exploit(marker)}, path)
    return path


def teacher_eval(tmp_path: Path, evil: Path, capsys) -> str:
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        (data / name / "0.png").write_bytes(png_bytes())
    assert main(["teacher", "eval", "--checkpoint", str(evil), "--data", str(data)]) == 2
    return capsys.readouterr().err


def metadata_artifact(tmp_path: Path, evil: Path, capsys) -> str:
    from pipeline.errors import InputError
    from pipeline.stages.metadata import load_metadata

    with pytest.raises(InputError) as error:  # metadata.artifact: safetensors, never pickle
        load_metadata(str(evil), None)
    return str(error.value)


def train_resume(tmp_path: Path, evil: Path, capsys) -> str:
    from pipeline.errors import InputError
    from pipeline.models.teachers import load_weights

    with pytest.raises(InputError) as error:
        load_weights(str(evil), f"Ray Train checkpoint {evil}")
    return str(error.value)


def stored_logits(tmp_path: Path, evil: Path, capsys) -> str:
    import numpy as np

    from evaluation.loader import load_logits
    from evaluation.sources import ShardError

    buffer = io.BytesIO()
    np.save(buffer, np.array([Exploit(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    with pytest.raises(ShardError) as error:
        load_logits(buffer.getvalue(), "s.tar: sample 000000-00000")
    return str(error.value)


CHECKPOINT_READERS = {
    "teacher-eval-cli": (teacher_eval, r"evil\.pt was refused: .*weights_only=True"),
    "metadata-artifact": (metadata_artifact, r"evil\.pt: not a safetensors file"),
    "ray-train-resume": (train_resume, r"Ray Train checkpoint .*evil\.pt was refused"),
    "stored-logits": (stored_logits, r"s\.tar: sample 000000-00000: logits\.npy is not a plain"),
}


@pytest.mark.parametrize("reader", CHECKPOINT_READERS)
def test_a_malicious_pickle_is_refused_by_every_loader(reader: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    check, message = CHECKPOINT_READERS[reader]
    assert re.search(message, check(tmp_path, evil, capsys))
    assert not marker.exists(), "a pickle ran code"
    # the same payload unpickled without weights_only does run: the test can see it
    if reader == "ray-train-resume":
        import torch

        torch.load(evil, weights_only=False)
        assert marker.exists()


# --- object ACLs ----------------------------------------------------------------------------


def record_requests(fs: Any) -> list[tuple[str, str, dict[str, str]]]:
    """Every request ``fs`` (s3fs) sends from now on: (method, url, headers)."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    def before_send(request: Any, **_: Any) -> None:
        seen.append(
            (request.method, request.url, {k.lower(): v for k, v in request.headers.items()})
        )

    fs.connect()
    fs.s3.meta.events.register("before-send.s3", before_send)
    return seen


def test_objects_are_written_without_public_acls(
    make_config, s3_server: S3Server, tmp_path: Path
) -> None:
    import urllib.error
    import urllib.request

    import botocore.session

    from pipeline.graph import run_job
    from pipeline.io.storage import filesystem

    bucket = s3_server.make_bucket("acl")
    options = s3_server.storage_options()
    output = f"s3://{bucket}/runs"
    # the cached instances every write below uses: shard writes have their own (one attempt)
    requests = record_requests(filesystem(output, options)[0])
    requests_single = record_requests(filesystem(output, options, single_attempt=True)[0])
    manifest = run_job(make_config(run={"output": output, "storage_options": options}))
    writes = [
        (method, url, headers)
        for method, url, headers in requests + requests_single
        if method in ("PUT", "POST")
    ]
    written = {url.split(f"/{bucket}/", 1)[-1].split("?")[0] for _, url, _ in writes}
    assert {
        "runs/test/manifest.json",
        "runs/test/index.parquet",
        "runs/test/preview.png",
    } <= written
    assert sum(name.endswith(".tar") for name in written) == len(manifest["shards"]) == 2
    acl_headers = [
        (url, name)
        for _, url, headers in writes
        for name in headers
        if name == "x-amz-acl" or name.startswith("x-amz-grant")
    ]
    assert acl_headers == []
    # nobody without credentials can read what was written
    for key in sorted(written):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{s3_server.endpoint_url}/{bucket}/{key}", timeout=5)
        assert refused.value.code == 403, key
    # and the object's ACL, read back, grants nothing to all or authenticated users
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.key,
        aws_secret_access_key=s3_server.secret,
        region_name="us-east-1",
    )
    acl = client.get_object_acl(Bucket=bucket, Key="runs/test/manifest.json")
    groups = [g["Grantee"].get("URI", "") for g in acl["Grants"]]
    assert not [uri for uri in groups if uri.endswith(("AllUsers", "AuthenticatedUsers"))], acl


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ACL": "public-read"}, r"s3_additional_kwargs\.ACL: 'public-read' would let others"),
        ({"acl": "authenticated-read"}, r"s3_additional_kwargs\.acl: 'authenticated-read'"),
        (
            {"GrantRead": "uri=http://acs.amazonaws.com/groups/global/AllUsers"},
            r"GrantRead: grants",
        ),
    ],
)
def test_a_public_acl_in_the_storage_options_is_refused(
    extra: dict, message: str, tmp_path: Path, teacher_checkpoint: str, capsys
) -> None:
    config = tmp_path / "config.yaml"
    options = {"endpoint_url": "http://127.0.0.1:9", "s3_additional_kwargs": extra}
    data = config_dict("s3://bucket/runs", teacher_checkpoint, run={"storage_options": options})
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config)]) == 2
    assert re.search(message, capsys.readouterr().err)


# --- a submitted job ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_submitted_with_a_ray_token_leaks_no_token_and_no_credentials(
    s3_server: S3Server, tmp_path: Path, teacher_checkpoint: str, capsys, monkeypatch
) -> None:
    """``dreamshard submit --wait`` to a head with token authentication: the token (in
    the submitter's environment) and the storage credentials (the cluster's environment,
    and decoys in the submitter's) appear nowhere in what Ray keeps and shows."""
    from ray.job_submission import JobSubmissionClient
    from ray_head import ray_head

    from pipeline.cluster.submit import auth_headers

    token = uuid.uuid4().hex + uuid.uuid4().hex
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)  # the submitting machine's own
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    bucket = s3_server.make_bucket("token")
    config = tmp_path / "config.yaml"
    data = config_dict(
        f"s3://{bucket}/runs",
        teacher_checkpoint,
        run={"name": "tokencheck", "storage_options": {"endpoint_url": s3_server.endpoint_url}},
        runtime={"executor": "ray", "num_workers": 1},
    )
    config.write_text(yaml.safe_dump(data))
    with ray_head({**s3_server.env(), **auth}) as head:
        assert main(["submit", str(config), "--address", head.address, "--wait"]) == 0
        submitted = capsys.readouterr()
        job_id = re.search(r"^submitted (\S+):", submitted.out, re.M).group(1)
        assert main(["jobs", "logs", job_id, "--address", head.address]) == 0
        logs = capsys.readouterr()
        client = JobSubmissionClient(head.address, headers=auth_headers())
        info = client.get_job_info(job_id)
        texts = {
            "submit output": (submitted.out + submitted.err).encode(),
            "jobs logs": (logs.out + logs.err).encode(),
            "job info": json.dumps(info.model_dump(), default=str).encode(),
        }
        texts.update({str(p): p.read_bytes() for p in head.log_files()})
    assert info.entrypoint and info.runtime_env is not None and info.metadata
    assert "wrote 32 images" in logs.out
    objects = bucket_texts(s3_server, bucket)
    assert any(name.endswith("manifest.json") for name in objects)
    texts.update(objects)
    assert leaks(texts, [token, s3_server.secret, FAKE_KEY, FAKE_SECRET]) == []


def test_messages_log_lines_and_tracebacks_lose_url_passwords(capsys) -> None:
    from pipeline.io.storage import RedactingFormatter

    url = f"http://bob:{URL_PASSWORD}@127.0.0.1:{free_port()}/runs/x"
    assert main(["-v", "inspect", url]) == 2
    captured = capsys.readouterr()
    assert "http://bob:***@127.0.0.1" in captured.err
    assert URL_PASSWORD not in captured.out + captured.err
    assert any(isinstance(h.formatter, RedactingFormatter) for h in logging.getLogger().handlers)
    formatter = RedactingFormatter(logging.Formatter("%(name)s %(message)s"))
    try:
        raise RuntimeError(f"GET {url} failed")
    except RuntimeError:
        record = logging.LogRecord("dreamshard", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert "Traceback" in text and "http://bob:***@127.0.0.1" in text
    assert URL_PASSWORD not in text
