"""One shard, start to finish: synthesize, filter, write the tar, write the sidecar.

:class:`ShardWorker` is a plain class. The inline executor calls it directly and the
Ray executor wraps it in an actor; neither adds anything to the work itself.
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
from pipeline.plan import ShardTask
from pipeline.shards import Sample, shard_url, write_shard, write_sidecar
from pipeline.teachers import load_teacher
from synthesizers import SynthesisResult, SynthesisSpec, build_synthesizer

log = logging.getLogger("dreamshard.worker")


@dataclass
class BatchOutcome:
    samples: list[Sample | None]  # one per slot; None where every attempt was rejected
    attempts: int = 0
    synthesized: int = 0
    nonfinite: list[int] = field(default_factory=list)  # seeds whose loss was NaN/inf
    seconds: float = 0.0


def accepted(result: SynthesisResult, config: FilterConfig) -> torch.Tensor:
    """(B,) bool: teacher confidence >= τ and argmax == target (all, when disabled)."""
    if not config.enabled:
        return torch.ones(len(result.labels), dtype=torch.bool)
    confidence, predicted = result.probs.max(dim=1)
    return (confidence >= config.min_confidence) & (predicted == result.labels)


def refill_labels(open_labels: list[int], batch: int) -> list[int]:
    """A full-size batch for the open slots (cycled), so batch statistics stay sound."""
    return [open_labels[i % len(open_labels)] for i in range(batch)]


class ShardWorker:
    """Holds one teacher and one synthesizer; turns shard tasks into shards."""

    def __init__(
        self, config: Config, run_url: str, device: str | None = None, threads: int | None = None
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.run_url = run_url
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.teacher = load_teacher(config.teacher, config.run.storage_options)
        self.synthesizer = build_synthesizer(
            config.synthesizer.name, self.teacher.model, config.synthesizer.params, self.device
        )

    def spec(self, labels: list[int], seed: int) -> SynthesisSpec:
        t = self.config.teacher
        return SynthesisSpec(
            torch.tensor(labels, dtype=torch.int64),
            (3, t.image_size, t.image_size),
            seed,
            t.mean,
            t.std,
            min_confidence=f.min_confidence if (f := self.config.filter).enabled else None,
        )

    def synthesize_batch(self, task: ShardTask, batch: int, labels: list[int]) -> BatchOutcome:
        """Synthesize one batch; re-synthesize rejected slots up to ``max_attempts``."""
        filter_config = self.config.filter
        outcome = BatchOutcome(samples=[None] * len(labels))
        offset = batch * task.batch_size  # slot index of the batch's first sample
        start = time.perf_counter()
        for attempt in range(filter_config.max_attempts):
            open_slots = [i for i, s in enumerate(outcome.samples) if s is None]
            if not open_slots:
                break
            targets = (
                labels
                if attempt == 0
                else refill_labels([labels[i] for i in open_slots], len(labels))
            )
            seed = task.batch_seed(batch, attempt)
            result = self.synthesizer.synthesize(self.spec(targets, seed))
            outcome.attempts += 1
            outcome.synthesized += len(targets)
            if not all(math.isfinite(v) for v in result.losses.values()):
                outcome.nonfinite.append(seed)
                continue
            self._fill(task, outcome, labels, offset, open_slots, result, seed, attempt)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _fill(
        self,
        task: ShardTask,
        outcome: BatchOutcome,
        labels: list[int],
        offset: int,
        open_slots: list[int],
        result: SynthesisResult,
        seed: int,
        attempt: int,
    ) -> None:
        keep = accepted(result, self.config.filter)
        images = (result.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        confidence = result.probs.max(dim=1).values
        logits = result.logits.float().numpy()
        candidates: dict[int, list[int]] = {}
        for j in torch.nonzero(keep).flatten().tolist():
            candidates.setdefault(int(result.labels[j]), []).append(j)
        losses = {k: round(v, 6) for k, v in result.losses.items()}
        for slot in open_slots:
            pool = candidates.get(labels[slot])
            if not pool:
                continue
            j = pool.pop(0)
            info = {
                "label": labels[slot],
                "confidence": round(float(confidence[j]), 6),
                "synthesizer": self.config.synthesizer.name,
                "seed": seed,
                "attempt": attempt,
                "index_in_batch": j,
                "losses": losses,
            }
            outcome.samples[slot] = Sample(
                task.key(offset + slot),
                images[j],
                labels[slot],
                info,
                logits[j] if self.config.plan.store_logits else None,
            )

    def run(self, task: ShardTask) -> dict:
        """Do the whole shard and return its sidecar (also written to storage)."""
        start = time.perf_counter()
        samples: list[Sample] = []
        attempts = synthesized = 0
        nonfinite: list[int] = []
        synthesis_seconds = 0.0
        for batch, labels in enumerate(task.batches()):
            outcome = self.synthesize_batch(task, batch, labels)
            samples += [s for s in outcome.samples if s is not None]
            attempts += outcome.attempts
            synthesized += outcome.synthesized
            nonfinite += outcome.nonfinite
            synthesis_seconds += outcome.seconds
        options = self.config.run.storage_options
        sha256, size = write_shard(shard_url(self.run_url, task.name), samples, options)
        stats = {
            "shard": task.name,
            "samples": len(samples),
            "planned": len(task.labels),
            "accepted": len(samples),
            "rejected": len(task.labels) - len(samples),
            "synthesized": synthesized,
            "attempts": attempts,
            "nonfinite_seeds": nonfinite,
            "classes": {str(k): v for k, v in sorted(Counter(s.label for s in samples).items())},
            "seed": task.seed,
            "seconds": round(time.perf_counter() - start, 3),
            "synthesis_seconds": round(synthesis_seconds, 3),
            "device": self.device_name(),
            "sha256": sha256,
            "bytes": size,
            "index": [[s.key, s.label, s.info["confidence"], s.info["seed"]] for s in samples],
        }
        write_sidecar(self.run_url, task.name, stats, options)
        return stats

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
