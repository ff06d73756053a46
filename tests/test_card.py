"""What a finished run folder offers readers without dreamshard: the dataset card, the wids
shard index, the manifest's brace pattern; and ``pipeline.api.open_shards``."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import webdataset as wds
from braceexpand import braceexpand
from seaweed import S3Server
from tests_support import config_dict

from pipeline import api
from pipeline.config import parse_config
from pipeline.errors import InputError
from pipeline.graph import run_job
from pipeline.stages.card import shard_pattern


@pytest.fixture(scope="module")
def finished_run(teacher_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 shards (16 + 16 + 8 images), inline; shared by the tests that only read it."""
    output = tmp_path_factory.mktemp("card") / "out"
    data = config_dict(str(output), teacher_checkpoint, plan={"num_images": 40})
    return run_job(parse_config(data))


def test_the_card_describes_the_run(finished_run: dict) -> None:
    run = Path(finished_run["run_url"])
    card = (run / "README.md").read_text()
    assert card.startswith("# test\n")
    assert finished_run["teacher_digest"] in card and "`resnet20`" in card
    assert "`deepinversion`" in card and "iterations: 2" in card  # method and settings
    assert "40 images in 3 shards" in card
    # per class: images, synthesized, the filter's accept rate (off here: every image is
    # kept, and the rate counts those the filter would have kept: the label's stored
    # confidence >= τ, which for this untrained teacher is not all of them)
    entry = finished_run["totals"]["per_class"]["0"]
    confidences = [
        value
        for path in sorted((run / "shards").glob("*.json"))
        for _key, label, value, _seed in json.loads(path.read_text())["index"]
        if label == 0
    ]
    assert entry["synthesized"] == entry["written"] == len(confidences) == 4
    assert entry["passed"] == sum(c >= 0.5 for c in confidences)
    assert entry["accept_rate"] == entry["passed"] / 4
    assert f"| 0 | 4 | 4 | {100 * entry['accept_rate']:.1f}% |" in card
    assert "![preview: one row per class](preview.png)" in card
    for reader in (
        "wds.WebDataset(",
        "wids.ShardListDataset(",
        "ray.data.read_webdataset(",
        "resolve_shards(",
    ):
        assert reader in card
    assert f'wds.WebDataset("{run}/shards/train-{{000000..000002}}.tar"' in card


def test_the_wids_index_opens_with_wids(finished_run: dict, tmp_path: Path) -> None:
    import wids

    run = Path(finished_run["run_url"])
    index_path = finished_run["wids_index"]
    assert "wids" in Path(index_path).name and index_path.endswith(".json")
    index = json.loads(Path(index_path).read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert index["shardlist"] == [
        {"url": "shards/train-000000.tar", "nsamples": 16},
        {"url": "shards/train-000001.tar", "nsamples": 16},
        {"url": "shards/train-000002.tar", "nsamples": 8},
    ]
    decode = partial(wids.wids.default_decoder, format="PIL")
    dataset = wids.ShardListDataset(
        index_path, cache_dir=str(tmp_path / "cache"), transformations=[decode]
    )
    assert len(dataset) == 40
    sample = dataset[17]  # the second sample of the second shard
    assert sample["__key__"] == "000001-00001"
    assert sample[".png"].size == (32, 32)
    assert int(sample[".cls"]) == sample[".json"]["label"]
    assert sorted(p.name for p in (run / "shards").iterdir()) == sorted(  # nothing added
        f"train-00000{i}{ext}" for i in range(3) for ext in (".tar", ".json")
    )


def test_the_manifest_brace_pattern_expands_to_the_shards(finished_run: dict) -> None:
    pattern = finished_run["shard_pattern"]
    assert pattern.endswith("/shards/train-{000000..000002}.tar")
    assert list(braceexpand(pattern)) == [s["url"] for s in finished_run["shards"]]
    assert shard_pattern("s3://b/r", ["train-000004"]) == "s3://b/r/shards/train-000004.tar"
    assert shard_pattern("s3://b/r", ["train-000000", "train-000002"]) is None  # a gap


def test_open_shards_reads_complete_shards_only(finished_run: dict, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(finished_run["run_url"], run)  # a moved run keeps working
    samples = list(api.open_shards(str(run)).decode("torchrgb").to_tuple("__key__", "png", "cls"))
    assert len(samples) == 40 and samples[0][0] == "000000-00000"
    assert samples[0][1].shape == (3, 32, 32)
    # an unfinished run: the shards with a sidecar, nothing else
    (run / "manifest.json").unlink()
    (run / "shards" / "train-000001.json").unlink()
    keys = [s["__key__"] for s in api.open_shards(str(run / "manifest.json"))]
    assert len(keys) == 24 and not any(k.startswith("000001-") for k in keys)
    with pytest.raises(InputError, match="not a dreamshard run"):
        api.open_shards(str(run / "shards"))


@pytest.mark.slow
def test_open_shards_and_the_webdataset_opener_take_storage_options(
    s3_server: S3Server, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # the options alone must reach the server
    bucket = s3_server.make_bucket("open")
    options = s3_server.storage_options()
    manifest = run_job(
        make_config(run={"output": f"s3://{bucket}/runs", "storage_options": options})
    )
    keys = [s["__key__"] for s in api.open_shards(manifest["run_url"], options)]
    assert len(keys) == 32
    from pipeline.io.storage import register_webdataset_opener

    register_webdataset_opener(options)
    samples = list(wds.WebDataset(manifest["shard_pattern"], shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    card = s3_server.filesystem().cat(f"{bucket}/runs/test/README.md").decode()
    assert 'read_webdataset("' + f'{bucket}/runs/test/shards", file_extensions=["tar"], ' in card
