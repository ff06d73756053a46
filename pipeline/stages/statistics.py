"""Per-target feature statistics of source images: the metadata stage's collection.

Per-row sums of per-image channel means, squared means and centred variances (float64),
collected in this process or, for large sources, in chunks by the executor's pool, then
merged. A row's variance is the mean of its images' variances plus the variance of their
means (the parallel formula): the within-image part never cancels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.execution.device import worker_device
from pipeline.execution.executor import ActorPool
from pipeline.io.images import ImageFolder, decode
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import Teacher, load_teacher
from synthesizers import build_synthesizer
from synthesizers.hooks import capture_statistics

log = logging.getLogger("dreamshard.metadata")

PARALLEL_FROM = 2048  # sources at least this large are collected by several workers


@dataclass
class Sums:
    """Running per-row sums of per-image moments (float64), mergeable across tasks."""

    first: dict[str, torch.Tensor]  # layer -> (R, C) Σ of per-image means m
    second: dict[str, torch.Tensor]  # layer -> (R, C) Σ m² (float64: the means' spread)
    within: dict[str, torch.Tensor]  # layer -> (R, C) Σ of per-image (centred) variances
    count: torch.Tensor  # (R,)
    dropped: dict[int, int] = field(default_factory=dict)  # class -> seeds dropped
    predictions: list[int] = field(default_factory=list)  # per image, in order

    def merge(self, other: Sums) -> Sums:
        for name in self.first:
            self.first[name] += other.first[name]
            self.second[name] += other.second[name]
            self.within[name] += other.within[name]
        self.count += other.count
        for label, n in other.dropped.items():
            self.dropped[label] = self.dropped.get(label, 0) + n
        self.predictions += other.predictions
        return self

    def statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each row's channel mean and variance (float32): the mean of its images'
        variances plus the variance of their means (0 for a row without images)."""
        statistics = {}
        denominator = self.count.clamp_min(1.0)[:, None]
        for name in self.first:
            mean = self.first[name] / denominator
            between = (self.second[name] / denominator - mean * mean).clamp_min(0.0)
            var = self.within[name] / denominator + between
            statistics[name] = (mean.float(), var.float())
        return statistics


def feature_layers(config: Config, teacher: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The layers (and side) the configured synthesizer reads; InputError on bad names."""
    try:
        synthesizer = build_synthesizer(
            config.synthesizer.name, teacher, config.synthesizer.params, "cpu"
        )
    except KeyError as error:  # unknown layer names
        raise InputError(f"synthesizer.layers: {error.args[0]}") from error
    except ValueError as error:
        raise InputError(f"synthesizer {config.synthesizer.name!r}: {error}") from error
    return synthesizer.feature_layers(), synthesizer.feature_side


def collect(
    config: Config,
    teacher: Teacher,
    source: ImageFolder,
    layers: list[tuple[str, nn.Module]],
    side: str,
) -> Sums:
    """Sums over the source, in this process or in parallel Ray tasks for large ones."""
    files = source.files
    workers = config.metadata.num_workers
    if workers is None:
        workers = 2 if len(files) >= PARALLEL_FROM and config.runtime.executor == "ray" else 1
    if workers == 1 or len(files) < 2:
        return collect_files(config, teacher.model, source, files, layers, side)
    return collect_parallel(config, source, workers)


def rows_of(config: Config, files: list[tuple[str, int]]) -> int:
    return len(files) if config.metadata.scenario == "seeds" else config.teacher.num_classes


def collect_files(
    config: Config,
    model: nn.Module,
    source: ImageFolder,
    files: list[tuple[str, int]],
    layers: list[tuple[str, nn.Module]],
    side: str,
    first_row: int = 0,
    total_rows: int | None = None,
) -> Sums:
    """Per-row sums of per-image moments over ``files``, with the inference check.

    Rows are classes, or (scenario seeds) the files themselves, numbered from
    ``first_row``. Scenarios B and C drop images the teacher puts in another class.
    """
    t = config.teacher
    scenario = config.metadata.scenario
    rows = total_rows if total_rows is not None else rows_of(config, source.files)
    first = {name: torch.zeros(rows, 0, dtype=torch.float64) for name, _ in layers}
    count = torch.zeros(rows, dtype=torch.float64)
    sums = Sums(first=first, second=dict(first), within=dict(first), count=count)
    batch = config.metadata.batch_size
    with torch.no_grad(), capture_statistics(layers, side) as records:
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            arrays = [decode(source.read(path), path, t.image_size) for path, _ in chunk]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
            predicted = model(normalise(images, t.mean, t.std)).argmax(dim=1)
            labels = torch.tensor([label for _, label in chunk])
            if scenario == "seeds":
                targets = torch.arange(first_row + start, first_row + start + len(chunk))
                keep = torch.ones(len(chunk), dtype=torch.bool)
            else:
                targets = labels
                keep = (
                    predicted == labels
                    if scenario in ("B", "C")
                    else torch.ones(len(chunk), dtype=torch.bool)
                )
                for label in labels[~keep].tolist():
                    sums.dropped[label] = sums.dropped.get(label, 0) + 1
            sums.predictions += predicted.tolist()
            one_hot = torch.nn.functional.one_hot(targets[keep], rows).to(torch.float64)
            for record in records:
                mean, var = (m[keep].to(torch.float64) for m in record.sample)  # (B, C)
                if sums.first[record.name].shape[1] == 0:
                    zeros = torch.zeros(rows, mean.shape[1], dtype=torch.float64)
                    for part in (sums.first, sums.second, sums.within):
                        part[record.name] = zeros.clone()
                sums.first[record.name] += one_hot.t() @ mean
                sums.second[record.name] += one_hot.t() @ (mean * mean)
                sums.within[record.name] += one_hot.t() @ var
            sums.count += one_hot.sum(dim=0)
    return sums


def collect_parallel(config: Config, source: ImageFolder, workers: int) -> Sums:
    """Split the files into ``workers`` chunks collected in the executor's pool (CPU
    workers: a GPU would wait on decoding); add the sums."""
    rows = rows_of(config, source.files)
    size = math.ceil(len(source.files) / workers)
    chunks = []
    for start in range(0, len(source.files), size):
        files = source.files[start : start + size]
        blobs = {path: source.blobs[path] for path, _ in files if path in source.blobs}
        chunk = ImageFolder(source.url, source.classes, files, blobs, source.storage_options)
        chunks.append(Chunk(chunk, start, rows))
    log.info("metadata: %d images in %d chunks", len(source.files), len(chunks))
    pool = ActorPool(
        StatisticsWorker, (config,), config.runtime, "chunk", device="cpu", max_workers=workers
    )
    with pool:
        results = pool.map(chunks, name=lambda chunk: f"from {chunk.first_row}", progress=False)
    total = results[0]
    for sums in results[1:]:
        total.merge(sums)
    return total


@dataclass
class Chunk:
    """Part of the source for one worker; its rows are numbered from ``first_row``."""

    source: ImageFolder
    first_row: int
    rows: int


class StatisticsWorker:
    """Loads the teacher; collects the sums of source chunks."""

    def __init__(self, config: Config, device: str | None = None, threads: int | None = None):
        worker_device("cpu", threads or max(1, int(config.runtime.cpus_per_worker)))
        self.config = config
        self.teacher = load_teacher(config.teacher, config.run.storage_options)
        self.layers, self.side = feature_layers(config, self.teacher.model)

    def run(self, chunk: Chunk) -> Sums:
        files = chunk.source.files
        return collect_files(
            self.config,
            self.teacher.model,
            chunk.source,
            files,
            self.layers,
            self.side,
            chunk.first_row,
            chunk.rows,
        )
