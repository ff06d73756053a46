"""The metadata stage: per-target feature statistics of source images, stored once.

For every target (a class; in seed-guided runs, a seed image) and every layer the
synthesizer reads, the channel mean and variance of the feature maps over all the
target's source images (pooled over images and pixels, which is what the loss
measures on a batch). Scenarios (``metadata.scenario``):

- ``A``: a labelled training set (class folders); every image counts.
- ``B``: seed images per class (class folders); seeds the teacher does not classify as
  their class are dropped and counted.
- ``C``: one seed image per class (class folders), checked like B.
- ``seeds``: arbitrary seed images (a folder or one file); each is its own target,
  labelled with the teacher's prediction on it.

The artifact is ``{output}/metadata/{key}.safetensors`` (tensors ``{layer}.mean`` and
``{layer}.var`` of shape (R, C), ``count`` and ``label`` of shape (R,)) with a json
beside it; ``key`` is derived from the teacher's digest, the source's digest and the
layers, so a second run with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.io.images import ImageFolder, decode, open_image_files, open_image_folder
from pipeline.io.storage import atomic_open, exists, filesystem, join, read_bytes, read_json
from pipeline.models.teachers import Teacher
from pipeline.stages.statistics import Sums, collect, feature_layers
from synthesizers import get_synthesizer

log = logging.getLogger("dreamshard.metadata")

FORMAT = "dreamshard-metadata/1"


@dataclass
class Metadata:
    """Per-target statistics, ready to be handed to a synthesizer as guidance."""

    url: str
    statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (R, C) mean, var
    labels: list[int]  # the class of each row
    counts: list[int]  # images behind each row
    info: dict[str, Any] = field(default_factory=dict)  # the json beside the artifact
    images: torch.Tensor | None = None  # (R, 3, H, W) uint8 seed images, when stored

    @property
    def rows(self) -> int:
        return len(self.labels)

    def guidance(self, rows: list[int]) -> dict[str, Any]:
        index = torch.tensor(rows, dtype=torch.int64)
        guidance = {"class_statistics": self.statistics, "statistics_index": index}
        if self.images is not None:  # each sample's own seed image, (B, 3, H, W) in [0, 1]
            guidance["target_images"] = self.images[index].float() / 255.0
        return guidance


def ensure_metadata(config: Config, teacher: Teacher) -> Metadata:
    """Load the configured artifact, or reuse or collect the one for this source."""
    options = config.run.storage_options
    layers, side = feature_layers(config, teacher.model)
    names = [name for name, _ in layers]
    section = config.metadata
    with_images = stores_images(config)
    if section.artifact:
        metadata = load_metadata(section.artifact, options)
        check_artifact(metadata, teacher.digest, names, section.artifact, with_images)
        return metadata
    source = open_source(config)
    key = artifact_key(teacher.digest, source_digest(source), section, names, side, config)
    url = join(config.run.output, "metadata", f"{key}.safetensors")
    if exists(url, options):
        metadata = load_metadata(url, options)
        check_artifact(metadata, teacher.digest, names, url, with_images)
        log.info("metadata: reusing %s", url)
        return metadata
    start = time.perf_counter()
    sums = collect(config, teacher, source, layers, side)
    metadata = finish(config, teacher, source, sums, names, side, url)
    if with_images:
        metadata.images = seed_images(source, config.teacher.image_size)
    metadata.info["seconds"] = round(time.perf_counter() - start, 3)
    save_metadata(metadata, options)
    log.info("metadata: %d rows from %d images -> %s", metadata.rows, sum(metadata.counts), url)
    return metadata


def stores_images(config: Config) -> bool:
    """A seeds run of a method that reads the seed images themselves (IMAGINE)."""
    method = get_synthesizer(config.synthesizer.name)
    return config.metadata.scenario == "seeds" and method.uses_target_images


def seed_images(source: ImageFolder, image_size: int) -> torch.Tensor:
    """Every source image as uint8 (R, 3, S, S) at the teacher's size, in row order."""
    arrays = [decode(source.read(path), path, image_size) for path, _ in source.files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def open_source(config: Config) -> ImageFolder:
    """The source images, with each file's class index (-1 for seeds)."""
    section, teacher = config.metadata, config.teacher
    options = config.run.storage_options
    if section.scenario == "seeds":
        return open_image_files(section.source, options)
    folder = open_image_folder(section.source, options, min_classes=1)
    folder = folder.subset(section.max_per_class)
    indices = class_indices(folder.classes, teacher.num_classes, section.source)
    files = [(path, indices[label]) for path, label in folder.files]
    if section.scenario == "C":
        per_class: dict[int, int] = {}
        for _, label in files:
            per_class[label] = per_class.get(label, 0) + 1
        crowded = {c: n for c, n in per_class.items() if n > 1}
        if crowded:
            label, n = next(iter(sorted(crowded.items())))
            raise InputError(
                f"metadata.source {section.source}: scenario C takes one seed image per class, "
                f"class {label} has {n}; use scenario B for several seeds per class"
            )
    missing = sorted(set(config.classes) - {label for _, label in files})
    if missing:
        raise InputError(
            f"metadata.source {section.source} has no images for class(es) {missing[:10]} "
            "that plan.classes asks for; add class folders for them or narrow plan.classes"
        )
    return ImageFolder(folder.url, folder.classes, files, folder.blobs, folder.storage_options)


def class_indices(names: list[str], num_classes: int, url: str | None) -> list[int]:
    """Class folder names -> the teacher's class indices: integers are taken as indices,
    otherwise the folders, sorted, must be the teacher's classes in order."""
    if all(name.isdigit() for name in names):
        indices = [int(name) for name in names]
        bad = [i for i in indices if i >= num_classes]
        if bad:
            raise InputError(
                f"metadata.source {url}: class folder(s) {bad[:5]} outside the teacher's "
                f"{num_classes} classes"
            )
        return indices
    if len(names) != num_classes:
        raise InputError(
            f"metadata.source {url}: {len(names)} class folders but the teacher has "
            f"{num_classes} classes; name folders by class index (0, 1, …) for a subset"
        )
    return list(range(num_classes))


def source_digest(source: ImageFolder) -> str:
    """sha256 over every file's path, class and size (contents for archive members)."""
    digest = hashlib.sha256(source.url.encode())
    if source.blobs:
        sizes = {path: len(source.blobs[path]) for path, _ in source.files}
    else:
        fs, _ = filesystem(source.url, source.storage_options)
        paths = [path for path, _ in source.files]
        sizes = dict(zip(paths, fs.sizes(paths), strict=True))
    for path, label in source.files:
        digest.update(f"{path}\0{label}\0{sizes[path]}\n".encode())
    return "sha256:" + digest.hexdigest()


def artifact_key(
    teacher_digest: str,
    source: str,
    section: Any,
    names: list[str],
    side: str,
    config: Config,
) -> str:
    parts = [
        FORMAT,
        teacher_digest,
        source,
        section.scenario,
        side,
        *names,
        str(config.teacher.image_size),
        str(config.teacher.mean),
        str(config.teacher.std),
        *(["images"] if stores_images(config) else []),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def finish(
    config: Config,
    teacher: Teacher,
    source: ImageFolder,
    sums: Sums,
    names: list[str],
    side: str,
    url: str,
) -> Metadata:
    """Means and variances from the sums; InputError when a class lost every seed."""
    scenario = config.metadata.scenario
    count = sums.count
    if scenario in ("B", "C"):
        empty = [c for c in config.classes if count[c] == 0]
        if empty:
            c = empty[0]
            raise InputError(
                f"metadata.source {source.url}: the teacher classifies none of the "
                f"{sums.dropped.get(c, 0)} seed image(s) of class {c} as class {c}"
                f"{_class_name(source, c)}; use different seeds for it, or scenario C with "
                "one seed the teacher recognises"
            )
    pooled = sums.statistics()
    statistics = {name: pooled[name] for name in names}
    if scenario == "seeds":
        labels = sums.predictions
        rows = [
            {"row": i, "seed": path, "label": labels[i]} for i, (path, _) in enumerate(source.files)
        ]
    else:
        labels = list(range(config.teacher.num_classes))
        rows = []
    info = {
        "format": FORMAT,
        "teacher_digest": teacher.digest,
        "teacher_arch": config.teacher.arch,
        "fused": config.teacher.fuse_bn,
        "source": source.url,
        "source_digest": source_digest(source),
        "scenario": scenario,
        "images": len(source.files),
        "used": int(count.sum()),
        "dropped": {str(k): v for k, v in sorted(sums.dropped.items())},
        "counts": [int(c) for c in count],
        "labels": labels,
        "layers": names,
        "side": side,
        "image_size": config.teacher.image_size,
        "seeds": rows,
    }
    return Metadata(url, statistics, labels, [int(c) for c in count], info)


def _class_name(source: ImageFolder, index: int) -> str:
    if len(source.classes) > index and not source.classes[index].isdigit():
        return f" ({source.classes[index]})"
    return ""


def save_metadata(metadata: Metadata, options: dict[str, Any] | None) -> None:
    """The safetensors artifact, then its json (a complete pair, each written atomically)."""
    tensors = {}
    for name, (mean, var) in metadata.statistics.items():
        tensors[f"{name}.mean"] = mean.contiguous()
        tensors[f"{name}.var"] = var.contiguous()
    tensors["count"] = torch.tensor(metadata.counts, dtype=torch.int64)
    tensors["label"] = torch.tensor(metadata.labels, dtype=torch.int64)
    if metadata.images is not None:
        tensors["images"] = metadata.images.contiguous()
    header = {"format": FORMAT, "teacher_digest": metadata.info["teacher_digest"]}
    with atomic_open(metadata.url, options) as f:
        f.write(save_safetensors(tensors, metadata=header))
    with atomic_open(_json_url(metadata.url), options) as f:
        f.write(json.dumps(metadata.info, indent=2).encode())


def load_metadata(url: str, options: dict[str, Any] | None) -> Metadata:
    """Read an artifact (and its json when present); InputError if it is not one."""
    try:
        data = read_bytes(url, options)
    except FileNotFoundError as error:
        raise InputError(f"metadata.artifact {url}: no such file") from error
    try:
        tensors = load_safetensors(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get(
            "__metadata__", {}
        )
    except Exception as error:
        raise InputError(f"metadata.artifact {url}: not a safetensors file ({error})") from error
    if header.get("format") != FORMAT or "label" not in tensors:
        raise InputError(f"metadata.artifact {url}: not a dreamshard metadata artifact")
    info = read_json(_json_url(url), options) if exists(_json_url(url), options) else {}
    info.setdefault("teacher_digest", header.get("teacher_digest"))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith(".mean")})
    statistics = {name: (tensors[f"{name}.mean"], tensors[f"{name}.var"]) for name in names}
    labels = tensors["label"].tolist()
    images = tensors.get("images")
    return Metadata(url, statistics, labels, tensors["count"].tolist(), info, images)


def check_artifact(
    metadata: Metadata, digest: str, names: list[str], url: str, with_images: bool = False
) -> None:
    computed_for = metadata.info.get("teacher_digest")
    if computed_for != digest:
        raise InputError(
            f"metadata.artifact {url} was computed for teacher {computed_for}, but this "
            f"teacher is {digest}; collect metadata for this teacher "
            "(metadata.source) or point at its own artifact"
        )
    missing = [name for name in names if name not in metadata.statistics]
    if missing:
        raise InputError(
            f"metadata.artifact {url} has no statistics for layer(s) {missing[:5]} that "
            f"the synthesizer reads; it holds {sorted(metadata.statistics)[:10]}"
        )
    if with_images and metadata.images is None:
        raise InputError(
            f"metadata.artifact {url} holds no seed images, which this synthesizer "
            "matches; collect the metadata from the seeds (metadata.source)"
        )


def _json_url(url: str) -> str:
    return url.removesuffix(".safetensors") + ".json"
