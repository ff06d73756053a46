"""The pipeline against a real S3 server (SeaweedFS on 127.0.0.1, see ``seaweed.py``)."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from seaweed import S3Server, free_port
from tests_support import config_dict

from pipeline.errors import InputError

pytestmark = pytest.mark.slow

SHARDS = ("train-000000", "train-000001")  # the default test plan: 2 shards of 16
RUN_FILES = (
    "run.json",
    "manifest.json",
    "index.parquet",
    "preview.png",
    "README.md",  # the dataset card
    "wids-index.json",
)
SAMPLE_PARTS = {"png", "cls", "json", "logits.npy"}


def s3_run_config(make_config, server: S3Server, bucket: str, **sections: dict[str, Any]):
    return make_config(
        run={"output": f"s3://{bucket}/runs", "storage_options": server.storage_options()},
        **sections,
    )


def run_path(manifest: dict) -> str:
    """The run folder as an s3fs path (bucket/key…)."""
    return manifest["run_url"].removeprefix("s3://")


def check_run_objects(server: S3Server, bucket: str, manifest: dict) -> None:
    """Exactly the expected objects: every tar with its sidecar, and the run records."""
    fs = server.filesystem()
    assert manifest["run_url"] == f"s3://{bucket}/runs/test"
    root = run_path(manifest)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False, refresh=True)}
    assert names == {*RUN_FILES, "shards"}
    shards = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards", detail=False, refresh=True)}
    assert shards == {f"{name}{ext}" for name in SHARDS for ext in (".tar", ".json")}
    assert [s["name"] for s in manifest["shards"]] == list(SHARDS)
    assert fs.cat(f"{root}/preview.png")[:8] == b"\x89PNG\r\n\x1a\n"
    preview = Image.open(io.BytesIO(fs.cat(f"{root}/preview.png")))
    assert preview.format == "PNG" and preview.width > 0
    stored = json.loads(fs.cat(f"{root}/manifest.json"))
    assert stored["totals"] == manifest["totals"]
    assert stored["config"]["run"]["storage_options"]["secret"] == "***"
    assert server.secret.encode() not in fs.cat(f"{root}/manifest.json")
    assert server.secret.encode() not in fs.cat(f"{root}/run.json")


def check_shard_digests(server: S3Server, manifest: dict) -> list[dict]:
    """Each sidecar's sha256 and size are those of the tar bytes read back."""
    fs = server.filesystem()
    sidecars = []
    for entry in manifest["shards"]:
        tar = fs.cat(entry["url"])
        sidecar = json.loads(fs.cat(entry["url"].removesuffix(".tar") + ".json"))
        assert sidecar["sha256"] == hashlib.sha256(tar).hexdigest() == entry["sha256"]
        assert sidecar["bytes"] == len(tar)
        assert sidecar["samples"] == entry["samples"] == len(sidecar["index"])
        sidecars.append(sidecar)
    return sidecars


def expected_label(key: str, shard_size: int = 16, classes: int = 10) -> int:
    """The plan is class-balanced: sample i of the run targets class i % K."""
    shard, slot = (int(part) for part in key.split("-"))
    return (shard * shard_size + slot) % classes


def read_with_webdataset(manifest: dict) -> list[dict]:
    """Every sample through the ``webdataset`` library (the environment names the server)."""
    import webdataset as wds

    from pipeline.io.storage import register_webdataset_opener

    register_webdataset_opener()
    urls = [entry["url"] for entry in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def check_samples(samples: list[dict], manifest: dict) -> list[str]:
    """Keys, class, image and logits of every sample; returns the keys in order."""
    assert len(samples) == manifest["totals"]["images"] > 0
    keys = []
    for sample in samples:
        assert set(sample) >= SAMPLE_PARTS, sorted(sample)
        key = sample["__key__"]
        label = int(sample["cls"])
        assert label == expected_label(key)
        info = json.loads(sample["json"])
        assert info["label"] == label
        assert info["synthesizer"] == "deepinversion"
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        logits = np.load(io.BytesIO(sample["logits.npy"]))
        assert logits.shape == (10,) and logits.dtype == np.float16
        probs = np.exp(logits.astype(np.float64) - logits.max())
        probs /= probs.sum()  # the stored logits are those behind the stored confidence
        assert probs[label] == pytest.approx(info["confidence"], abs=0.01)  # the label's
        keys.append(key)
    assert len(set(keys)) == len(keys)
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample["cls"].decode()] = counts.get(sample["cls"].decode(), 0) + 1
    assert counts == manifest["totals"]["classes"]
    return keys


def check_index(server: S3Server, manifest: dict, keys: list[str]) -> None:
    """index.parquet, read with pyarrow through s3fs: one row per sample, same keys."""
    fs = server.filesystem()
    with fs.open(f"{run_path(manifest)}/index.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == len(keys)
    rows = table.to_pylist()
    assert [row["key"] for row in rows] == keys
    for row in rows:
        assert row["shard"] == f"train-{row['key'][:6]}"
        assert row["label"] == expected_label(row["key"])
        assert row["synthesizer"] == "deepinversion"


def check_run(server: S3Server, bucket: str, manifest: dict) -> list[dict]:
    """Every check above; returns the sidecars read back."""
    check_run_objects(server, bucket, manifest)
    sidecars = check_shard_digests(server, manifest)
    assert sum(s["samples"] for s in sidecars) == manifest["totals"]["images"]
    assert manifest["totals"]["planned"] == manifest["totals"]["images"] == 32  # no filter
    keys = check_samples(read_with_webdataset(manifest), manifest)
    check_index(server, manifest, keys)
    return sidecars


def test_inline_run_writes_a_complete_run_to_s3(make_config, s3_server, s3_env):
    from pipeline.graph import run_job

    bucket = s3_server.make_bucket()
    manifest = run_job(s3_run_config(make_config, s3_server, bucket))
    check_run(s3_server, bucket, manifest)


@pytest.mark.timeout(600)
def test_ray_data_reads_the_shards_from_s3(make_config, s3_server, ray_cluster):
    from pipeline.graph import run_job

    bucket = s3_server.make_bucket()
    manifest = run_job(s3_run_config(make_config, s3_server, bucket))
    paths = [entry["url"].removeprefix("s3://") for entry in manifest["shards"]]
    dataset = ray_cluster.data.read_webdataset(
        paths, filesystem=s3_server.arrow_filesystem(), decoder=None
    )
    rows = dataset.take_all()
    assert len(rows) == manifest["totals"]["images"] > 0
    for row in rows:
        image = Image.open(io.BytesIO(row["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    keys = sorted(row["__key__"] for row in rows)
    index = [key for s in check_shard_digests(s3_server, manifest) for key, *_ in s["index"]]
    assert keys == sorted(index)


@pytest.mark.timeout(600)
def test_ray_executor_writes_a_complete_run_to_s3(make_config, s3_server, s3_env, ray_cluster):
    from pipeline.graph import run_job

    bucket = s3_server.make_bucket()
    config = s3_run_config(
        make_config,
        s3_server,
        bucket,
        runtime={"executor": "ray", "num_workers": 2, "cpus_per_worker": 1},
        plan={"num_images": 32, "shard_size": 16, "batch_size": 16},
        synthesizer={"iterations": 2},
    )
    sidecars = check_run(s3_server, bucket, run_job(config))
    assert all(s["device"].startswith("cpu") for s in sidecars)


def missing_bucket_name() -> str:
    return f"missing-{time.monotonic_ns()}"


def test_missing_bucket_is_an_input_error(s3_server):
    from pipeline.io.storage import check_writable

    bucket = missing_bucket_name()
    start = time.monotonic()
    with pytest.raises(InputError, match=bucket) as raised:
        check_writable(f"s3://{bucket}/x", s3_server.storage_options())
    assert time.monotonic() - start < 15
    assert "does not exist" in str(raised.value)
    assert s3_server.secret not in str(raised.value)
    assert bucket not in s3_server.buckets()


def test_unreachable_endpoint_is_an_input_error(s3_server):
    from pipeline.io.storage import check_writable

    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {**s3_server.storage_options(), "endpoint_url": endpoint}
    start = time.monotonic()
    with pytest.raises(InputError, match=endpoint) as raised:
        check_writable("s3://some-bucket/x", options)
    assert time.monotonic() - start < 15
    assert "some-bucket" in str(raised.value)
    assert s3_server.secret not in str(raised.value)


def test_cli_run_to_a_missing_bucket_exits_2(s3_server, teacher_checkpoint, tmp_path, capsys):
    from pipeline.cli.main import main

    bucket = missing_bucket_name()
    config = config_dict(f"s3://{bucket}/runs", teacher_checkpoint)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    before = sorted(Path(tmp_path).rglob("*"))
    overrides = [
        f"run.storage_options.{name}={value}" for name, value in s3_server.storage_options().items()
    ]
    start = time.monotonic()
    code = main(["run", str(path), *(arg for o in overrides for arg in ("--set", o))])
    assert time.monotonic() - start < 15
    assert code == 2
    err = capsys.readouterr().err
    assert bucket in err and "does not exist" in err
    assert s3_server.secret not in err
    assert bucket not in s3_server.buckets()
    assert sorted(Path(tmp_path).rglob("*")) == before


# An abandoned file that later tries to upload in __del__ shows up as this warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("size", [1000, 6 * 2**20], ids=["one-put", "multipart"])
def test_atomic_open_leaves_nothing_on_error(s3_server, size):
    from pipeline.io.storage import atomic_open

    bucket = s3_server.make_bucket()
    # 5 MiB blocks: the larger write starts a multipart upload before the error
    options = {**s3_server.storage_options(), "default_block_size": 5 * 2**20}
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    fs = s3_server.filesystem()

    with (
        pytest.raises(RuntimeError, match="boom"),
        atomic_open(f"s3://{bucket}/a.bin", options) as f,
    ):
        f.write(data)
        started = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in started] == (["a.bin"] if size > 5 * 2**20 else [])
        raise RuntimeError("boom")
    gc.collect()  # a discarded file must not upload anything when collected
    assert fs.ls(bucket, refresh=True) == []
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert uploads == []

    with atomic_open(f"s3://{bucket}/b.bin", options) as f:  # the same write, completed
        f.write(data)
    assert fs.cat(f"{bucket}/b.bin") == data
    assert fs.ls(bucket, refresh=True) == [f"{bucket}/b.bin"]


def test_s3_settings_need_no_s3_stack_until_used_and_pickle_by_reference() -> None:
    # a run on local folders imports no aiobotocore (a GPU node without the S3 stack
    # failed at import); the S3 options, built on first use, still pickle to Ray actors
    import pickle
    import subprocess
    import sys

    blocked = (
        "import sys\n"
        "sys.modules['aiobotocore'] = None\n"
        "from pipeline.io.storage import normalise_options\n"
        "import pipeline.config, evaluation.config\n"
        "assert normalise_options('/tmp/x', {}) == {}\n"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    from pipeline.io.storage import normalise_options

    options = normalise_options("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:9"})
    session = options["config_kwargs"]["http_session_cls"]
    assert session.__name__ == "NoExpectSession"
    assert pickle.loads(pickle.dumps(options))["config_kwargs"]["http_session_cls"] is session
