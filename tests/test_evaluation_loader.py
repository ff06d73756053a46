"""The streaming loader on real tars: split without overlap, logits, sha256, incomplete runs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_support import write_plain_shards
from torch.utils.data import DataLoader

from evaluation.loader import ShardDataset, ShardError, load_all, read_shard, resolve_shards
from evaluation.split import Consumer, part_of
from pipeline.errors import InputError
from pipeline.io.shards import Sample, write_tar


def write_run(root: Path, sizes: list[int], image_size: int = 8, logits: bool = True) -> Path:
    """Shards whose sample ``i`` (over all shards) has label ``i`` and pixel value ``i % 256``."""
    shards = root / "shards"
    position = 0
    for index, size in enumerate(sizes):
        samples = []
        for slot in range(size):
            image = np.full((image_size, image_size, 3), position % 256, np.uint8)
            scores = np.arange(4, dtype=np.float32) + position if logits else None
            samples.append(Sample(f"{index:06d}-{slot:05d}", image, position, {}, scores))
            position += 1
        url = str(shards / f"train-{index:06d}.tar")
        sha256, _ = write_tar(url, samples)
        sidecar = {"sha256": sha256, "samples": size, "shard": f"train-{index:06d}"}
        (shards / f"train-{index:06d}.json").write_text(json.dumps(sidecar))
    return root


def labels_seen(
    shards, world_size: int, workers: int, epoch: int, batch_size: int = 3
) -> tuple[Counter, list[int]]:
    """Labels yielded over all ranks, and each rank's batch count."""
    seen: Counter = Counter()
    batches = []
    for rank in range(world_size):
        dataset = ShardDataset(
            shards,
            (0.0,) * 3,
            (1.0,) * 3,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=7,
            batch_size=batch_size,
        )
        dataset.set_epoch(epoch)
        count = 0
        for images, labels in DataLoader(dataset, batch_size=None, num_workers=workers):
            assert len(images) == len(labels) <= batch_size + 1
            seen.update(labels.tolist())
            count += 1
        assert count == dataset.steps()  # known before reading
        batches.append(count)
    return seen, batches


@pytest.mark.parametrize(
    ("sizes", "world_size", "workers", "batch_size"),
    [
        ([8, 8, 4], 2, 1, 8),
        ([8, 8, 4], 2, 2, 3),
        ([5, 6, 4, 7, 5, 3], 2, 2, 3),
        ([9, 8], 3, 2, 2),
        ([7], 2, 1, 1),  # per-rank batch of one, uneven: one batch of two
        ([3, 3, 3], 2, 2, 8),  # more workers than a rank has batches
    ],
    ids=["8-8-4", "8-8-4-workers", "six-shards", "few-shards", "batch-1", "idle-workers"],
)
def test_every_sample_once_per_epoch_with_equal_steps_on_every_rank(
    tmp_path: Path, sizes: list[int], world_size: int, workers: int, batch_size: int
) -> None:
    shards = resolve_shards(str(write_run(tmp_path, sizes) / "shards")).shards
    for epoch in (0, 1):
        seen, batches = labels_seen(shards, world_size, workers, epoch, batch_size)
        assert seen == Counter(range(sum(sizes)))  # every sample, exactly once
        assert len(set(batches)) == 1  # DDP: the same number of steps on every rank


def test_the_split_plan_covers_every_position_once() -> None:
    for total in range(1, 40):
        for world_size in range(1, min(total, 4) + 1):
            for workers in (1, 2, 3):
                for batch_size in (None, 1, 2, 5):
                    positions, steps = [], set()
                    for rank in range(world_size):
                        parts = [
                            part_of(total, Consumer(rank, world_size, w, workers), batch_size)
                            for w in range(workers)
                        ]
                        for part in parts:
                            positions += range(part.start, part.stop)
                            assert batch_size is None or sum(part.batches) == part.samples
                            assert all(0 < size <= (batch_size or 1) + 1 for size in part.batches)
                        steps.add(sum(len(part.batches) for part in parts))
                    assert positions == list(range(total))
                    assert len(steps) == 1
    with pytest.raises(InputError, match="3 sample.* cannot be split over 4 Ray Train workers"):
        part_of(3, Consumer(0, 4), 2)


def test_shuffled_differently_per_epoch(tmp_path: Path) -> None:
    shards = resolve_shards(str(write_run(tmp_path, [5, 6, 4]) / "shards")).shards
    orders = []
    for epoch in (0, 1):
        dataset = ShardDataset(shards, (0.0,) * 3, (1.0,) * 3, shuffle_buffer=7)
        dataset.set_epoch(epoch)
        orders.append([label for _, label in dataset])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(15))
    assert orders[0] != orders[1] != list(range(15))  # shuffled, differently per epoch


def test_images_are_normalised_and_stored_logits_round_trip(tmp_path: Path) -> None:
    shards = resolve_shards(str(write_run(tmp_path, [4, 3]) / "shards"))
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 2.0)
    dataset = ShardDataset(shards.shards, mean, std, image_size=8, logits=True)
    items = list(dataset)
    assert len(items) == 7 == shards.samples
    for image, label, logits in items:
        value = label / 255.0
        expected = torch.tensor([(value - m) / s for m, s in zip(mean, std, strict=True)])
        assert image.shape == (3, 8, 8)
        assert torch.allclose(image[:, 0, 0], expected, atol=1e-6)
        assert logits.dtype == torch.float32
        assert torch.equal(logits, torch.arange(4, dtype=torch.float32) + label)  # exact in fp16
    images, labels = load_all(shards, limit=5)
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_sha256_mismatch_names_the_shard(tmp_path: Path) -> None:
    run = write_run(tmp_path, [3, 3])
    tar = run / "shards" / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload
    tar.write_bytes(bytes(data))
    shards = resolve_shards(str(run / "shards")).shards
    dataset = ShardDataset(shards, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ShardError, match=r"train-000001\.tar: sha256 .* does not match"):
        list(dataset)


def test_an_incomplete_run_is_refused_unless_allowed(tmp_path: Path, monkeypatch) -> None:
    run = write_run(tmp_path, [3, 3, 3])
    (run / "shards" / "train-000002.json").unlink()
    with pytest.raises(InputError, match="1 shard.* without a sidecar.*--allow-incomplete"):
        resolve_shards(str(run / "shards"))
    monkeypatch.chdir(run)  # relative sources resolve to absolute URLs (for remote workers)
    allowed = resolve_shards("shards/train-*.tar", allow_incomplete=True)
    assert all(Path(s.url).is_absolute() for s in allowed.shards)
    assert [Path(s.url).name for s in allowed.shards] == ["train-000000.tar", "train-000001.tar"]
    (run / "run.json").write_text("{}")  # a run folder without a manifest is unfinished
    with pytest.raises(InputError, match="no manifest.json yet.*--allow-incomplete"):
        resolve_shards(str(run))
    assert resolve_shards(str(run), allow_incomplete=True).samples == 6


def test_unsafe_members_and_wrong_image_sizes_are_refused(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (shards / "bad.tar").write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    (shards / "bad.json").write_text(json.dumps({"sha256": digest, "samples": 1}))
    (bad,) = resolve_shards(str(shards / "bad.tar")).shards
    with pytest.raises(ShardError, match=r"bad\.tar: unsafe tar member '\.\./escape\.png'"):
        read_shard(bad)
    good = resolve_shards(str(write_run(tmp_path / "run", [2]))).shards
    with pytest.raises(InputError, match="images are 8x8, the model expects 32x32"):
        list(ShardDataset(good, (0.0,) * 3, (1.0,) * 3, image_size=32))


@pytest.mark.slow
def test_a_real_run_on_s3_streams_through_its_manifest(make_config, s3_server) -> None:
    from pipeline.graph import run_job

    bucket = s3_server.make_bucket()
    options = s3_server.storage_options()
    config = make_config(run={"output": f"s3://{bucket}/runs", "storage_options": options})
    manifest = run_job(config)
    shards = resolve_shards(manifest["run_url"], options)
    assert shards.manifest["teacher_digest"] == manifest["teacher_digest"]
    assert [s.url for s in shards.shards] == [s["url"] for s in manifest["shards"]]
    mean, std = config.teacher.mean, config.teacher.std
    dataset = ShardDataset(
        shards.shards, mean, std, image_size=32, logits=True, storage_options=options
    )
    labels = [int(label) for _, label, logits in dataset if logits.shape == (10,)]
    assert sorted(labels) == sorted(c for c in range(10) for _ in range(4 if c < 2 else 3))


def test_plain_webdataset_shards_are_counted_and_read_unverified(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    folder = write_plain_shards(tmp_path / "plain", [5, 3], size=8)
    shards = resolve_shards(str(folder))  # no sidecars, no --allow-incomplete needed
    assert [s.samples for s in shards.shards] == [5, 3]  # counted by a first pass
    assert all(s.sha256 is None for s in shards.shards)
    assert "none for 2 of 2 shards" in shards.summary()["checksums"]
    assert "no checksums" in caplog.text
    dataset = ShardDataset(shards.shards, (0.0,) * 3, (1.0,) * 3, image_size=8, batch_size=3)
    labels = [label for _, batch in dataset for label in batch.tolist()]
    assert sorted(labels) == sorted(p % 10 for p in range(8))
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": []}
    for name, count in (("real-0000.tar", 5), ("real-0001.tar", 3)):
        index["shardlist"].append({"url": f"https://example.org/{name}", "nsamples": count})
    (folder / "index.json").write_text(json.dumps(index))

    def no_first_pass(url, options=None):
        raise AssertionError(f"{url} was opened although the wids index counts it")

    monkeypatch.setattr("evaluation.sources.count_samples", no_first_pass)
    assert [s.samples for s in resolve_shards(str(folder / "real-*.tar")).shards] == [5, 3]
