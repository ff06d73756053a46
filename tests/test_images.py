"""Class-folder image sets from folders and archives."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR_TAR, shared
from PIL import Image

from pipeline.errors import InputError
from pipeline.io.images import decode, open_image_folder

CLASSES = ["zebra", "ant", "moth"]


def make_folder(root: Path, per_class: int = 3, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{per_class - i:03d}.png")
    (root / "README.txt").write_text("not an image")
    return root


def test_folder_classes_sorted_and_files_sorted(tmp_path: Path) -> None:
    folder = open_image_folder(str(make_folder(tmp_path / "set")))
    assert folder.classes == ["ant", "moth", "zebra"]
    assert [label for _, label in folder.files] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    names = [path.rsplit("/", 1)[-1] for path, label in folder.files if label == 0]
    assert names == ["001.png", "002.png", "003.png"]
    images, labels = folder.load()
    assert images.dtype.is_floating_point is False and images.shape == (9, 3, 8, 8)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_archive_with_inner_path_equals_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data" / "inner" / "train")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data", arcname="data")
    from_archive = open_image_folder(f"{archive}/data/inner/train")
    from_folder = open_image_folder(str(root))
    assert from_archive.classes == from_folder.classes
    a, la = from_archive.subset(2).load()
    b, lb = from_folder.subset(2).load()
    assert a.equal(b) and la.equal(lb)
    assert len(from_archive.subset(2).files) == 6


def test_resize_on_load(tmp_path: Path) -> None:
    images, _ = open_image_folder(str(make_folder(tmp_path / "s"))).load(image_size=16)
    assert images.shape == (9, 3, 16, 16)


def test_cifar_archive_subset_is_balanced_and_in_standard_label_order() -> None:
    folder = open_image_folder(f"{shared(CIFAR_TAR)}/cifar10-jpeg/test")
    assert folder.classes[0] == "airplane" and folder.classes[-1] == "truck"
    assert len(folder.classes) == 10
    subset = folder.subset(5)
    assert [p.rsplit("/", 1)[-1] for p, label in subset.files if label == 3] == [
        "0000.jpg",
        "0001.jpg",
        "0002.jpg",
        "0003.jpg",
        "0004.jpg",
    ]


def test_bad_sources_and_images(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        open_image_folder(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no such file"):
        open_image_folder(str(tmp_path / "nope.tar.gz") + "/x")
    single = tmp_path / "single" / "only"
    single.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(single / "a.png")
    with pytest.raises(InputError, match="found 1 class folder"):
        open_image_folder(str(tmp_path / "single"))
    with pytest.raises(InputError, match="empty image file"):
        decode(b"", "zero.png")
    png = (tmp_path / "single" / "only" / "a.png").read_bytes()
    with pytest.raises(InputError, match="cut.png: not a readable image"):
        decode(png[: len(png) // 2], "cut.png")
    gray = tmp_path / "g.png"
    Image.new("L", (4, 4), 7).save(gray)
    assert decode(gray.read_bytes(), "g.png").shape == (4, 4, 3)
