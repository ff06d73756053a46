"""Image-to-image translation in Impression Space (Algorithm 1), written as shards.

The target set is encoded into one ensembled code (Eq. 6); the source images, batch by
batch, start the ``impression`` synthesizer (``guidance["init_images"]``) and move
toward that code, held by the content term λ‖x − x_s‖² (``synthesizer.content_weight``).
Every teacher class gets the same target row, and every image the label 0, so the
synthesizer's ``match: class`` ensembles the whole batch (Eq. 6) and ``match: sample``
pulls each image's own code (Eq. 5). A shard stores the translated images with the
teacher's logits and hard label; its json names the source image. The driver encodes the
target set; the shards are translated and written by :class:`TranslationWorker` in the
executor's pool, like every stage's; shards whose sidecar exists are skipped on a rerun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import pipeline
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.execution.device import worker_device
from pipeline.execution.executor import ActorPool
from pipeline.io.integrity import intact_shards
from pipeline.io.lease import Lease
from pipeline.io.pool import decode_or_none, list_pool, stream
from pipeline.io.shards import (
    Sample,
    ShardStore,
    Sidecar,
    sample_key,
    shard_name,
    shard_url,
)
from pipeline.io.storage import check_writable, join, write_json
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import load_teacher
from pipeline.stages.manifest import resolved_config
from pipeline.stages.plan import derive_seed
from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.impression import Codes, ImpressionSynthesizer, encode, ensemble


def read_set(
    url: str, options: dict[str, Any], limit: int | None, size: int, where: str
) -> tuple[np.ndarray, list[str], int]:
    """Up to ``limit`` decodable images of ``url`` (uint8 (N, S, S, 3)), their keys, and
    the number of unreadable files skipped."""
    images, keys, skipped = [], [], 0
    for task in list_pool(url, options, where=f"translation.{where}"):
        for key, data in stream(task, options):
            image = decode_or_none(data, key, size)
            if image is None:
                skipped += 1
                continue
            images.append(image)
            keys.append(f"{task.url}:{key}" if task.is_tar else key)
            if limit is not None and len(images) == limit:
                return np.stack(images), keys, skipped
    if not images:
        raise InputError(f"translation.{where}: {url} holds no readable image")
    return np.stack(images), keys, skipped


@dataclass
class TranslationTask:
    """One shard of source images to translate: uint8 (N, S, S, 3) and their keys."""

    index: int
    name: str
    sources: np.ndarray
    keys: list[str]


def run_translation(config: Config) -> dict[str, Any]:
    """Translate ``translation.source`` toward ``translation.target``; returns the
    stage's manifest (also ``{run.output}/{run.name}/translation.json``)."""
    t = config.translation
    if t is None:
        raise InputError("translation: the section is not configured")
    if config.synthesizer.name != "impression":
        raise InputError("translation needs synthesizer.name: impression")
    options, spec = config.run.storage_options, config.teacher
    check_writable(config.run.output, options)
    teacher = load_teacher(spec, options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        synthesizer = build_synthesizer(
            "impression", teacher.model, config.synthesizer.params, device
        )
    except ValueError as error:
        raise InputError(str(error)) from None
    targets, _, target_skipped = read_set(
        t.target, options, t.max_target, spec.image_size, "target"
    )
    sources, keys, source_skipped = read_set(
        t.source, options, t.max_source, spec.image_size, "source"
    )
    statistics = target_statistics(synthesizer, targets, spec.mean, spec.std, spec.num_classes)
    run_url = config.run.run_url
    size = config.plan.shard_size
    tasks = [
        TranslationTask(
            index,
            shard_name(t.split, index),
            sources[start : start + size],
            keys[start : start + size],
        )
        for index, start in enumerate(range(0, len(sources), size))
    ]
    with Lease.for_run(config.run, config.runtime) as lease:  # one driver per run
        done = intact_shards(run_url, options, config.runtime.verify)  # damaged: discarded
        with ActorPool(TranslationWorker, (config, statistics), config.runtime) as pool:
            pool.map([task for task in tasks if task.name not in done])
        lease.check()
        return write_manifest(
            config, teacher.digest, tasks, len(targets), (source_skipped, target_skipped)
        )


def write_manifest(
    config: Config,
    digest: str,
    tasks: list[TranslationTask],
    targets: int,
    skipped: tuple[int, int],
) -> dict[str, Any]:
    """``translation.json``: the stage's manifest, written last."""
    run_url, options = config.run.run_url, config.run.storage_options
    manifest = {
        "run_url": run_url,
        "stage": "translation",
        "config": resolved_config(config),
        "teacher_digest": digest,
        "dreamshard_version": pipeline.__version__,
        "shards": [{"name": task.name, "url": shard_url(run_url, task.name)} for task in tasks],
        "totals": {
            "images": sum(len(task.keys) for task in tasks),
            "target_images": targets,
            "source_skipped": skipped[0],
            "target_skipped": skipped[1],
        },
    }
    write_json(join(run_url, "translation.json"), manifest, options)
    return manifest


@torch.no_grad()
def target_statistics(
    synthesizer: ImpressionSynthesizer,
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes: int,
) -> Codes:
    """The target set's ensembled code as ``class_statistics``: the same row K times."""
    x = normalise(to_unit(images).to(synthesizer.device), mean, std)
    codes, _ = encode(synthesizer.teacher, x, synthesizer.layers, 256, synthesizer.dtype)
    return {
        name: (m.expand(classes, -1).cpu(), v.expand(classes, -1).cpu())
        for name, (m, v) in ensemble(codes).items()
    }


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


class TranslationWorker:
    """Holds the teacher and the impression synthesizer; translates and writes shards."""

    def __init__(
        self,
        config: Config,
        statistics: Codes,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        device = worker_device(device, threads)
        self.config, self.statistics = config, statistics
        self.store = ShardStore.for_run(config.run, config.runtime)
        teacher = load_teacher(config.teacher, config.run.storage_options)
        self.synthesizer = build_synthesizer(
            "impression", teacher.model, config.synthesizer.params, device
        )

    def run(self, task: TranslationTask) -> Sidecar:
        """Translate the task's sources batch by batch; write one shard."""
        start = time.perf_counter()
        config, spec = self.config, self.config.teacher
        samples: list[Sample] = []
        for first in range(0, len(task.sources), config.plan.batch_size):
            batch = to_unit(task.sources[first : first + config.plan.batch_size])
            seed = derive_seed(config.run.seed, "translation", task.index, first)
            request = SynthesisSpec(
                torch.zeros(len(batch), dtype=torch.int64),
                (3, spec.image_size, spec.image_size),
                seed,
                spec.mean,
                spec.std,
                {"class_statistics": self.statistics, "init_images": batch},
            )
            result = self.synthesizer.synthesize(request)
            images = (result.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            confidence, labels = result.probs.max(dim=1)
            losses = {k: round(v, 6) for k, v in result.losses.items()}
            for j in range(len(batch)):
                info = {
                    "label": int(labels[j]),
                    "confidence": round(float(confidence[j]), 6),
                    "source": task.keys[first + j],
                    "synthesizer": "impression",
                    "seed": seed,
                    "losses": losses,
                }
                samples.append(
                    Sample(
                        sample_key(task.index, len(samples)),
                        images[j],
                        int(labels[j]),
                        info,
                        result.logits[j].numpy(),
                    )
                )
        return self.store.write(
            task.name,
            samples,
            "seed",
            seconds=round(time.perf_counter() - start, 3),
            device=str(self.synthesizer.device),
        )
