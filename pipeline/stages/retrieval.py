"""The retrieval stage: pick the pool images nearest to the labeled images in impression
distance (Impression Space, section 3.4 and supplement G.3) and write them as shards.

1. The labeled images are encoded (in this process: there are few) into one ensembled
   code (``selection: global``, as the paper) or one per class (``per_class``).
2. Workers (the executor's pool: Ray actors, or this process) stream the
   pool task by task and return only their best candidates; the driver merges each
   task's candidates, as it arrives, into a bounded top-n_t structure (per class: each
   pool image competes for its nearest class, n_t split evenly), so the pool never has
   to fit in memory.
3. Workers read the tasks holding selected images once more and write those images as
   shards (teacher logits, hard label, source and distance in the json), then the
   sidecars; ``retrieval.json`` (the stage's manifest) is written last.

Bad input fails before anything is written: an empty pool, fewer usable pool images
than n_t (refused: the user asked for n_t), a class without labeled images, unknown
layers.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

import pipeline
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.execution.executor import ActorPool
from pipeline.io.images import open_image_folder
from pipeline.io.integrity import intact_shards
from pipeline.io.lease import Lease
from pipeline.io.pool import PoolTask, known_size, list_pool
from pipeline.io.shards import Sidecar
from pipeline.io.storage import check_writable, exists, join, read_json, redact, write_json
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import load_teacher
from pipeline.stages.manifest import resolved_config, shard_entries
from pipeline.stages.retrieval_worker import PoolWorker, ScoreTask, TopK, WriteJob
from synthesizers.impression import class_codes, encode, ensemble, flatten, template_layers
from synthesizers.precision import autocast_dtype

log = logging.getLogger("dreamshard.retrieval")


def run_retrieval(config: Config) -> dict[str, Any]:
    """Run the retrieval stage of ``config`` (its ``retrieval`` section); returns the
    stage's manifest (also written to ``{run.output}/{run.name}/retrieval.json``)."""
    if config.retrieval is None:
        raise InputError("retrieval: the section is not configured")
    r, options = config.retrieval, config.run.storage_options
    check_writable(config.run.output, options)
    teacher = load_teacher(config.teacher, options)
    try:
        layers = template_layers(teacher.model, r.layers)
    except KeyError as error:
        raise InputError(f"retrieval.layers: {error.args[0]}") from None
    tasks = list_pool(r.pool, pool_options(config), r.files_per_task)
    size = known_size(tasks)
    if size is not None and size < r.num_select:
        raise InputError(too_small(r.pool, size, 0, r.num_select))
    images, labels = labeled_images(config)
    targets = target_codes(teacher.model, config, layers, images, labels)  # (T, D)
    quotas = split_quota(r.num_select, len(targets))
    run_url = config.run.run_url

    heaps = [TopK(q) for q in quotas]  # the driver's only per-image state: n_t entries
    pool = ActorPool(PoolWorker, (config, targets), config.runtime, "pool task", per_worker=2)
    with pool:
        scores = pool.map(  # each task's candidates merged as it arrives: bounded memory
            [ScoreTask(t, quotas) for t in tasks], progress=False, reduce=lambda s: absorb(heaps, s)
        )
        scores.sort(key=lambda s: s["task"])
        jobs = select(config, tasks, heaps, scores)
        with Lease.for_run(config.run, config.runtime) as lease:  # one driver per run
            record_retrieval(run_url, config, teacher.digest)
            # the selection's shards already written and intact (damaged: discarded)
            done = intact_shards(run_url, config.run.storage_options, config.runtime.verify)
            pool.map([replace(job, done=done) for job in jobs], progress=False)
            lease.check()
            return finalise(run_url, config, teacher.digest, jobs, scores, heaps, len(images))


def select(
    config: Config,
    tasks: list[PoolTask],
    heaps: list[TopK],
    scores: list[dict[str, Any]],
) -> list[WriteJob]:
    """The selection, checked and cut into write jobs."""
    r = config.retrieval
    scored = sum(s["scored"] for s in scores)
    skipped = sum(s["skipped"] for s in scores)
    if scored < r.num_select:
        raise InputError(too_small(r.pool, scored, skipped, r.num_select))
    selected = [heap.items() for heap in heaps]
    short = shortfall(heaps)
    if short:  # per class: too few pool images are nearest to these classes
        log.warning(
            "retrieval: %d of %d images selected; targets short of their share of n_t "
            "(asked, selected): %s",
            sum(len(c) for c in selected),
            config.retrieval.num_select,
            {t: (entry["asked"], entry["selected"]) for t, entry in short.items()},
        )
    return write_jobs(tasks, selected, scores, config)


def pool_options(config: Config) -> dict[str, Any]:
    options = config.retrieval.pool_storage_options
    return config.run.storage_options if options is None else options


def too_small(url: str, usable: int, skipped: int, wanted: int) -> str:
    return (
        f"retrieval.num_select: the pool {url} has {usable} usable images ({skipped} "
        f"skipped as unreadable), fewer than the {wanted} asked for; lower num_select"
    )


def labeled_images(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeled images, uint8 (N, 3, S, S), and their labels, after n_l is applied."""
    r, teacher = config.retrieval, config.teacher
    folder = open_image_folder(r.labeled, config.run.storage_options)
    if len(folder.classes) != teacher.num_classes:
        raise InputError(
            f"retrieval.labeled: {r.labeled} has images for {len(folder.classes)} classes "
            f"({', '.join(folder.classes[:12])}) but the teacher has {teacher.num_classes}; "
            "give every class a folder with at least one image, in the teacher's class order"
        )
    folder = folder.subset(r.labeled_per_class)
    if r.labeled_total is not None and r.labeled_total < len(folder.files):
        chosen = random.Random(config.run.seed).sample(folder.files, r.labeled_total)
        folder = replace(folder, files=sorted(chosen, key=lambda f: (f[1], f[0])))
    counts = Counter(label for _, label in folder.files)
    empty = [folder.classes[k] for k in range(teacher.num_classes) if not counts[k]]
    if empty and r.selection == "per_class":
        raise InputError(
            f"retrieval.labeled: no labeled images for class(es) {', '.join(empty)} after "
            "labeled_total; per-class selection needs at least one image of every class"
        )
    return folder.load(teacher.image_size)


@torch.no_grad()
def target_codes(
    model: torch.nn.Module,
    config: Config,
    layers: list,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """The labeled set's ensembled code (1, D), or each class's (K, D)."""
    r, t = config.retrieval, config.teacher
    x = normalise(images, t.mean, t.std)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    codes, _ = encode(model, x, layers, r.batch_size, dtype)
    if r.selection == "global":
        return flatten(ensemble(codes), r.mean_only)[None]
    rows, _ = class_codes(codes, labels, t.num_classes)
    return flatten(rows, r.mean_only)


def split_quota(total: int, targets: int) -> list[int]:
    """``total`` split as evenly as possible over ``targets`` (the first get the rest)."""
    return [total // targets + (1 if t < total % targets else 0) for t in range(targets)]


def absorb(heaps: list[TopK], score: dict[str, Any]) -> dict[str, Any]:
    """Merge a task's candidates into the driver's bounded heaps as soon as the task
    returns; what is kept of the task afterwards is only its counts."""
    for t, candidates in enumerate(score.pop("candidates")):
        for candidate in candidates:
            heaps[t].push(tuple(candidate))
    return score


def write_jobs(
    tasks: list[PoolTask], selected: list[list[tuple]], scores: list[dict], config: Config
) -> list[WriteJob]:
    """Group the selection by pool task; cut each task's share into shards of
    ``plan.shard_size`` in stream order. Shard names follow the task order."""
    per_class = config.retrieval.selection == "per_class"
    ranked = sorted((c, t) for t, candidates in enumerate(selected) for c in candidates)
    picks: dict[int, dict[int, dict[str, Any]]] = {}
    for rank, ((d, task, position, key), target) in enumerate(ranked):
        picks.setdefault(task, {})[position] = {
            "distance": round(d, 6),
            "rank": rank,
            "member": key,
            "selected_for": target if per_class else None,
        }
    by_task = {s["task"]: s for s in scores}
    jobs, index = [], 0
    for task in tasks:
        if task.index not in picks:
            continue
        positions = sorted(picks[task.index])
        shards = []
        for start in range(0, len(positions), config.plan.shard_size):
            name = f"{config.retrieval.split}-{index:06d}"
            shards.append((name, index, positions[start : start + config.plan.shard_size]))
            index += 1
        stats = {k: by_task[task.index][k] for k in ("scored", "skipped")}
        jobs.append(WriteJob(task, picks[task.index], shards, stats))
    return jobs


def record_retrieval(run_url: str, config: Config, digest: str) -> None:
    """``retrieval-run.json`` before any shard; a rerun with another config is refused
    (shards of the same name would otherwise mix two selections)."""
    record = {"config": stage_config(config), "teacher_digest": digest}
    url = join(run_url, "retrieval-run.json")
    options = config.run.storage_options
    if exists(url, options):
        previous = read_json(url, options)
        keep = ("run", "teacher", "plan", "retrieval")
        if any(previous["config"].get(k) != record["config"].get(k) for k in keep) or (
            previous["teacher_digest"] != digest
        ):
            raise InputError(
                f"run.name {config.run.name!r}: {run_url} already holds a retrieval with a "
                "different config; choose another run.name or remove it"
            )
        return
    write_json(url, record, options)


def stage_config(config: Config) -> dict[str, Any]:
    data = resolved_config(config)
    data["retrieval"]["pool_storage_options"] = redact(data["retrieval"]["pool_storage_options"])
    return data


def shortfall(heaps: list[TopK]) -> dict[str, dict[str, int]]:
    """The targets (classes, with per_class selection) that got fewer candidates than
    their share of n_t: target -> {asked, selected}."""
    return {
        str(t): {"asked": heap.capacity, "selected": len(heap)}
        for t, heap in enumerate(heaps)
        if len(heap) < heap.capacity
    }


def finalise(
    run_url: str,
    config: Config,
    digest: str,
    jobs: list[WriteJob],
    scores: list[dict],
    heaps: list[TopK],
    labeled: int,
) -> dict[str, Any]:
    """``retrieval.json``: the stage's manifest, written last."""
    options = config.run.storage_options
    selected = [heap.items() for heap in heaps]
    names = [name for job in jobs for name, _, _ in job.shards]
    sidecars = [Sidecar.read(run_url, name, options) for name in names]
    classes: Counter = Counter()
    for sidecar in sidecars:
        classes.update({int(k): v for k, v in sidecar.classes.items()})
    distances = [c[0] for candidates in selected for c in candidates]
    manifest = {
        "run_url": run_url,
        "stage": "retrieval",
        "config": stage_config(config),
        "teacher_digest": digest,
        "dreamshard_version": pipeline.__version__,
        "shards": shard_entries(run_url, sidecars),
        "totals": {
            "images": sum(s.samples for s in sidecars),
            "labeled_images": labeled,
            "pool_tasks": len(scores),
            "pool_scored": sum(s["scored"] for s in scores),
            "pool_skipped": sum(s["skipped"] for s in scores),
            "pool_broken": [s["broken"] for s in scores if s.get("broken")],
            "skipped_examples": [k for s in scores for k in s["skipped_keys"]][:10],
            "classes": {str(k): classes[k] for k in sorted(classes)},
            "selected_per_target": [len(c) for c in selected],
            "shortfall": shortfall(heaps),  # targets short of their share of n_t
            "distance": {
                "min": min(distances),
                "max": max(distances),
                "mean": sum(distances) / len(distances),
            },
        },
    }
    write_json(join(run_url, "retrieval.json"), manifest, options)
    return manifest
