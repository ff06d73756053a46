"""A run's records: ``run.json`` (what was asked, written before any shard),
``manifest.json`` + ``index.parquet`` + ``preview.png`` + the dataset card and wids index
(:mod:`pipeline.stages.card`; written once every shard is complete), and
:func:`inspect_run` that reports on a run folder."""

from __future__ import annotations

import io
import json
import platform
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline.config import Config, parse_config
from pipeline.errors import InputError
from pipeline.io.integrity import damaged_shards
from pipeline.io.shards import Sidecar, complete, listing, shard_url
from pipeline.io.storage import atomic_open, exists, join, read_json, redact, write_json
from pipeline.stages.card import WIDS_INDEX_NAME, shard_pattern, write_card_and_index
from pipeline.stages.plan import ShardTask, make_plan
from pipeline.stages.preview import write_preview

RESUMABLE_SECTIONS = ("runtime",)  # may change between a run and its resumption


def resolved_config(config: Config) -> dict[str, Any]:
    """The config as JSON data (tuples as lists), secrets redacted."""
    data = config.to_dict()
    data["run"]["storage_options"] = redact(data["run"]["storage_options"])
    pool = (data.get("retrieval") or {}).get("pool_storage_options")
    if pool is not None:
        data["retrieval"]["pool_storage_options"] = redact(pool)
    return json.loads(json.dumps(data))


def record_run(
    run_url: str, config: Config, teacher_digest: str, options: dict[str, Any] | None
) -> None:
    """Write ``run.json``, or check that an existing one asked for the same dataset."""
    record = {"config": resolved_config(config), "teacher_digest": teacher_digest}
    url = join(run_url, "run.json")
    if exists(url, options):
        previous = read_json(url, options)
        same, before = identity(record["config"]), identity(upgraded(previous.get("config", {})))
        if same != before or previous.get("teacher_digest") != teacher_digest:
            changed = sorted(k for k in {*same, *before} if same.get(k) != before.get(k))
            raise InputError(
                f"run.name {config.run.name!r}: {run_url} already holds a run with a different "
                f"config ({', '.join(changed) or 'teacher checkpoint'}); choose another "
                "run.name, or remove that run to start over"
            )
        return
    write_json(url, record, options)


def upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config as this version records it: fields added since it was written take
    their defaults, so a run made before a new field (whose default keeps the old behaviour)
    still resumes; what it recorded is kept. One this version cannot parse stays as it is
    (and then differs)."""
    try:
        data = resolved_config(parse_config(_plain(config)))
    except (InputError, KeyError, TypeError, ValueError):
        return config
    data["run"]["storage_options"] = config["run"].get("storage_options", {})  # redacted
    return data


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same dataset: the config without the sections that may
    change on resume, and without the teacher's path (the teacher is its digest, so the
    same checkpoint at another URL, e.g. a job's carried copy, resumes)."""
    same = {k: v for k, v in config.items() if k not in RESUMABLE_SECTIONS}
    if isinstance(same.get("teacher"), dict):
        same["teacher"] = {k: v for k, v in same["teacher"].items() if k != "checkpoint"}
    return same


def finalise_run(
    run_url: str,
    config: Config,
    plan: list[ShardTask],
    teacher_digest: str,
    options: dict[str, Any] | None,
    metadata: Any = None,
) -> dict[str, Any]:
    """Index, preview, wids index, dataset card and manifest (last: the manifest marks
    the run as complete).

    ``metadata`` (a :class:`pipeline.stages.metadata.Metadata`) is summarised when the run used one.
    """
    sidecars = [Sidecar.read(run_url, task.name, options) for task in plan]
    write_index(join(run_url, "index.parquet"), sidecars, config, options)
    preview = write_preview(run_url, sidecars, config, options)  # bounded in classes
    classes: Counter = Counter()
    for sidecar in sidecars:
        classes.update({int(k): v for k, v in sidecar.classes.items()})
    totals = {
        "images": sum(s.samples for s in sidecars),
        "planned": sum(s.planned or 0 for s in sidecars),
        "rejected": sum(s.rejected or 0 for s in sidecars),
        "synthesized": sum(s.synthesized or 0 for s in sidecars),
        "seconds": round(sum(s.seconds for s in sidecars), 3),
        "classes": {str(k): classes[k] for k in sorted(classes)},
        "per_class": per_class_totals(sidecars),
    }
    failing = {k: v for k, v in totals["per_class"].items() if v["missing"]}
    if failing:
        totals["failing_classes"] = failing
    manifest = {
        "run_url": run_url,
        "config": resolved_config(config),
        "teacher_digest": teacher_digest,
        "dreamshard_version": pipeline.__version__,
        "python": platform.python_version(),
        "shards": shard_entries(run_url, sidecars),
        "shard_pattern": shard_pattern(run_url, [s.shard for s in sidecars]),
        "wids_index": join(run_url, WIDS_INDEX_NAME),
        "totals": totals,
        "preview": preview,
    }
    if metadata is not None:
        info = metadata.info
        manifest["metadata"] = {
            "url": metadata.url,
            **{k: info.get(k) for k in ("scenario", "source", "source_digest", "images", "used")},
            "dropped": info.get("dropped", {}),
        }
    write_card_and_index(run_url, manifest, options)
    write_json(join(run_url, "manifest.json"), manifest, options)
    return manifest


def shard_entries(run_url: str, sidecars: list[Sidecar]) -> list[dict[str, Any]]:
    """The manifest's shard list: name, URL, sample count and sha256 from each sidecar."""
    return [
        {
            "name": s.shard,
            "url": shard_url(run_url, s.shard),
            "samples": s.samples,
            "sha256": s.sha256,
        }
        for s in sidecars
    ]


def per_class_totals(sidecars: list[Sidecar]) -> dict[str, dict[str, Any]]:
    """Per class over the shards: slots planned, written, missing; the filter's accept rate."""
    totals: dict[str, Counter] = {}
    for sidecar in sidecars:
        for label, entry in (sidecar.per_class or {}).items():
            totals.setdefault(label, Counter()).update(entry)
    result: dict[str, dict[str, Any]] = {}
    for label in sorted(totals, key=int):
        entry = dict(totals[label])
        entry["accept_rate"] = round(entry["passed"] / max(entry["synthesized"], 1), 4)
        result[label] = entry
    return result


def write_index(
    url: str, sidecars: list[Sidecar], config: Config, options: dict[str, Any] | None
) -> None:
    """One row per sample: key, shard, label, teacher confidence, synthesizer, seed."""
    rows = [
        (key, s.shard, label, confidence, seed)
        for s in sidecars
        for key, label, confidence, seed in s.index
    ]
    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "shard": pa.array([r[1] for r in rows], pa.string()),
            "label": pa.array([r[2] for r in rows], pa.int32()),
            "confidence": pa.array([r[3] for r in rows], pa.float32()),
            "synthesizer": pa.array([config.synthesizer.name] * len(rows), pa.string()),
            "seed": pa.array([r[4] for r in rows], pa.uint64()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with atomic_open(url, options) as f:
        f.write(buffer.getvalue())


def inspect_run(
    url: str, options: dict[str, Any] | None = None, verify: bool = False
) -> dict[str, Any]:
    """Manifest, totals and completeness of a run folder (or its manifest.json URL)."""
    run_url = url.removesuffix("/manifest.json").rstrip("/")
    if not exists(join(run_url, "run.json"), options):
        raise InputError(f"{url}: not a dreamshard run (no run.json)")
    record = read_json(join(run_url, "run.json"), options)
    plan = make_plan(parse_config(_plain(record["config"])))
    files = listing(run_url, options)  # one listing: completeness and sizes
    done = complete(files)
    missing = [t.name for t in plan if t.name not in done]
    report: dict[str, Any] = {
        "run_url": run_url,
        "shards_planned": len(plan),
        "shards_complete": len(plan) - len(missing),
        "missing": missing,
        "finalised": exists(join(run_url, "manifest.json"), options),
        "complete": not missing,
    }
    if report["finalised"]:
        report["totals"] = read_json(join(run_url, "manifest.json"), options)["totals"]
    damaged = damaged_shards(run_url, options, verify, files)  # sizes; sha256 with verify
    report["corrupt"] = [t.name for t in plan if t.name in damaged]
    report["damage"] = {name: damaged[name] for name in report["corrupt"]}
    return report


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config back into parseable form (redacted options are not needed)."""
    config = {k: dict(v) for k, v in config.items()}
    config["run"]["storage_options"] = {}
    return config
