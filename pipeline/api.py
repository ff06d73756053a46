"""dreamshard from Python: what the command line does, as functions.

```python
from pipeline import api

manifest = api.run("configs/demo.yaml", ["plan.num_images=64"])  # the whole task graph
report = api.inspect(manifest["run_url"])                         # totals, completeness
for image, label in api.open_shards(manifest["run_url"]).decode("torchrgb").to_tuple("png", "cls"):
    ...
```

A config is a YAML path (with ``--set``-style overrides) or a :class:`pipeline.config.Config`.
Bad input raises :class:`pipeline.errors.InputError` naming the field, file or URL, before
anything is written. Importing this module is cheap: each function imports the stages
(torch, Ray) it needs when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.io.storage import absolute, exists, join, read_json

if TYPE_CHECKING:
    from webdataset import FluidWrapper

    from pipeline.config import Config

__all__ = ["inspect", "load", "metadata", "open_shards", "retrieve", "run"]


def load(config: str | Path | Config, overrides: Sequence[str] = ()) -> Config:
    """A validated, resolved config from a YAML path or a ``Config``, with ``key.path=value``
    overrides applied."""
    from pipeline.config import apply_override, load_config, parse_config, resolve

    if isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    if overrides:
        data = config.to_dict()
        for override in overrides:
            apply_override(data, override)
        config = parse_config(data)
    return resolve(config)


def run(
    config: str | Path | Config, overrides: Sequence[str] = (), dry_run: bool = False
) -> dict[str, Any]:
    """Run the whole task graph; returns the manifest (``this_run`` says what this call
    did). ``dry_run``: validate and return ``{"config", "teacher_digest", "plan"}``
    instead, writing nothing and starting no Ray."""
    config = load(config, overrides)
    if dry_run:
        from pipeline.stages.dry_run import dry_run as describe

        return describe(config)
    from pipeline.graph import run_job

    return run_job(config)


def metadata(config: str | Path | Config, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The metadata stage alone: computes (or reuses) the per-class feature statistics;
    returns the artifact's URL and description."""
    from pipeline.io.storage import check_writable
    from pipeline.models.teachers import load_teacher
    from pipeline.stages.metadata import ensure_metadata

    config = load(config, overrides)
    if not config.metadata.configured:
        raise InputError("metadata.source (or metadata.artifact) is not set in the config")
    options = config.run.storage_options
    check_writable(config.run.output, options)
    artifact = ensure_metadata(config, load_teacher(config.teacher, options))
    info = {k: v for k, v in artifact.info.items() if k != "seeds"}
    return {"artifact": artifact.url, **info}


def retrieve(config: str | Path | Config, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The retrieval stage alone (the config's ``retrieval`` section); returns its manifest."""
    from pipeline.stages.retrieval import run_retrieval

    return run_retrieval(load(config, overrides))


def inspect(
    url: str,
    storage_options: dict[str, Any] | None = None,
    verify: bool = False,
    repair: bool = False,
) -> dict[str, Any]:
    """A run folder's (or its manifest.json's) plan, completeness, missing and damaged
    shards and totals; ``verify`` also checks every tar against its sidecar's sha256;
    ``repair`` (which implies ``verify``) first regenerates the missing and damaged shards
    from the run's ``run.json`` and lists them under ``repaired``."""
    from pipeline.stages.manifest import inspect_run

    repaired = None
    if repair:
        from pipeline.graph import run_job
        from pipeline.stages.repair import recorded_config

        repaired = run_job(recorded_config(url, storage_options))["this_run"]["written"]
    report = inspect_run(url, storage_options, verify=verify and not repair)
    if repaired is not None:
        report["repaired"] = repaired  # damaged or missing before, regenerated now
    return report


def open_shards(url: str, storage_options: dict[str, Any] | None = None) -> FluidWrapper:
    """A ``webdataset`` pipeline over a run's complete shards, in shard order.

    ``url``: a run folder (``OUTPUT/RUN``, local or ``s3://``) or its ``manifest.json``.
    A finished run gives the manifest's shards; an unfinished one the shards that have
    their sidecar (a tar without one is not complete). ``storage_options`` are fsspec's
    (``endpoint_url``, ``key``, ``secret`` …; else the AWS environment), used for these
    shards only. Samples are raw (``png`` bytes …): chain ``.decode("torchrgb")``,
    ``.to_tuple("png", "cls")``, ``.shuffle(1000)`` as with ``webdataset.WebDataset``.
    """
    import webdataset as wds

    from pipeline.io.shards import completed_shards
    from pipeline.io.storage import FsspecOpener

    run_url = absolute(url.removesuffix("/manifest.json").rstrip("/"))
    if exists(join(run_url, "manifest.json"), storage_options):
        names = [
            s["name"] for s in read_json(join(run_url, "manifest.json"), storage_options)["shards"]
        ]
    elif exists(join(run_url, "run.json"), storage_options):
        names = sorted(completed_shards(run_url, storage_options))
    else:
        raise InputError(f"{url}: not a dreamshard run (no run.json)")
    if not names:
        raise InputError(f"{url}: the run has no complete shard yet")
    urls = [join(run_url, "shards", f"{name}.tar") for name in names]
    opener = FsspecOpener(storage_options)
    dataset = wds.FluidWrapper(wds.SimpleShardList(urls))
    dataset.append(opener.streams)
    dataset.append(wds.tariterators.tar_file_expander)
    dataset.append(wds.tariterators.group_by_keys)
    return dataset
