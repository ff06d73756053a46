"""Image-to-image translation in Impression Space (Algorithm 1), written as shards.

The target set is encoded into one ensembled code (Eq. 6); the source images, batch by
batch, start the ``impression`` synthesizer (``guidance["init_images"]``) and move
toward that code, held by the content term λ‖x − x_s‖² (``synthesizer.content_weight``).
Every teacher class gets the same target row, and every image the label 0, so the
synthesizer's ``match: class`` ensembles the whole batch (Eq. 6) and ``match: sample``
pulls each image's own code (Eq. 5). A shard stores the translated images with the
teacher's logits and hard label; its json names the source image. Runs in this process
(on the GPU when there is one); shards whose sidecar exists are skipped on a rerun.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch

import pipeline
from pipeline.config import Config, absolute_paths
from pipeline.errors import InputError
from pipeline.manifest import resolved_config
from pipeline.plan import derive_seed
from pipeline.pool import decode_or_none, list_pool, stream
from pipeline.shards import Sample, completed_shards, shard_url, write_shard, write_sidecar
from pipeline.storage import check_writable, join, write_json
from pipeline.teachers import load_teacher
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


def run_translation(config: Config) -> dict[str, Any]:
    """Translate ``translation.source`` toward ``translation.target``; returns the
    stage's manifest (also ``{run.output}/{run.name}/translation.json``)."""
    t = config.translation
    if t is None:
        raise InputError("translation: the section is not configured")
    if config.synthesizer.name != "impression":
        raise InputError("translation needs synthesizer.name: impression")
    config = absolute_paths(config)
    t, options, spec = config.translation, config.run.storage_options, config.teacher
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
    run_url = join(config.run.output, config.run.name)
    done = completed_shards(run_url, options)
    names = []
    for index, start in enumerate(range(0, len(sources), config.plan.shard_size)):
        name = f"{t.split}-{index:06d}"
        names.append(name)
        if name not in done:
            stop = start + config.plan.shard_size
            translate_shard(
                config,
                synthesizer,
                statistics,
                sources[start:stop],
                keys[start:stop],
                index,
                name,
                run_url,
            )
    manifest = {
        "run_url": run_url,
        "stage": "translation",
        "config": resolved_config(config),
        "teacher_digest": teacher.digest,
        "dreamshard_version": pipeline.__version__,
        "shards": [{"name": n, "url": shard_url(run_url, n)} for n in names],
        "totals": {
            "images": len(sources),
            "target_images": len(targets),
            "source_skipped": source_skipped,
            "target_skipped": target_skipped,
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
    x = to_unit(images).to(synthesizer.device)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
        std, device=x.device
    ).view(1, 3, 1, 1)
    codes, _ = encode(synthesizer.teacher, x, synthesizer.layers, 256, synthesizer.dtype)
    return {
        name: (m.expand(classes, -1).cpu(), v.expand(classes, -1).cpu())
        for name, (m, v) in ensemble(codes).items()
    }


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def translate_shard(
    config: Config,
    synthesizer: ImpressionSynthesizer,
    statistics: Codes,
    sources: np.ndarray,
    keys: list[str],
    index: int,
    name: str,
    run_url: str,
) -> None:
    """Translate ``sources`` (uint8 (N, S, S, 3)) batch by batch; write one shard."""
    start = time.perf_counter()
    samples: list[Sample] = []
    spec = config.teacher
    for first in range(0, len(sources), config.plan.batch_size):
        batch = to_unit(sources[first : first + config.plan.batch_size])
        seed = derive_seed(config.run.seed, "translation", index, first)
        request = SynthesisSpec(
            torch.zeros(len(batch), dtype=torch.int64),
            (3, spec.image_size, spec.image_size),
            seed,
            spec.mean,
            spec.std,
            {"class_statistics": statistics, "init_images": batch},
        )
        result = synthesizer.synthesize(request)
        images = (result.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        confidence, labels = result.probs.max(dim=1)
        losses = {k: round(v, 6) for k, v in result.losses.items()}
        for j in range(len(batch)):
            info = {
                "label": int(labels[j]),
                "confidence": round(float(confidence[j]), 6),
                "source": keys[first + j],
                "synthesizer": "impression",
                "seed": seed,
                "losses": losses,
            }
            samples.append(
                Sample(
                    f"{index:06d}-{len(samples):05d}",
                    images[j],
                    int(labels[j]),
                    info,
                    result.logits[j].numpy(),
                )
            )
    options = config.run.storage_options
    sha256, size = write_shard(shard_url(run_url, name), samples, options)
    write_sidecar(
        run_url,
        name,
        {
            "shard": name,
            "samples": len(samples),
            "classes": {str(k): v for k, v in sorted(Counter(s.label for s in samples).items())},
            "seconds": round(time.perf_counter() - start, 3),
            "device": str(synthesizer.device),
            "sha256": sha256,
            "bytes": size,
            "index": [[s.key, s.label, s.info["confidence"], s.info["seed"]] for s in samples],
        },
        options,
    )
