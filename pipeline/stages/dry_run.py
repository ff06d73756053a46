"""``dreamshard run --dry-run``: check what a run checks before it writes, and describe
the plan (shards, batches, actors, iterations) without writing anything or starting Ray."""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import Config
from pipeline.execution.placement import actor_resources
from pipeline.io.shards import completed_shards
from pipeline.stages.card import shard_pattern
from pipeline.stages.manifest import resolved_config
from pipeline.stages.plan import make_plan
from pipeline.stages.preflight import preflight


def dry_run(config: Config) -> dict[str, Any]:
    """The resolved config (secrets redacted), the teacher's digest and the plan; raises
    :class:`InputError` for what a run would refuse before writing (:func:`preflight`)."""
    teacher = preflight(config)
    return {
        "config": resolved_config(config),
        "teacher_digest": teacher.digest,
        "plan": describe_plan(config),
    }


def describe_plan(config: Config) -> dict[str, Any]:
    """Shards, batches, actors and synthesis iterations a run of ``config`` would do."""
    if config.translation is not None:
        return {
            "translation": "one shard per plan.shard_size source images, on the executor's workers"
        }
    plan = make_plan(config)
    batches = sum(len(task.batches()) for task in plan)
    iterations = config.synthesizer.params.iterations
    attempts = config.filter.max_attempts if config.filter.enabled else 1
    done = completed_shards(config.run.run_url, config.run.storage_options)
    names = [task.name for task in plan]
    described: dict[str, Any] = {
        "run_url": config.run.run_url,
        "images": config.plan.num_images,
        "classes": len(config.classes),
        "shards": len(plan),
        "shards_complete": sum(name in done for name in names),
        "shard_pattern": shard_pattern(config.run.run_url, names),
        "batches": batches,
        "batch_size": config.plan.batch_size,
        "actors": actors(config, len(plan)),
        "iterations": {
            "per_batch": iterations,
            "total": batches * iterations,
            "at_most": batches * iterations * attempts,  # every batch refilled each attempt
        },
    }
    if config.metadata.scenario == "seeds" and config.metadata.variations:
        described["note"] = (
            "a seeds run plans metadata.variations images per seed image: the image count "
            "is known once the metadata stage has read the source"
        )
    return described


def actors(config: Config, shards: int) -> dict[str, Any]:
    """The actors the runtime section asks for, judged without starting Ray."""
    runtime = config.runtime
    if runtime.executor == "inline":
        return {"count": 1, "where": "this process (runtime.executor: inline)"}
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address and not runtime.workers:
        return {
            "count": None,
            "where": f"the Ray cluster at {address}: one per GPU there, else one per "
            f"{runtime.cpus_per_worker} CPU(s), at most {shards} (one per shard)",
            "device": runtime.device,
        }
    import torch

    local = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    device = runtime.device
    if device == "auto":  # this machine has no autoscaler: what is here decides
        device = "gpu" if local["GPU"] >= runtime.gpus_per_worker else "cpu"
    options, fits = actor_resources(local, runtime, device)
    where = address or "a local Ray cluster on this machine"
    return {
        "count": max(1, min(fits, shards)),
        "where": where,
        "device": "cuda" if options["num_gpus"] else "cpu",
        "resources_per_actor": options,
    }
