"""The retrieval stage: pools from folders, archives and S3 shards; bounded selection;
shards in the standard format; bad input refused before anything is written."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import CIFAR_TAR, RESNET20, shared
from PIL import Image

from pipeline.cli.main import main
from pipeline.config import parse_config
from pipeline.errors import InputError
from pipeline.io.pool import list_pool, stream
from pipeline.io.storage import register_webdataset_opener
from pipeline.stages.retrieval import run_retrieval
from pipeline.stages.retrieval_worker import PoolWorker, TopK
from synthesizers.impression import distance, encode, flatten, template_layers


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def distractor(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Out-of-domain images: uniform noise, flat colours, stripes."""
    kind = int(rng.integers(3))
    if kind == 0:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == 1:
        return np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
    image = np.zeros((size, size, 3), np.uint8)
    image[:, :: int(rng.integers(2, 6))] = rng.integers(0, 256, 3)
    return image


def labeled_folder(root: Path, classes: int = 10, per_class: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{k}" / f"{i}.png").write_bytes(
                png(rng.integers(0, 256, (32, 32, 3), np.uint8))
            )
    return root


def cifar_images(
    count: int, split: str, per_class: int | None = None
) -> list[tuple[str, bytes, str]]:
    """(class, JPEG bytes, name) of CIFAR-10 (JPEG) images, at most ``per_class`` a class."""
    found, counts = [], {}
    with tarfile.open(shared(CIFAR_TAR)) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != split:
                continue
            if per_class is not None and counts.get(parts[2], 0) >= per_class:
                continue
            counts[parts[2]] = counts.get(parts[2], 0) + 1
            found.append((parts[2], tar.extractfile(member).read(), parts[3]))
            if len(found) == count:
                break
    return found


def retrieval_config(tmp_path: Path, checkpoint: str, **retrieval) -> object:
    data = {
        "run": {"name": "sel", "seed": 1, "output": str(tmp_path / "out")},
        "teacher": {"arch": "resnet20", "checkpoint": checkpoint},
        "synthesizer": {"name": "impression"},
        "plan": {"shard_size": 8},
        "runtime": {"executor": "inline", "progress": False},
        "retrieval": {"num_select": 4, "batch_size": 16, **retrieval},
    }
    return parse_config(data)


def read_shard(path_or_url: str) -> list[dict]:
    dataset = wds.WebDataset(path_or_url, shardshuffle=False).decode("rgb")
    return list(dataset)


def test_topk_keeps_the_smallest_and_never_grows_past_its_capacity() -> None:
    rng = random.Random(0)
    candidates = [(rng.random(), rng.randrange(5), i, f"k{i}") for i in range(5000)]
    heap = TopK(7)
    for candidate in candidates:
        heap.push(candidate)
        assert len(heap) <= 7
    assert heap.items() == sorted(candidates)[:7]
    shuffled = TopK(7)
    for candidate in rng.sample(candidates, len(candidates)):
        shuffled.push(candidate)
    assert shuffled.items() == heap.items()  # the order of arrival does not matter
    tied = TopK(2)
    for candidate in [(1.0, 3, 0, "c"), (1.0, 1, 5, "b"), (1.0, 1, 2, "a")]:
        tied.push(candidate)
    assert [c[3] for c in tied.items()] == ["a", "b"]


def test_retrieval_ranks_in_domain_images_first(tmp_path: Path) -> None:
    """A pool of CIFAR-10 test images and distractors (a different size among them, and
    an undecodable file); labeled CIFAR-10 train images; the teacher is ResNet-20."""
    rng = np.random.default_rng(1)
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    cifar = cifar_images(24, "test", per_class=3)
    for i, (_, data, _) in enumerate(cifar):
        (pool / f"real-{i:02d}.jpg").write_bytes(data)
    for i in range(24):
        (pool / "sub" / f"other-{i:02d}.png").write_bytes(
            png(distractor(rng, 48 if i == 0 else 32))
        )
    (pool / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    labeled = tmp_path / "labeled"
    for name, data, file in cifar_images(20, "train", per_class=2):
        (labeled / name).mkdir(parents=True, exist_ok=True)
        (labeled / name / file).write_bytes(data)
    config = retrieval_config(
        tmp_path,
        str(shared(RESNET20)),
        pool=str(pool),
        labeled=str(labeled),
        num_select=16,
        files_per_task=20,
    )
    manifest = run_retrieval(config)
    totals = manifest["totals"]
    assert totals["images"] == 16 and totals["pool_scored"] == 48 and totals["pool_skipped"] == 1
    assert totals["skipped_examples"][0].endswith("broken.jpg")
    samples = [s for shard in manifest["shards"] for s in read_shard(shard["url"])]
    members = [s["json"]["member"] for s in samples]
    assert sum("real-" in m for m in members) >= 15, members
    ranks = sorted(samples, key=lambda s: s["json"]["rank"])
    assert all("real-" in s["json"]["member"] for s in ranks[:12])
    for sample in samples:
        info, logits = sample["json"], sample["logits.npy"]
        assert sample["png"].shape == (32, 32, 3)
        assert int(sample["cls"]) == info["label"] == int(np.argmax(logits))
        assert info["source"] == str(pool) and info["distance"] > 0
    distances = [s["json"]["distance"] for s in ranks]
    assert distances == sorted(distances)
    sidecar = json.loads(
        (tmp_path / "out" / "sel" / "shards" / "retrieved-000000.json").read_text()
    )
    assert sidecar["pool_task"]["scored"] + sidecar["pool_task"]["skipped"] >= 1
    assert (tmp_path / "out" / "sel" / "retrieval.json").exists()
    # a rerun finds the same selection and skips the complete shards
    assert run_retrieval(config)["shards"] == manifest["shards"]


def test_streamed_selection_equals_scoring_the_whole_pool_at_once(
    teacher_checkpoint, tmp_path
) -> None:
    """Many small images (8x8, resized) in a .tar.gz, small batches, a top-5 buffer:
    the streamed, merged result is the exact top 5 of the whole pool."""
    rng = np.random.default_rng(2)
    archive = tmp_path / "pool.tar.gz"
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(80)]
    with tarfile.open(archive, "w:gz") as tar:
        for i, array in enumerate(arrays):
            data = png(array)
            info = tarfile.TarInfo(f"pool/{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    labeled = labeled_folder(tmp_path / "labeled")
    config = retrieval_config(
        tmp_path,
        teacher_checkpoint,
        pool=str(archive),
        labeled=str(labeled),
        num_select=5,
        batch_size=7,
    )
    (task,) = list_pool(str(archive))
    worker = PoolWorker(config, torch.zeros(1, 1))
    images = np.stack(
        [np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in arrays]
    )
    layers = template_layers(worker.model)
    from pipeline.stages.retrieval import labeled_images, target_codes

    targets = target_codes(worker.model, config, layers, *labeled_images(config))
    worker.targets = targets
    score = worker.score(task, [5])
    assert score["scored"] == 80 and len(score["candidates"][0]) == 5
    codes, _ = encode(worker.model, worker.normalised(images), layers, 80, worker.dtype)
    full = distance(flatten(codes), targets)[:, 0]
    best = torch.argsort(full)[:5].tolist()
    assert [c[2] for c in score["candidates"][0]] == best
    manifest = run_retrieval(config)
    chosen = sorted(s["json"]["member"] for sh in manifest["shards"] for s in read_shard(sh["url"]))
    assert chosen == sorted(f"pool/{i:04d}.png" for i in best)
    assert manifest["totals"]["distance"]["max"] == pytest.approx(float(full[best[-1]]), rel=1e-4)


def webdataset_shard(samples: list[tuple[str, bytes, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, data, extension in samples:
            for name, payload in ((f"{key}.{extension}", data), (f"{key}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.slow
def test_per_class_retrieval_streams_shards_from_s3_with_ray(
    teacher_checkpoint, tmp_path, s3_server, s3_env, ray_cluster
) -> None:
    rng = np.random.default_rng(3)
    bucket = s3_server.make_bucket("pool")
    fs = s3_server.filesystem()
    for shard in range(3):
        samples = [(f"{shard:03d}-{i:03d}", png(distractor(rng, 24)), "png") for i in range(12)]
        samples.append((f"{shard:03d}-bad", b"garbage", "jpg"))
        fs.pipe(f"{bucket}/pool/shard-{shard:06d}.tar", webdataset_shard(samples))
    labeled = labeled_folder(tmp_path / "labeled", per_class=1)
    config = retrieval_config(
        tmp_path,
        teacher_checkpoint,
        pool=f"s3://{bucket}/pool/shard-*.tar",
        labeled=str(labeled),
        num_select=20,
        selection="per_class",
    )
    config.run.output = f"s3://{bucket}/out"
    config.run.storage_options = s3_server.storage_options()
    config.runtime.executor = "ray"
    manifest = run_retrieval(config)
    totals = manifest["totals"]
    assert totals["pool_tasks"] == 3 and totals["pool_scored"] == 36 and totals["pool_skipped"] == 3
    assert sum(totals["selected_per_target"]) == totals["images"] <= 20
    assert all(n <= 2 for n in totals["selected_per_target"])
    short = {
        str(t): {"asked": 2, "selected": n}
        for t, n in enumerate(totals["selected_per_target"])
        if n < 2
    }
    assert totals["shortfall"] == short  # every class short of its 2 is named
    assert bool(short) == (totals["images"] < 20)
    register_webdataset_opener()
    samples = [s for shard in manifest["shards"] for s in read_shard(shard["url"])]
    assert len(samples) == totals["images"]
    for sample in samples:
        info = sample["json"]
        assert info["source"].startswith(f"s3://{bucket}/pool/shard-")
        assert info["member"].endswith(".png") and 0 <= info["selected_for"] < 10
        assert sample["png"].shape == (32, 32, 3)
    assert fs.exists(f"{bucket}/out/sel/retrieval.json")
    # loose files in an S3 folder are a pool too, streamed through the same code path
    for i in range(3):
        fs.pipe(f"{bucket}/loose/sub/{i}.png", png(distractor(rng)))
    (task,) = list_pool(f"s3://{bucket}/loose", s3_server.storage_options(), files_per_task=5)
    items = list(stream(task, s3_server.storage_options()))
    assert [key.rsplit("/", 1)[-1] for key, _ in items] == ["0.png", "1.png", "2.png"]
    assert all(Image.open(io.BytesIO(data)).size == (32, 32) for _, data in items)


def test_bad_input_is_refused_before_anything_is_written(teacher_checkpoint, tmp_path) -> None:
    labeled = labeled_folder(tmp_path / "labeled")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "notes.txt").write_text("no images here")

    def refused(match: str, **fields) -> None:
        config = retrieval_config(
            tmp_path, teacher_checkpoint, **{"pool": str(pool), "labeled": str(labeled), **fields}
        )
        with pytest.raises(InputError, match=match):
            run_retrieval(config)
        assert not (tmp_path / "out").exists()

    refused("empty")
    refused("no such folder", pool=str(tmp_path / "missing"))
    for i in range(3):
        (pool / f"{i}.png").write_bytes(png(np.zeros((32, 32, 3), np.uint8)))
    refused("has 3 usable images .* fewer than the 4")
    (pool / "broken.png").write_bytes(b"")
    (pool / "3.png").write_bytes(png(np.ones((16, 16, 3), np.uint8)))
    with tarfile.open(tmp_path / "pool.tar", "w") as tar:
        tar.add(pool, arcname="pool")
    refused("has 4 usable images \\(1 skipped", pool=str(tmp_path / "pool.tar"), num_select=5)
    refused("valid layers: conv1, bn1", layers=["conv1", "layer9"])
    refused("no labeled images for class\\(es\\)", selection="per_class", labeled_total=5)
    (labeled / "c9" / "0.png").unlink()
    (labeled / "c9" / "1.png").unlink()
    refused("images for 9 classes .* the teacher has 10")


def test_cli_retrieve_exits_2_on_bad_input_and_0_on_success(
    teacher_checkpoint, tmp_path, capsys
) -> None:
    labeled = labeled_folder(tmp_path / "labeled")
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(4)
    for i in range(6):
        (pool / f"{i}.png").write_bytes(png(distractor(rng)))
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {
                "run": {"name": "cli", "output": str(tmp_path / "out")},
                "teacher": {"arch": "resnet20", "checkpoint": teacher_checkpoint},
                "synthesizer": {"name": "impression"},
                "runtime": {"executor": "inline", "progress": False},
                "retrieval": {"pool": str(pool), "labeled": str(labeled), "num_select": 3},
            }
        )
    )
    assert main(["retrieve", str(path), "--set", "retrieval.num_select=7"]) == 2
    assert "retrieval.num_select" in capsys.readouterr().err
    assert main(["retrieve", str(path), "--set", "retrieval.selection=nearest"]) == 2
    assert "selection must be global or per_class" in capsys.readouterr().err
    assert main(["retrieve", str(path)]) == 0
    assert "wrote 3 images in 1 shards" in capsys.readouterr().out
    assert len(list(stream(list_pool(str(pool))[0]))) == 6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pool": ""}, "pool and labeled are required"),
        ({"labeled_per_class": 2, "labeled_total": 5}, "not both"),
        ({"num_select": 0}, "num_select must be positive"),
        ({"selection": "nearest"}, "selection must be global or per_class"),
        ({"layers": []}, "layers must be a non-empty list"),
        ({"split": "a/b"}, "split must be a simple name"),
        ({"pool_size": 3}, "unknown key retrieval.pool_size"),
    ],
)
def test_retrieval_section_is_validated(fields: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=message):
        retrieval_config(tmp_path, "teacher.pt", **{"pool": "p", "labeled": "l", **fields})


def test_retrieval_section_is_optional_and_round_trips(tmp_path: Path) -> None:
    config = retrieval_config(tmp_path, "teacher.pt", pool="s3://b/p", labeled="l")
    data = config.to_dict()
    assert data["retrieval"]["pool"] == "s3://b/p" and "translation" not in data
    assert parse_config(data).retrieval == config.retrieval
    del data["retrieval"]
    assert parse_config(data).retrieval is None
