"""Scale of teachers: a 1,000-class 224×224 teacher (torchvision ResNet-50, random
weights) runs end to end, and what a run writes stays bounded in the number of classes
(preview, manifest, card, wids index, sidecars)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tests_support import config_dict

from pipeline.config import TeacherConfig, parse_config
from pipeline.graph import run_job
from pipeline.io.shards import Sidecar
from pipeline.stages.card import MAX_TABLE_CLASSES, per_class_table
from pipeline.stages.preview import ENLARGE_TO, MAX_CLASSES, MAX_TILE, PER_CLASS, preview_classes

IMAGENET = {"arch": "torchvision:resnet50", "num_classes": 1000, "image_size": 224}


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ResNet-50 with seeded random weights (nothing downloaded), about 100 MB."""
    import torch

    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import save_checkpoint

    torch.manual_seed(0)
    model = build_architecture(IMAGENET["arch"], IMAGENET["num_classes"]).eval()
    path = tmp_path_factory.mktemp("resnet50") / "resnet50-random.pt"
    save_checkpoint(model, TeacherConfig(checkpoint=str(path), **IMAGENET), str(path))
    return str(path)


@pytest.mark.timeout(180)
def test_a_1000_class_224_teacher_runs_and_its_records_stay_small(
    resnet50_checkpoint: str, tmp_path: Path
) -> None:
    data = config_dict(
        str(tmp_path / "out"),
        resnet50_checkpoint,
        teacher=IMAGENET,
        synthesizer={"name": "deepinversion", "iterations": 1},
        plan={"num_images": 2, "batch_size": 2, "shard_size": 2},
    )
    manifest = run_job(parse_config(data))
    run = Path(manifest["run_url"])
    assert manifest["totals"]["images"] == 2
    # per-class records only for the classes that had slots, not 1,000 rows of zeros
    assert set(manifest["totals"]["per_class"]) == {"0", "1"}
    assert manifest["preview"] == {"classes": [0, 1], "classes_total": 1000, "per_class": 8}
    preview = Image.open(run / "preview.png")
    tile = MAX_TILE + 2  # a tile and its padding
    assert preview.size == (PER_CLASS * tile + 2, 2 * tile + 2)  # 2 rows, tiles shrunk
    sizes = {name: (run / name).stat().st_size for name in ("manifest.json", "README.md")}
    sizes["wids-index.json"] = (run / "wids-index.json").stat().st_size
    sizes["sidecar"] = (run / "shards" / "train-000000.json").stat().st_size
    assert sizes["manifest.json"] < 8_000 and sizes["README.md"] < 6_000, sizes
    assert sizes["wids-index.json"] < 1_000 and sizes["sidecar"] < 3_000, sizes
    assert (run / "preview.png").stat().st_size < 1_000_000
    card = (run / "README.md").read_text()
    assert "2 of the 1000 classes" in card and "1000 classes, 224×224" in card
    sample = json.loads((run / "shards" / "train-000000.json").read_text())
    assert sample["classes"] == {"0": 1, "1": 1}


def test_the_preview_shows_at_most_its_cap_of_classes_that_have_images() -> None:
    sidecars = [
        Sidecar("train-000000", 3, "x", classes={"5": 1, "998": 2}),
        Sidecar("train-000001", 40, "y", classes={str(k): 2 for k in range(100, 120)}),
    ]
    shown = preview_classes(list(range(1000)), sidecars, MAX_CLASSES)
    assert shown == [5, *range(100, 100 + MAX_CLASSES - 1)]
    assert preview_classes(list(range(10)), [], MAX_CLASSES) == list(range(10))  # all rows
    assert ENLARGE_TO >= MAX_TILE


def test_the_card_table_of_1000_classes_is_a_summary_and_the_worst_classes() -> None:
    per_class = {
        str(k): {"synthesized": 10, "passed": 10 - k % 7, "accept_rate": (10 - k % 7) / 10}
        for k in range(1000)
    }
    totals = {"classes": {k: v["passed"] for k, v in per_class.items()}, "per_class": per_class}
    lines = per_class_table(totals)
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == MAX_TABLE_CLASSES
    assert all(row.endswith("| 40.0% |") for row in rows)  # k % 7 == 6: the lowest rate
    assert lines[0].startswith("1000 classes: 4–10 images per class")
    small = {k: per_class[k] for k in ("0", "1", "2")}
    table = per_class_table({"classes": {"0": 10, "1": 9}, "per_class": small})
    assert table[-1] == "| 2 | 0 | 10 | 80.0% |"  # a class with no image is still listed


def test_read_images_decodes_only_the_classes_asked_for(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.io.shards import Sample, read_images, write_tar

    samples = [
        Sample(f"000000-{i:05d}", np.full((8, 8, 3), i, np.uint8), i % 3, {"confidence": 1.0})
        for i in range(9)
    ]
    url = str(tmp_path / "shard.tar")
    write_tar(url, samples)
    wanted = read_images(url, labels={1})
    assert [label for label, _ in wanted] == [1, 1, 1]
    assert [int(image[0, 0, 0]) for _, image in wanted] == [1, 4, 7]  # in order
    assert len(read_images(url)) == 9 and len(read_images(url, limit=2)) == 2
