"""Tiny separable data for the evaluation tests: each class is a colour, plus noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io.shards import Sample, write_tar

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [128, 128, 0],
        [0, 0, 128],
    ],
    dtype=np.float32,
)


def coloured(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image: the class colour with noise."""
    noise = rng.normal(0, 40, (size, size, 3))
    return np.clip(PALETTE[label] + noise, 0, 255).astype(np.uint8)


def write_shards(
    root: Path, per_class: int, shard_size: int, seed: int = 0, size: int = 32
) -> Path:
    """A run-like folder of shards (with sidecars) of coloured images; logits = 6 * one-hot."""
    total = per_class * 10
    sizes = [min(shard_size, total - start) for start in range(0, total, shard_size)]
    return write_sized_shards(root, sizes, seed, size)


def write_sized_shards(
    root: Path, sizes: list[int], seed: int = 0, size: int = 32, logits: bool = True
) -> Path:
    """Shards of ``sizes`` samples (with sidecars); labels cycle through the 10 classes."""
    rng = np.random.default_rng(seed)
    position = 0
    for index, count in enumerate(sizes):
        samples = []
        for slot in range(count):
            label = position % 10
            scores = np.full(10, -3.0, np.float32)
            scores[label] = 3.0
            image = coloured(label, rng, size)
            samples.append(
                Sample(f"{index:06d}-{slot:05d}", image, label, {}, scores if logits else None)
            )
            position += 1
        name = f"train-{index:06d}"
        sha256, _ = write_tar(str(root / "shards" / f"{name}.tar"), samples)
        sidecar = {"shard": name, "samples": len(samples), "sha256": sha256}
        (root / "shards" / f"{name}.json").write_text(json.dumps(sidecar))
    return root


def write_test_folder(root: Path, per_class: int, seed: int = 1, size: int = 32) -> Path:
    """Class folders ``root/<class>/<n>.png`` of coloured images (the real test set)."""
    rng = np.random.default_rng(seed)
    for label in range(10):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            Image.fromarray(coloured(label, rng, size)).save(folder / f"{n:04d}.png")
    return root


def write_plain_shards(root: Path, sizes: list[int], seed: int = 0, size: int = 32) -> Path:
    """Tars written by ``webdataset.TarWriter`` itself (png + cls, no sidecars), as another
    tool or a real-data baseline would; labels cycle through the 10 classes."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    position = 0
    for index, count in enumerate(sizes):
        with wds.TarWriter(str(root / f"real-{index:04d}.tar")) as writer:
            for _ in range(count):
                label = position % 10
                writer.write(
                    {"__key__": f"s{position:06d}", "png": coloured(label, rng, size), "cls": label}
                )
                position += 1
    return root
