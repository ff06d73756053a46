"""One shard, start to finish: synthesize, filter, write the tar, write the sidecar.

:class:`ShardWorker` is the synthesis stage's worker for the executor's pool (in this
process or as a Ray actor); the pool adds nothing to the work itself.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from pipeline.config import Config, FilterConfig
from pipeline.execution.device import worker_device
from pipeline.execution.metrics import record_shard, record_shard_started
from pipeline.io.shards import Sample, ShardStore, Sidecar
from pipeline.models.accuracy import normalise
from pipeline.models.archs import build_architecture
from pipeline.models.teachers import Teacher, load_teacher, load_verifier
from pipeline.stages.guidance import guidance_images
from pipeline.stages.metadata import Metadata, load_metadata
from pipeline.stages.plan import ShardTask
from synthesizers import SynthesisResult, SynthesisSpec, build_synthesizer

log = logging.getLogger("dreamshard.worker")


@dataclass
class BatchOutcome:
    samples: list[Sample | None]  # one per slot; None where every attempt was rejected
    attempts: int = 0
    synthesized: int = 0
    nonfinite: list[int] = field(default_factory=list)  # seeds whose loss was NaN/inf
    seconds: float = 0.0
    tried: Counter = field(default_factory=Counter)  # class -> images synthesized
    passed: Counter = field(default_factory=Counter)  # class -> images that passed the filter


def accepted(
    result: SynthesisResult, config: FilterConfig, verifier: Teacher | None = None
) -> torch.Tensor:
    """(B,) bool: the images a run keeps: those that :func:`pass_filter` (all, when the
    filter is disabled)."""
    if not config.enabled:
        return torch.ones(len(result.labels), dtype=torch.bool)
    return pass_filter(result, config, verifier)


def pass_filter(
    result: SynthesisResult, config: FilterConfig, verifier: Teacher | None = None
) -> torch.Tensor:
    """(B,) bool: teacher confidence >= τ and argmax == target, and the verifier's argmax
    == target when one is configured (measured even when the filter is disabled, so that
    accept rates say what the teacher thinks of every run's images)."""
    confidence, predicted = result.probs.max(dim=1)
    keep = (confidence >= config.min_confidence) & (predicted == result.labels)
    if verifier is not None:
        keep &= verify(verifier, result.images) == result.labels
    return keep


@torch.no_grad()
def verify(verifier: Teacher, images: torch.Tensor) -> torch.Tensor:
    """The verifier's predicted class of [0, 1] images (B, C, H, W), at its own size."""
    spec = verifier.config
    size = spec.image_size
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    return verifier.model(normalise(images, spec.mean, spec.std)).argmax(dim=1)


def refill(open_slots: list[tuple[int, int]], batch: int) -> list[tuple[int, int]]:
    """A full-size batch of (label, row) for the open slots (cycled), so batch statistics
    stay sound."""
    return [open_slots[i % len(open_slots)] for i in range(batch)]


class ShardWorker:
    """Holds one teacher and one synthesizer; turns shard tasks into shards."""

    def __init__(
        self,
        config: Config,
        metadata_url: str | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.device = worker_device(device, threads)
        self.config = config
        options = config.run.storage_options
        self.store = ShardStore.for_run(config.run, config.runtime)
        self.teacher = load_teacher(config.teacher, options)
        self.synthesizer = build_synthesizer(
            config.synthesizer.name, self.teacher.model, config.synthesizer.params, self.device
        )
        student_arch = getattr(config.synthesizer.params, "student_arch", "")
        if student_arch:  # ADI's student from the registry (synthesizers cannot import it)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.synthesizer.params.student_seed)
                student = build_architecture(student_arch, config.teacher.num_classes)
            self.synthesizer.attach_student(student)
        self.metadata: Metadata | None = None
        if metadata_url is not None:
            self.metadata = load_metadata(metadata_url, options)
        verifier = config.filter.verifier
        self.verifier = load_verifier(verifier, options) if verifier else None
        self.guidance_images = guidance_images(config)  # images the method's config names

    def spec(self, labels: list[int], seed: int, rows: list[int] | None = None) -> SynthesisSpec:
        t = self.config.teacher
        guidance = self.metadata.guidance(rows or labels) if self.metadata else {}
        guidance = {**self.guidance_images, **guidance}
        return SynthesisSpec(
            torch.tensor(labels, dtype=torch.int64),
            (3, t.image_size, t.image_size),
            seed,
            t.mean,
            t.std,
            guidance,
            min_confidence=f.min_confidence if (f := self.config.filter).enabled else None,
        )

    def synthesize_batch(
        self, task: ShardTask, batch: int, labels: list[int], rows: list[int] | None = None
    ) -> BatchOutcome:
        """Synthesize one batch; re-synthesize rejected slots up to ``max_attempts``.

        ``rows`` are the metadata rows of the slots (seed-guided runs); by default a
        slot's row is its class.
        """
        rows = rows or labels
        filter_config = self.config.filter
        outcome = BatchOutcome(samples=[None] * len(labels))
        offset = task.spans()[batch][0]  # slot index of the batch's first sample
        start = time.perf_counter()
        for attempt in range(filter_config.max_attempts):
            open_slots = [i for i, s in enumerate(outcome.samples) if s is None]
            if not open_slots:
                break
            targets = list(zip(labels, rows, strict=True))
            if attempt:
                targets = refill([targets[i] for i in open_slots], len(labels))
            seed = task.batch_seed(batch, attempt)
            target_labels = [label for label, _ in targets]
            target_rows = [row for _, row in targets]
            result = self.synthesizer.synthesize(self.spec(target_labels, seed, target_rows))
            outcome.attempts += 1
            outcome.synthesized += len(targets)
            outcome.tried.update(target_labels)
            if not finite(result):
                outcome.nonfinite.append(seed)
                continue
            keep = accepted(result, filter_config, self.verifier)
            self.synthesizer.after_batch(result, keep)  # ADI distils its student here
            passed = keep if filter_config.enabled else pass_filter(result, filter_config)
            outcome.passed.update(result.labels[passed].tolist())
            self._fill(
                task, outcome, rows, offset, open_slots, result, keep, target_rows, seed, attempt
            )
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _fill(
        self,
        task: ShardTask,
        outcome: BatchOutcome,
        rows: list[int],
        offset: int,
        open_slots: list[int],
        result: SynthesisResult,
        keep: torch.Tensor,
        target_rows: list[int],
        seed: int,
        attempt: int,
    ) -> None:
        """Give each open slot an accepted image of its row (class, or seed image)."""
        images = (result.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        # the teacher's probability of the sample's label (its top one whenever the filter
        # is on; with the filter off an image the teacher puts elsewhere says so)
        confidence = result.probs.gather(1, result.labels.view(-1, 1)).squeeze(1)
        logits = result.logits.float().numpy()
        candidates: dict[int, list[int]] = {}
        for j in torch.nonzero(keep).flatten().tolist():
            candidates.setdefault(target_rows[j], []).append(j)
        losses = {k: round(v, 6) for k, v in result.losses.items()}
        controls = self.synthesizer.describe()  # what the method was asked (IMAGINE's controls)
        for slot in open_slots:
            pool = candidates.get(rows[slot])
            if not pool:
                continue
            j = pool.pop(0)
            label = int(result.labels[j])
            info = {
                "label": label,
                "confidence": round(float(confidence[j]), 6),
                "synthesizer": self.config.synthesizer.name,
                "seed": seed,
                "attempt": attempt,
                "index_in_batch": j,
                "losses": losses,
            }
            if task.rows is not None and self.metadata is not None:
                info["seed_image"] = self.metadata.info["seeds"][rows[slot]]["seed"]
            if controls:
                info["controls"] = controls
            outcome.samples[slot] = Sample(
                task.key(offset + slot),
                images[j],
                label,
                info,
                logits[j] if self.config.plan.store_logits else None,
            )

    def run(self, task: ShardTask) -> Sidecar:
        """Do the whole shard and return its sidecar (also written to storage)."""
        start = time.perf_counter()
        record_shard_started(self.config.run.name, self.config.synthesizer.name)
        samples: list[Sample] = []
        attempts = synthesized = 0
        nonfinite: list[int] = []
        synthesis_seconds = 0.0
        tried: Counter = Counter()
        passed: Counter = Counter()
        for batch, (labels, rows) in enumerate(
            zip(task.batches(), task.row_batches(), strict=True)
        ):
            outcome = self.synthesize_batch(task, batch, labels, rows)
            samples += [s for s in outcome.samples if s is not None]
            attempts += outcome.attempts
            synthesized += outcome.synthesized
            nonfinite += outcome.nonfinite
            synthesis_seconds += outcome.seconds
            tried += outcome.tried
            passed += outcome.passed
        per_class = per_class_rates(task.labels, samples, tried, passed)
        for label, entry in per_class.items():
            if entry["missing"]:
                log.warning(
                    "shard %s: class %s: %d of %d slots still rejected after %d attempts "
                    "(%d of %d synthesized images passed the filter); lower "
                    "filter.min_confidence, or raise synthesizer.iterations or "
                    "filter.max_attempts",
                    task.name,
                    label,
                    entry["missing"],
                    entry["planned"],
                    self.config.filter.max_attempts,
                    entry["passed"],
                    entry["synthesized"],
                )
        sidecar = self.store.write(
            task.name,
            samples,
            "seed",
            seconds=round(time.perf_counter() - start, 3),
            device=self.device_name(),
            planned=len(task.labels),
            accepted=len(samples),
            rejected=len(task.labels) - len(samples),
            synthesized=synthesized,
            attempts=attempts,
            nonfinite_seeds=nonfinite,
            per_class=per_class,
            seed=task.seed,
            synthesis_seconds=round(synthesis_seconds, 3),
            peak_rss_bytes=peak_rss_bytes(),
        )
        record_shard(sidecar, self.config.run.name, self.config.synthesizer.name)
        return sidecar

    def device_name(self) -> str:
        """The device in words, for the sidecar."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def finite(result: SynthesisResult) -> bool:
    """Every loss term, image and logit is a finite number (a NaN batch is never kept)."""
    return (
        all(math.isfinite(v) for v in result.losses.values())
        and bool(torch.isfinite(result.images).all())
        and bool(torch.isfinite(result.logits).all())
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM on Linux, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def per_class_rates(
    planned: tuple[int, ...], samples: list[Sample], tried: Counter, passed: Counter
) -> dict[str, dict[str, int]]:
    """Per class: slots planned and filled, images synthesized and passing the filter."""
    want = Counter(planned)
    got = Counter(s.label for s in samples)
    return {
        str(label): {
            "planned": want[label],
            "written": got[label],
            "missing": want[label] - got[label],
            "synthesized": tried[label],
            "passed": passed[label],
        }
        for label in sorted(want)
    }
