"""The run configuration: YAML and ``--set`` overrides turned into dataclasses, once.

Every section is a dataclass with defaults; the ``synthesizer`` section's fields are
the chosen method's own config dataclass (from ``synthesizers``). Unknown keys, wrong
types and impossible values raise :class:`InputError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError
from pipeline.storage import absolute
from synthesizers import SynthesizerConfig, get_synthesizer, synthesizer_names

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


@dataclass
class PlanConfig:
    num_images: int = 1024
    classes: list[int] | None = None  # None: every class of the teacher
    batch_size: int = 256
    shard_size: int = 1024
    split: str = "train"
    store_logits: bool = True  # write the teacher's logits (float16) with every sample

    def __post_init__(self) -> None:
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
    num_workers: int | None = None  # None: one per GPU, else one per cpus_per_worker CPUs
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_retries: int = 2  # extra tries for a failed shard
    progress: bool = True
    io_retries: int = 5  # extra tries of a storage write on a transient error
    io_backoff_s: float = 1.0  # the first wait between them, doubled each time

    def __post_init__(self) -> None:
        if self.executor not in ("ray", "inline"):
            raise ValueError(f"executor must be ray or inline, got {self.executor!r}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be positive")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {self.max_retries}")
        if self.io_retries < 0 or self.io_backoff_s < 0:
            raise ValueError("io_retries and io_backoff_s must be non-negative")


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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides, validate everything."""
    return parse_config(read_config_data(path, overrides))


def read_config_data(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """A YAML config file as a mapping of sections, with ``key.path=value`` overrides
    applied (not yet validated)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise InputError(f"config {path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise InputError(f"config {path}: not UTF-8 text ({error.reason})") from error
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise InputError(f"config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"config {path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``data``; the value is parsed as YAML (``1``, ``[1, 2]``)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise InputError(f"--set {override!r}: expected key.path=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw else ""


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a plain mapping into a :class:`Config`."""
    unknown = sorted(set(data) - {*SECTIONS, "synthesizer", *OPTIONAL_SECTIONS})
    if unknown:
        raise InputError(
            f"unknown config section {unknown[0]!r}; valid sections: "
            f"{', '.join([*SECTIONS, 'synthesizer', *OPTIONAL_SECTIONS])}"
        )
    sections = {
        name: build(cls, _mapping(data.get(name), name), name) for name, cls in SECTIONS.items()
    }
    for name, cls in OPTIONAL_SECTIONS.items():
        if data.get(name) is not None:
            sections[name] = build(cls, _mapping(data[name], name), name)
    config = Config(
        synthesizer=_synthesizer(_mapping(data.get("synthesizer"), "synthesizer")), **sections
    )
    check_method(config)
    bad = [c for c in config.classes if not 0 <= c < config.teacher.num_classes]
    if bad:
        raise InputError(
            f"plan.classes: {bad} outside the teacher's "
            f"{config.teacher.num_classes} classes (0 … "
            f"{config.teacher.num_classes - 1})"
        )
    return config


def check_method(config: Config) -> None:
    """What the chosen synthesizer needs from the teacher and the metadata section."""
    method = get_synthesizer(config.synthesizer.name)
    if method.needs_batchnorm and config.teacher.fuse_bn:
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} matches the statistics stored in batch-norm "
            "layers, and teacher.fuse_bn removes them; use synthesizer.name=class-conditional, "
            "which collects its own statistics (metadata section), or set teacher.fuse_bn=false"
        )
    student_arch = getattr(config.synthesizer.params, "student_arch", "")
    if student_arch and not student_arch.startswith("torchvision:"):
        from pipeline.archs import architecture_names

        if student_arch not in architecture_names():
            raise InputError(
                f"synthesizer.student_arch: unknown architecture {student_arch!r}; valid "
                f"names: {', '.join(architecture_names())}, torchvision:<name>"
            )
    if method.uses_target_images and config.metadata.scenario != "seeds":
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} makes variations of target images: set "
            "metadata.scenario=seeds and metadata.source to a folder of them (or one image)"
        )
    if config.metadata.scenario == "seeds" and not method.uses_metadata:
        raise InputError(
            f"metadata.scenario=seeds guides a method that matches statistics "
            f"(class-conditional); {config.synthesizer.name!r} does not"
        )


def absolute_paths(config: Config) -> Config:
    """Every local path the config names made absolute (Ray workers run in other folders):
    the output, the teacher's and verifier's checkpoints, the metadata source or artifact,
    the retrieval and translation sets, and the image files the method's config names."""

    def local(url: str | None) -> str | None:
        return url if url is None else absolute(url)

    params = config.synthesizer.params
    images = {
        name: local(getattr(params, name))
        for name in get_synthesizer(config.synthesizer.name).image_fields
        if getattr(params, name, None)
    }
    verifier = config.filter.verifier
    if verifier is not None:
        verifier = dataclasses.replace(verifier, checkpoint=local(verifier.checkpoint))
    m, r, t = config.metadata, config.retrieval, config.translation
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, output=local(config.run.output)),
        teacher=dataclasses.replace(config.teacher, checkpoint=local(config.teacher.checkpoint)),
        synthesizer=dataclasses.replace(
            config.synthesizer, params=dataclasses.replace(params, **images)
        ),
        filter=dataclasses.replace(config.filter, verifier=verifier),
        metadata=dataclasses.replace(m, source=local(m.source), artifact=local(m.artifact)),
        retrieval=r
        if r is None
        else dataclasses.replace(r, pool=local(r.pool), labeled=local(r.labeled)),
        translation=t
        if t is None
        else dataclasses.replace(t, source=local(t.source), target=local(t.target)),
    )


def check_inversion(config: Config) -> None:
    """What an inversion run (``dreamshard run`` without a translation section) needs
    beyond a valid config: statistics for a method that matches them. Checked before
    anything runs; ``retrieve`` and ``translate`` never invert and skip it."""
    method = get_synthesizer(config.synthesizer.name)
    if method.uses_metadata and not config.metadata.configured:
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} needs feature statistics: set "
            "metadata.source (class folders, or seed images with metadata.scenario) "
            "or metadata.artifact"
        )


def _synthesizer(data: dict[str, Any]) -> SynthesizerSection:
    data = dict(data)
    name = data.pop("name", None)
    if not isinstance(name, str):
        raise InputError(
            f"synthesizer.name is required; valid names: {', '.join(synthesizer_names())}"
        )
    try:
        method = get_synthesizer(name)
    except KeyError as error:
        raise InputError(f"synthesizer.name: {error.args[0]}") from error
    return SynthesizerSection(name, build(method.config_class, data, "synthesizer"))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a mapping of fields, got {type(value).__name__}")
    return value


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from ``data``, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise InputError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: {error}") from error


SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (converting lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], where)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, _mapping(value, where), where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint in SCALARS:
        accepted, description = SCALARS[hint]
        # bool is an int in Python; a YAML `true` is never a number here
        if not isinstance(value, accepted) or (isinstance(value, bool) and hint is not bool):
            raise InputError(f"{where}: expected {description}, got {value!r}")
        return float(value) if hint is float else value
    raise InputError(f"{where}: unsupported field type {hint}")
