"""The metadata stage (scenarios A, B, C and seed-guided runs), its artifact, and the
class-conditional runs it feeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import CIFAR_TAR, RESNET20, shared
from PIL import Image

from pipeline.cli.main import main
from pipeline.errors import InputError
from pipeline.graph import run_job
from pipeline.models.teachers import load_teacher
from pipeline.stages import metadata as metadata_stage
from pipeline.stages.metadata import ensure_metadata, load_metadata
from synthesizers.hooks import batchnorm_layers, capture_statistics

CC = {"name": "class-conditional", "iterations": 2}


def random_images(count: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def save(folder: Path, images: list[np.ndarray], start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images, start):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def predictions(teacher, images: list[np.ndarray]) -> list[int]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(teacher.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return teacher.model((x - mean) / std).argmax(1).tolist()


@pytest.fixture
def cc_config(make_config, tmp_path: Path):
    def make(source: Path | str | None, classes: list[int] | None = None, **metadata):
        section = {"source": str(source) if source else None, **metadata}
        return make_config(synthesizer=CC, metadata=section, plan={"classes": classes})

    return make


def test_scenario_a_matches_direct_statistics_and_is_reused(
    cc_config, tmp_path: Path, monkeypatch
) -> None:
    images = random_images(20)
    for c in range(10):
        save(tmp_path / "train" / f"class{c}", images[2 * c : 2 * c + 2])
    config = cc_config(tmp_path / "train", scenario="A", batch_size=3)
    teacher = load_teacher(config.teacher)
    metadata = ensure_metadata(config, teacher)
    assert metadata.rows == 10 and metadata.counts == [2] * 10
    assert metadata.url.endswith(".safetensors") and Path(metadata.url).exists()
    info = json.loads(Path(metadata.url.replace(".safetensors", ".json")).read_text())
    assert info["teacher_digest"] == teacher.digest and info["scenario"] == "A"
    assert info["side"] == "input" and len(info["layers"]) == 19  # every BN of a ResNet-20

    # class 3's statistics equal those of its two images pooled, computed directly
    name, layer = batchnorm_layers(teacher.model)[5]
    x = torch.from_numpy(np.stack(images[6:8])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(teacher.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.config.std).view(1, 3, 1, 1)
    with torch.no_grad(), capture_statistics([(name, layer)]) as (record,):
        teacher.model((x - mean) / std)
    got_mean, got_var = metadata.statistics[name]
    assert torch.allclose(got_mean[3], record.mean, atol=1e-5)
    assert torch.allclose(got_var[3], record.var, atol=1e-4)

    # the same source and teacher reuse the artifact instead of collecting again
    def refuse(*args, **kwargs):
        raise AssertionError("collected again")

    monkeypatch.setattr(metadata_stage, "collect", refuse)
    again = ensure_metadata(config, teacher)
    assert again.url == metadata.url
    assert torch.equal(again.statistics[name][0], got_mean)


@pytest.fixture(scope="module")
def cifar_seeds() -> dict:
    """Five CIFAR-10 (JPEG) test images per class and the shared ResNet-20's view of them."""
    from pipeline.config import TeacherConfig
    from pipeline.io.images import open_image_folder

    folder = open_image_folder(f"{shared(CIFAR_TAR)}/cifar10-jpeg/test").subset(5)
    images, labels = folder.load()
    pixels = list(images.permute(0, 2, 3, 1).numpy())
    teacher = load_teacher(TeacherConfig(checkpoint=str(shared(RESNET20))))
    return {"pixels": pixels, "labels": labels.tolist(), "predicted": predictions(teacher, pixels)}


@pytest.fixture
def resnet20_config(make_config):
    def make(source: Path, classes: list[int], scenario: str):
        return make_config(
            teacher={"checkpoint": str(shared(RESNET20))},
            synthesizer=CC,
            metadata={"source": str(source), "scenario": scenario},
            plan={"classes": classes},
        )

    return make


def test_scenario_b_drops_misclassified_seeds_and_refuses_a_class_without_seeds(
    cifar_seeds: dict, resnet20_config, tmp_path: Path
) -> None:
    pixels, labels, predicted = (cifar_seeds[k] for k in ("pixels", "labels", "predicted"))
    right = {
        c: [x for x, y, p in zip(pixels, labels, predicted, strict=True) if y == p == c]
        for c in range(10)
    }
    cat, ship = 3, 8
    intruders = right[ship][:2]  # ships the teacher knows are ships, filed under "cat"
    save(tmp_path / "seeds" / str(cat), right[cat] + intruders)
    config = resnet20_config(tmp_path / "seeds", [cat], "B")
    teacher = load_teacher(config.teacher)
    metadata = ensure_metadata(config, teacher)
    assert metadata.info["dropped"] == {str(cat): 2}
    assert metadata.counts[cat] == len(right[cat]) and metadata.info["used"] == len(right[cat])

    save(tmp_path / "seeds" / str(ship), right[cat][:3], start=100)  # only cats as "ship"
    config = resnet20_config(tmp_path / "seeds", [cat, ship], "B")
    with pytest.raises(
        InputError, match=f"classifies none of the 3 seed image.s. of class {ship} as class"
    ):
        ensure_metadata(config, teacher)


def test_scenario_c_takes_one_seed_per_class(
    cifar_seeds: dict, resnet20_config, tmp_path: Path
) -> None:
    pixels, labels, predicted = (cifar_seeds[k] for k in ("pixels", "labels", "predicted"))
    first = {}
    for x, y, p in zip(pixels, labels, predicted, strict=True):
        if y == p:
            first.setdefault(y, x)
    classes = sorted(first)[:4]
    for c in classes:
        save(tmp_path / "one" / str(c), [first[c]])
    config = resnet20_config(tmp_path / "one", classes, "C")
    teacher = load_teacher(config.teacher)
    metadata = ensure_metadata(config, teacher)
    assert [metadata.counts[c] for c in classes] == [1] * 4
    assert metadata.info["dropped"] == {}
    save(tmp_path / "one" / str(classes[0]), [first[classes[1]]], start=7)
    with pytest.raises(
        InputError, match=f"scenario C takes one seed image per class, class {classes[0]}"
    ):
        ensure_metadata(resnet20_config(tmp_path / "one", classes, "C"), teacher)


def test_seed_guided_run_labels_variations_by_the_seed_prediction(
    cc_config, tmp_path: Path
) -> None:
    pool = random_images(3, seed=4)
    seeds = save(tmp_path / "photos" / "nested", pool)
    config = cc_config(tmp_path / "photos", scenario="seeds", variations=4)
    teacher = load_teacher(config.teacher)
    predicted = predictions(teacher, pool)
    manifest = run_job(config)
    assert manifest["totals"]["images"] == 12
    assert manifest["metadata"]["scenario"] == "seeds"
    tars = sorted((tmp_path / "out" / "test" / "shards").glob("*.tar"))
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    by_seed: dict[str, list[int]] = {}
    for sample in samples:
        info = json.loads(sample["json"])
        by_seed.setdefault(info["seed_image"], []).append(info["label"])
        assert int(sample["cls"]) == info["label"]
    assert sorted(by_seed) == sorted(str(p) for p in seeds)
    for path, pixels in zip(seeds, pool, strict=True):
        assert by_seed[str(path)] == [predictions(teacher, [pixels])[0]] * 4
    assert sorted(predicted) == sorted(by_seed[str(p)][0] for p in seeds)


def test_a_single_seed_image_is_a_source(cc_config, tmp_path: Path) -> None:
    (path,) = save(tmp_path / "one", random_images(1, seed=5))
    config = cc_config(path, scenario="seeds")
    metadata = ensure_metadata(config, load_teacher(config.teacher))
    assert metadata.rows == 1 and metadata.info["seeds"][0]["seed"] == str(path)


def test_artifact_for_another_teacher_is_refused_naming_both_digests(
    cc_config, tmp_path: Path
) -> None:
    images = random_images(20)
    for c in range(10):
        save(tmp_path / "train" / str(c), images[2 * c : 2 * c + 2])
    config = cc_config(tmp_path / "train")
    teacher = load_teacher(config.teacher)
    artifact = ensure_metadata(config, teacher)
    other = load_metadata(artifact.url, None)
    other.info["teacher_digest"] = "sha256:" + "0" * 64
    other.url = str(tmp_path / "elsewhere.safetensors")
    metadata_stage.save_metadata(other, None)
    config = cc_config(None, artifact=other.url)
    with pytest.raises(InputError, match=r"computed for teacher sha256:0{64}, but this teacher is"):
        ensure_metadata(config, teacher)
    reused = ensure_metadata(cc_config(None, artifact=artifact.url), teacher)
    assert reused.counts == artifact.counts


def test_bad_inputs_exit_2_and_write_nothing(
    teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    import yaml
    from tests_support import config_dict

    def run(**sections) -> str:
        data = config_dict(str(tmp_path / "out"), teacher_checkpoint, **sections)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["metadata", str(path)]) == 2
        assert not (tmp_path / "out" / "metadata").exists()
        return capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert "no such folder" in run(synthesizer=CC, metadata={"source": str(tmp_path / "nope")})
    assert "holds no images" in run(
        synthesizer=CC, metadata={"source": str(tmp_path / "empty"), "scenario": "seeds"}
    )
    save(tmp_path / "train" / "0", random_images(1))
    save(tmp_path / "train" / "1", random_images(1))
    err = run(
        synthesizer={**CC, "layers": ["layer1.0.bn1", "layer9.conv"]},
        metadata={"source": str(tmp_path / "train")},
    )
    assert "layer9.conv" in err and "valid layers" in err and "layer1.0.conv1" in err
    err = run(synthesizer=CC, metadata={"source": str(tmp_path / "train")})
    assert "no images for class(es) [2, 3" in err
    err = run(synthesizer=CC)
    assert "metadata.source" in err
    err = run(teacher={"fuse_bn": True}, synthesizer={"name": "deepinversion"})
    assert "fuse_bn" in err and "class-conditional" in err


def test_scenario_a_on_the_shared_resnet20_with_a_few_cifar_images(
    make_config, tmp_path: Path
) -> None:
    source = f"{shared(CIFAR_TAR)}/cifar10-jpeg/test"
    config = make_config(
        teacher={"checkpoint": str(shared(RESNET20))},
        synthesizer=CC,
        metadata={"source": source, "max_per_class": 3},
        plan={"num_images": 20, "batch_size": 10, "shard_size": 10},
    )
    manifest = run_job(config)
    metadata = load_metadata(manifest["metadata"]["url"], None)
    assert metadata.counts == [3] * 10 and manifest["metadata"]["used"] == 30
    assert manifest["totals"]["images"] == 20
    layer = "layer3.2.bn2"
    mean, var = metadata.statistics[layer]
    assert mean.shape == var.shape == (10, 64) and (var > 0).any()
    assert not torch.allclose(mean[0], mean[1])  # class-conditional, not one global average


def test_parallel_collection_in_ray_tasks_equals_one_process(
    cc_config, ray_cluster, tmp_path: Path
) -> None:
    from dataclasses import replace

    images = random_images(30, seed=6)
    for c in range(10):
        save(tmp_path / "train" / f"class{c}", images[3 * c : 3 * c + 3])
    config = cc_config(tmp_path / "train", num_workers=3, batch_size=4)
    config = replace(config, runtime=replace(config.runtime, executor="ray"))
    teacher = load_teacher(config.teacher)
    parallel = ensure_metadata(config, teacher)
    single = replace(config, metadata=replace(config.metadata, num_workers=1))
    single = replace(single, run=replace(single.run, output=str(tmp_path / "other")))
    inline = ensure_metadata(single, teacher)
    assert parallel.counts == inline.counts == [3] * 10
    for name, (mean, var) in inline.statistics.items():
        assert torch.allclose(parallel.statistics[name][0], mean, atol=1e-5)
        assert torch.allclose(parallel.statistics[name][1], var, atol=1e-4)
