"""The evaluation config: YAML and ``--set`` overrides turned into dataclasses, once.

Sections ``run``, ``data``, ``teacher`` (optional: taken from the run's manifest when
absent), ``student``, ``train``, ``prune``, ``fidelity`` and ``runtime``. Parsing reuses
``pipeline.config``'s ``build``/``apply_override``, so unknown keys, wrong types and
``--set`` behave as in ``dreamshard run``. ``run`` is ``pipeline.config.RunConfig`` itself
(the same four fields and checks); only its default name differs (``eval``), and the
evaluation writes ``{output}/{name}/{command}/``. Defaults are the papers' (KD: T = 5, SGD lr 0.1,
momentum 0.9, weight decay 5e-4, batch 128, 200 epochs; pruning: 20 epochs at lr 0.001).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import RunConfig, TeacherConfig, build, read_config_data
from pipeline.errors import InputError

RUN_DEFAULTS = {"name": "eval"}  # RunConfig's other defaults (seed 0, outputs) apply


@dataclass
class DataConfig:
    shards: str = ""  # a run folder, its manifest.json, a shards folder or a glob of tars
    test: str = ""  # class folders of real test images (any fsspec URL, may run through a tar)
    test_per_class: int | None = None  # the first N test images of each class (None: all)
    allow_incomplete: bool = False  # use the complete shards of an unfinished run
    shuffle_buffer: int = 1000  # samples; 0 reads in shard order
    loader_workers: int = 1  # DataLoader worker processes per Ray Train worker
    augment: bool = True  # random crop (4-pixel padding) and horizontal flip
    mixup: float = 0.0  # Beta(a, a) mixing of each batch with itself shuffled; 0: off
    colour: float = 0.0  # per-image contrast, brightness and colour shifts of strength s; 0: off
    blur: float = 0.0  # per-image Gaussian blur, sigma ~ U(0, blur) pixels; 0: off
    jpeg: int = 0  # per-image JPEG re-encoding at a quality drawn from [jpeg, 95]; 0: off
    # what the teacher answers with jpeg on: the re-encoded view the student sees (as for
    # every view) or the stored image before re-encoding (cropped and flipped alike)
    jpeg_teacher: Literal["view", "stored"] = "view"

    def __post_init__(self) -> None:
        if self.mixup < 0:
            raise ValueError(f"mixup is a Beta parameter, 0 (off) or positive, got {self.mixup}")
        if not 0 <= self.colour <= 1:
            raise ValueError(f"colour is a strength in [0, 1] (0: off), got {self.colour}")
        if not 0 <= self.blur <= 4:
            raise ValueError(f"blur is a largest sigma in [0, 4] pixels (0: off), got {self.blur}")
        if not 0 <= self.jpeg <= 95:
            raise ValueError(f"jpeg is a lowest quality in [1, 95] (0: off), got {self.jpeg}")
        if self.jpeg_teacher == "stored" and not self.jpeg:
            raise ValueError("jpeg_teacher: stored needs jpeg (a lowest quality); jpeg is 0 (off)")
        others = {"mixup": self.mixup, "colour": self.colour, "blur": self.blur}
        if self.jpeg_teacher == "stored" and any(others.values()):
            named = ", ".join(k for k, v in others.items() if v)
            raise ValueError(
                f"jpeg_teacher: stored pairs each view with its stored image; {named} would "
                "change the view alone: use jpeg_teacher: view with them"
            )
        if not self.shards:
            raise ValueError("shards is required (a run folder, manifest, shards folder or glob)")
        if self.shuffle_buffer < 0 or self.loader_workers < 0:
            raise ValueError("shuffle_buffer and loader_workers must be non-negative")
        if self.test_per_class is not None and self.test_per_class < 1:
            raise ValueError(f"test_per_class must be positive, got {self.test_per_class}")


@dataclass
class StudentConfig:
    arch: str = "resnet20"  # any name of the architecture registry


@dataclass
class StudentTrainConfig:
    """How the student (or the pruned teacher) is trained on the shards."""

    epochs: int = 200
    batch_size: int = 128  # global: split over the Ray Train workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step (x gamma at each milestone)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    temperature: float = 5.0  # Hinton KD temperature
    alpha: float = 0.9  # weight of the KD term; 1 - alpha weighs the hard-label term
    # weight β of attention transfer (the teacher's spatial attention maps at every
    # feature-map size both networks have; the paper's 1000); 0: off
    attention: float = 0.0
    logits: str = "online"  # online (run the teacher) | stored (the shards' logits.npy)
    eval_every: int = 1  # epochs between test-set evaluations (the last epoch always is one)
    # after training, recompute the batch norms' statistics over the shards recoloured at
    # this strength (data.colour's shifts; 0: as stored); None: keep the trained ones
    recalibrate: float | None = None

    def __post_init__(self) -> None:
        if self.recalibrate is not None and not 0 <= self.recalibrate <= 1:
            raise ValueError(
                f"recalibrate is a colour strength in [0, 1] (or null: off), got {self.recalibrate}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError("epochs, batch_size, lr and eval_every must be positive")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be cosine or step, got {self.schedule!r}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError("alpha must be in [0, 1] and temperature positive")
        if self.attention < 0:
            raise ValueError(f"attention is a non-negative weight (0: off), got {self.attention}")
        if self.logits not in ("online", "stored"):
            raise ValueError(f"logits must be online or stored, got {self.logits!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the epochs, each in (0, 1)")


@dataclass
class PruneConfig:
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    epochs: int = 20  # NaturalInversion's fine-tuning
    lr: float = 0.001

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be fractions in (0, 1), got {self.ratios}")
        if self.epochs < 0 or self.lr <= 0:
            raise ValueError("epochs must be non-negative and lr positive")


@dataclass
class FidelityNetwork:
    """An independent classifier trained on real data; unset fields are the teacher's."""

    arch: str = ""
    checkpoint: str = ""
    name: str | None = None  # default: {arch}-{index}
    num_classes: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fuse_bn: bool | None = None

    def __post_init__(self) -> None:
        if not self.arch or not self.checkpoint:
            raise ValueError("each of networks needs arch and checkpoint")

    def overrides(self) -> dict[str, Any]:
        """The teacher fields this network sets (the rest are the teacher's)."""
        fields = dataclasses.asdict(self)
        fields.pop("name")
        return {key: value for key, value in fields.items() if value is not None}


@dataclass
class FidelityConfig:
    networks: list[FidelityNetwork] = field(default_factory=list)
    max_images: int = 2000  # synthetic and real images compared (each)
    k: int = 3  # neighbours for the precision/recall manifolds
    tsne: bool = True

    def __post_init__(self) -> None:
        if self.max_images < 10 or self.k < 1:
            raise ValueError("max_images must be at least 10 and k positive")


@dataclass
class EvalRuntimeConfig:
    executor: str = "ray"  # ray (Ray Train) | inline (one worker in this process, no Ray)
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray on this machine
    num_workers: int = 2  # Ray Train workers (inline: one)
    use_gpu: bool = False  # one GPU per worker (nccl); CPU workers use gloo
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker deaths survived, resuming from the last checkpoint

    def __post_init__(self) -> None:
        if self.executor not in ("ray", "inline"):
            raise ValueError(f"executor must be ray or inline, got {self.executor!r}")
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.max_failures < 0:
            raise ValueError("num_workers and cpus_per_worker must be positive")


@dataclass
class EvalConfig:
    run: RunConfig
    data: DataConfig
    teacher: TeacherConfig | None
    student: StudentConfig
    train: StudentTrainConfig
    prune: PruneConfig
    fidelity: FidelityConfig
    runtime: EvalRuntimeConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "student": StudentConfig,
    "train": StudentTrainConfig,
    "prune": PruneConfig,
    "fidelity": FidelityConfig,
    "runtime": EvalRuntimeConfig,
}


def load_eval_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """Read an evaluation YAML, apply ``key.path=value`` overrides, validate everything."""
    data = read_config_data(path, overrides)
    return parse_eval_config(data)


def parse_eval_config(data: dict[str, Any]) -> EvalConfig:
    """Validate a plain mapping into an :class:`EvalConfig`."""
    valid = [*SECTIONS, "teacher"]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise InputError(
            f"unknown config section {unknown[0]!r}; valid sections: {', '.join(valid)}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise InputError(f"{name}: expected a mapping of fields, got {type(value).__name__}")
        if name == "run":
            value = {**RUN_DEFAULTS, **value}
        sections[name] = build(cls, value, name)
    teacher = data.get("teacher")
    if teacher is not None and not isinstance(teacher, dict):
        raise InputError("teacher: expected a mapping of fields")
    return EvalConfig(
        teacher=build(TeacherConfig, teacher, "teacher") if teacher else None, **sections
    )
