"""Fidelity metrics against closed forms, and ``dreamshard eval fidelity`` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from evaluation_support import write_shards, write_test_folder

from evaluation.fidelity import (
    class_balance,
    diversity,
    fd_name,
    frechet_distance,
    precision_recall,
)
from pipeline.cli.main import main


def test_frechet_distance_matches_the_closed_form_for_shifted_gaussians() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=generator, dtype=torch.float64) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # identity vs 4·identity covariance, means 0 and 1: 3·1² + 3·(1 + 4 − 2·2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)


def test_the_frechet_distance_is_named_by_its_features() -> None:
    assert fd_name("resnet20") == "fd_resnet20"
    assert fd_name("torchvision:ResNet18") == "fd_torchvision_resnet18"


def test_precision_recall_diversity_and_balance() -> None:
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(200, 4, generator=generator)
    same = real + 0.01 * torch.randn(200, 4, generator=generator)
    scores = precision_recall(real, same, k=3)
    assert scores["precision"] > 0.95 and scores["recall"] > 0.95
    collapsed = real[:1].repeat(200, 1) + 0.01 * torch.randn(200, 4, generator=generator)
    scores = precision_recall(real, collapsed, k=3)
    assert scores["precision"] > 0.9 and scores["recall"] < 0.1  # faithful, not diverse
    far = precision_recall(real, real + 100, k=3)
    assert far["precision"] == far["recall"] == 0.0
    labels = torch.tensor([0, 0, 1, 1])
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 2.0]])
    assert diversity(points, labels) == pytest.approx((5.0 + 1.0) / 2)
    balance = class_balance(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert balance["counts"] == [2, 2, 2] and balance["entropy"] == pytest.approx(1.0)
    skewed = class_balance(torch.tensor([0, 0, 0, 1]), 3)
    assert skewed["min_over_max"] == 0.0 and skewed["entropy"] < 0.6


def test_fidelity_command_reports_every_metric(
    teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    shards = write_shards(tmp_path / "run", per_class=6, shard_size=30)
    test = write_test_folder(tmp_path / "test", per_class=6)
    config = {
        "run": {"name": "fid", "output": str(tmp_path / "eval")},
        "data": {"shards": str(shards), "test": str(test)},
        "teacher": {"arch": "resnet20", "checkpoint": teacher_checkpoint},
        "fidelity": {
            "networks": [
                {"name": "independent", "arch": "resnet20", "checkpoint": teacher_checkpoint}
            ],
            "k": 3,
            "max_images": 50,
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", "fidelity", str(path)]) == 0
    output = tmp_path / "eval" / "fid" / "fidelity"
    results = json.loads((output / "report.json").read_text())["results"]
    assert results["images"] == {"synthetic": 50, "real": 50}
    assert results["class_balance"]["counts"] == [5] * 10
    (row,) = results["networks"]
    assert row["network"] == "independent"
    for key in ("accuracy_synthetic", "accuracy_real", "precision", "recall"):
        assert 0.0 <= row[key] <= 1.0
    assert row["fd_resnet20"] > 0 and row["diversity_synthetic"] > 0
    per_class = row["per_class_synthetic"]
    assert list(per_class) == sorted(p.name for p in test.iterdir())  # the class names
    # 5 images of each class: the classes' mean is the overall agreement
    assert sum(per_class.values()) / 10 == pytest.approx(row["accuracy_synthetic"])
    assert not any("fid" in key for key in row)  # named by its features, never "FID"
    page = (output / "report.html").read_text()
    for name in re.findall(r"(?:src|href)='([^']+)'", page):
        assert (output / name).is_file(), name
    assert "tsne.png" in page and "classes.png" in page
    capsys.readouterr()
    config["fidelity"]["networks"][0]["arch"] = "resnet56"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", "fidelity", str(path)]) == 2
    error = capsys.readouterr().err
    assert "fidelity.networks[0]: arch is 'resnet56' but the checkpoint was" in error
