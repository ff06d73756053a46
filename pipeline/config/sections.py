"""The config's sections: one dataclass each, with the defaults next to their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.storage import join
from synthesizers import SynthesizerConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output: str = "outputs"  # fsspec URL: a folder, file://…, s3://bucket/prefix
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError("name must be non-empty and contain no '/'")

    @property
    def run_url(self) -> str:
        """The run folder: ``{output}/{name}``."""
        return join(self.output, self.name)


@dataclass
class TeacherConfig:
    arch: str = "resnet20"
    checkpoint: str = ""
    num_classes: int = 10
    image_size: int = 32
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    fuse_bn: bool = False  # fold every BN into its preceding conv (an inference-optimised net)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required (a path or URL)")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std positive")


BATCHING = ("mixed", "by_class")


@dataclass
class PlanConfig:
    num_images: int = 1024
    classes: list[int] | None = None  # None: every class of the teacher
    batch_size: int = 256
    shard_size: int = 1024
    split: str = "train"
    store_logits: bool = True  # write the teacher's logits (float16) with every sample
    # mixed: the classes take turns within a batch; by_class: a shard's slots in class
    # order and each batch one class (at most batch_size of that class's slots)
    batching: str = "mixed"

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(
                f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}"
            )
        for name in ("num_images", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.classes is not None and not self.classes:
            raise ValueError("classes must be a non-empty list, or null for every class")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes has duplicates: {self.classes}")
        if not self.split.isidentifier():
            raise ValueError(f"split must be a simple name, got {self.split!r}")


@dataclass
class FilterConfig:
    enabled: bool = True  # false keeps every synthesized image
    min_confidence: float = 0.5  # keep teacher confidence >= this and argmax == target
    max_attempts: int = 3  # synthesis rounds per batch, the first included
    verifier: TeacherConfig | None = None  # a second classifier whose argmax must also agree

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


SCENARIOS = ("A", "B", "C", "seeds")


@dataclass
class MetadataConfig:
    """Where per-target feature statistics come from (class-conditional, impression).

    A: a labelled training set (class folders). B: seed images per class (class folders),
    inference-checked. C: one seed image per class, inference-checked. seeds: a folder of
    arbitrary seed images (or one image), each its own target, labelled with the teacher's
    prediction on it (a seed-guided run).
    """

    source: str | None = None  # URL of the images (class folders; for seeds any images)
    scenario: str = "A"
    artifact: str | None = None  # use this precomputed .safetensors instead of a source
    max_per_class: int | None = None  # cap the images read per class (A, B)
    variations: int | None = None  # seeds: images per seed (sets plan.num_images)
    batch_size: int = 128
    num_workers: int | None = None  # Ray tasks collecting in parallel; None: by source size

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(
                f"scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}"
            )
        if self.source is not None and self.artifact is not None:
            raise ValueError("give either source or artifact, not both")
        if self.source == "" or self.artifact == "":
            raise ValueError("source and artifact must be URLs when given")
        for name in ("max_per_class", "variations", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.variations is not None and self.scenario != "seeds":
            raise ValueError("variations applies to scenario seeds only")

    @property
    def configured(self) -> bool:
        return self.source is not None or self.artifact is not None


@dataclass
class RuntimeConfig:
    executor: str = "ray"  # ray | inline (in this process, no Ray: debugging, one GPU)
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray on this machine
    device: str = "auto"  # gpu | cpu | auto: gpu when GPUs are up or the autoscaler has GPU nodes
    max_workers: int | None = None  # actors asked for up front; None: as many as fit what is up
    num_workers: int | None = None  # the older name of max_workers (give one)
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    max_retries: int = 2  # extra tries for a failed shard
    progress: bool = True
    io_retries: int = 7  # extra tries of a storage write on a transient error (jittered)
    io_backoff_s: float = 1.0  # the first wait between them, doubled each time
    verify: bool = False  # a rerun also hashes every completed shard (always: their sizes)
    lease_heartbeat_s: float = 10.0  # the driver rewrites {run}/lease.json this often
    lease_timeout_s: float = 60.0  # a lease not rewritten for this long is a crashed driver's

    def __post_init__(self) -> None:
        if self.executor not in ("ray", "inline"):
            raise ValueError(f"executor must be ray or inline, got {self.executor!r}")
        if self.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"device must be auto, gpu or cpu, got {self.device!r}")
        for name in ("max_workers", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if None not in (self.max_workers, self.num_workers) and (
            self.max_workers != self.num_workers
        ):
            raise ValueError(
                "give max_workers or num_workers (its older name), not both: got "
                f"{self.max_workers} and {self.num_workers}"
            )
        if any(amount <= 0 for amount in self.resources_per_worker.values()):
            raise ValueError("resources_per_worker amounts must be positive")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be positive")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {self.max_retries}")
        if self.io_retries < 0 or self.io_backoff_s < 0:
            raise ValueError("io_retries and io_backoff_s must be non-negative")
        if not 0 < self.lease_heartbeat_s < self.lease_timeout_s:
            raise ValueError(
                "lease_heartbeat_s must be positive and below lease_timeout_s, got "
                f"{self.lease_heartbeat_s} and {self.lease_timeout_s}"
            )

    @property
    def workers(self) -> int | None:
        """Actors to ask for up front (``max_workers``, or ``num_workers``); None: as many
        as the resources that are up hold."""
        return self.max_workers or self.num_workers


@dataclass
class RetrievalConfig:
    """The retrieval stage: select the pool images nearest, in impression distance, to
    the labeled images. Not configured (None) by default."""

    pool: str = ""  # unlabeled images: a folder, a .tar/.tar.gz, or WebDataset shards
    labeled: str = ""  # class folders ROOT/<class>/<image>, one per teacher class
    labeled_per_class: int | None = None  # n_l per class (the first by name); None: all
    labeled_total: int | None = None  # n_l in total (a draw seeded by run.seed); None: all
    num_select: int = 1000  # n_t; more than the pool's usable images is an error
    selection: str = "global"  # global: one ensembled code; per_class: one per class
    layers: list[str] | None = None  # template layers; None: every convolution
    mean_only: bool = False  # codes of channel means only (Eq. 1)
    batch_size: int = 256
    files_per_task: int = 1024  # pool images per scoring task (a shard or tar is one task)
    split: str = "retrieved"  # shard name prefix
    pool_storage_options: dict[str, Any] | None = None  # None: run.storage_options

    def __post_init__(self) -> None:
        if not self.pool or not self.labeled:
            raise ValueError("pool and labeled are required (URLs)")
        if self.labeled_per_class is not None and self.labeled_total is not None:
            raise ValueError("give labeled_per_class or labeled_total, not both")
        for name in ("labeled_per_class", "labeled_total", "num_select"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.batch_size < 1 or self.files_per_task < 1:
            raise ValueError("batch_size and files_per_task must be positive")
        if self.selection not in ("global", "per_class"):
            raise ValueError(f"selection must be global or per_class, got {self.selection!r}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be a non-empty list, or null for every convolution")
        if not self.split.isidentifier():
            raise ValueError(f"split must be a simple name, got {self.split!r}")


@dataclass
class TranslationConfig:
    """Image-to-image translation (Algorithm 1) with the impression synthesizer: the
    source images move toward the ensembled code of the target images; λ is
    ``synthesizer.content_weight``. Not configured (None) by default."""

    source: str = ""  # images to translate: a folder, a .tar/.tar.gz, or WebDataset shards
    target: str = ""  # the target set, same forms
    max_source: int | None = None  # translate at most this many source images
    max_target: int | None = None  # encode at most this many target images
    split: str = "translated"  # shard name prefix

    def __post_init__(self) -> None:
        if not self.source or not self.target:
            raise ValueError("source and target are required (URLs)")
        for name in ("max_source", "max_target"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not self.split.isidentifier():
            raise ValueError(f"split must be a simple name, got {self.split!r}")


@dataclass
class SynthesizerSection:
    name: str
    params: SynthesizerConfig


@dataclass
class Config:
    run: RunConfig
    teacher: TeacherConfig
    synthesizer: SynthesizerSection
    plan: PlanConfig
    filter: FilterConfig
    runtime: RuntimeConfig
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    retrieval: RetrievalConfig | None = None
    translation: TranslationConfig | None = None

    @property
    def classes(self) -> list[int]:
        return list(self.plan.classes or range(self.teacher.num_classes))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (the synthesizer section flattened)."""
        data = dataclasses.asdict(self)
        data["synthesizer"] = {"name": self.synthesizer.name, **data["synthesizer"]["params"]}
        for name in OPTIONAL_SECTIONS:  # a section that is not configured is left out
            if data[name] is None:
                del data[name]
        return data


SECTIONS = {
    "run": RunConfig,
    "teacher": TeacherConfig,
    "plan": PlanConfig,
    "filter": FilterConfig,
    "metadata": MetadataConfig,
    "runtime": RuntimeConfig,
}

OPTIONAL_SECTIONS = {"retrieval": RetrievalConfig, "translation": TranslationConfig}
