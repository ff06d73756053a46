"""Every method through the task graph: class-conditional on a BN-fused teacher, ADI's
student between batches, impression decoding from the metadata stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.errors import InputError
from pipeline.graph import run_job
from pipeline.stages.plan import make_plan
from pipeline.stages.synthesis import ShardWorker


@pytest.fixture
def train_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "train" / str(c)).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / str(c) / f"{i}.png")
    return tmp_path / "train"


def samples(run: Path) -> list[dict]:
    tars = sorted(str(p) for p in (run / "shards").glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False))


def test_class_conditional_on_a_bn_fused_teacher(make_config, train_folder, tmp_path) -> None:
    config = make_config(
        teacher={"fuse_bn": True},
        synthesizer={"name": "class-conditional", "iterations": 2},
        metadata={"source": str(train_folder)},
    )
    manifest = run_job(config)
    assert manifest["teacher_digest"].endswith("+fuse_bn")
    assert manifest["totals"]["images"] == 32
    info = json.loads(samples(tmp_path / "out" / "test")[0]["json"])
    assert set(info["losses"]) == {"ce", "cc", "tv", "l2", "total"}
    artifact = json.loads(
        Path(manifest["metadata"]["url"].replace(".safetensors", ".json")).read_text()
    )
    assert artifact["side"] == "output" and artifact["fused"] is True
    assert all("bn" not in name for name in artifact["layers"])  # conv outputs, no BN left


def test_deepinversion_on_a_fused_teacher_is_refused_at_validation(make_config) -> None:
    with pytest.raises(InputError, match="fuse_bn.*class-conditional"):
        make_config(teacher={"fuse_bn": True})
    with pytest.raises(InputError, match="fuse_bn.*class-conditional"):
        make_config(teacher={"fuse_bn": True}, synthesizer={"name": "adi"})


def test_adi_student_learns_from_accepted_images_between_batches(make_config) -> None:
    config = make_config(
        synthesizer={"name": "adi", "iterations": 2, "distill_steps": 2},
        plan={"num_images": 16, "batch_size": 8, "shard_size": 16},
    )
    worker = ShardWorker(config)
    task = make_plan(config)[0]
    (first, second) = task.batches()
    worker.synthesize_batch(task, 0, first)
    student = worker.synthesizer.student
    before = [p.detach().clone() for p in student.parameters()]
    worker.synthesize_batch(task, 1, second)
    after = list(worker.synthesizer.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_adi_student_from_the_registry(make_config) -> None:
    from pipeline.models.archs.resnet_cifar import CifarResNet

    config = make_config(synthesizer={"name": "adi", "iterations": 1, "student_arch": "resnet20"})
    worker = ShardWorker(config)
    assert isinstance(worker.synthesizer.student, CifarResNet)
    with pytest.raises(InputError, match="student_arch: unknown architecture 'resnet21'"):
        make_config(synthesizer={"name": "adi", "student_arch": "resnet21"})


def test_impression_decodes_class_codes_from_the_metadata_stage(
    make_config, train_folder, tmp_path
) -> None:
    config = make_config(
        synthesizer={"name": "impression", "iterations": 2},
        metadata={"source": str(train_folder)},
    )
    manifest = run_job(config)
    assert manifest["totals"]["images"] == 32
    artifact = json.loads(
        Path(manifest["metadata"]["url"].replace(".safetensors", ".json")).read_text()
    )
    assert artifact["side"] == "output" and artifact["layers"][0] == "conv1"
    info = json.loads(samples(tmp_path / "out" / "test")[0]["json"])
    assert "impression" in info["losses"]


def test_a_method_that_matches_statistics_needs_a_metadata_source(make_config, tmp_path) -> None:
    config = make_config(synthesizer={"name": "class-conditional", "iterations": 2})
    with pytest.raises(InputError, match="needs feature statistics: set metadata.source"):
        run_job(config)
    assert not (tmp_path / "out" / "test").exists()


def test_deepinversion_preset_from_yaml_and_set(make_config) -> None:
    """The preset is a plain field of the method's config: YAML and --set reach it, an
    explicit field wins, a bad name is refused naming the valid ones; the CIFAR configs
    name the CIFAR preset."""
    from pipeline.config import load_config

    params = make_config(synthesizer={"name": "deepinversion", "preset": "imagenet"})
    params = params.synthesizer.params
    assert (params.preset, params.warmup, params.betas, params.clip) == (
        "imagenet",
        100,
        (0.5, 0.9),
        True,
    )
    mixed = make_config(synthesizer={"name": "adi", "preset": "imagenet", "clip": False})
    assert mixed.synthesizer.params.clip is False
    assert mixed.to_dict()["synthesizer"]["preset"] == "imagenet"
    with pytest.raises(InputError, match="valid presets: cifar, imagenet"):
        make_config(synthesizer={"name": "deepinversion", "preset": "cifar-10"})
    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "configs" / "cifar10-deepinversion.yaml")
    assert config.synthesizer.params.preset == "cifar"
    assert config.synthesizer.params.lr_schedule == "constant"
    overridden = load_config(
        repo / "configs" / "cifar10-deepinversion.yaml",
        ["synthesizer.lr=0.1", "synthesizer.preset=imagenet"],
    )
    assert overridden.synthesizer.params.lr == 0.1  # a config's own lr still wins
