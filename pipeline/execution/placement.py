"""Where a pool's actors go: GPU or CPU (``runtime.device``), the resources each asks
Ray for, and how many to ask for.

``runtime.device: auto`` is decided once, when the pool starts: GPU when the cluster has
a GPU up now, or when its autoscaler has published node types with GPUs to the GCS
(Ray's cluster config, the one Ray Data reads); otherwise CPU, from what is up now. An
autoscaler that publishes nothing (Ray 2.60's own v1 and v2 autoscalers do not) leaves
``auto`` with what is up: such a cluster, scaled to zero GPU workers, needs
``runtime.device: gpu`` (the manifests in ``deploy/`` set it).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import RuntimeConfig

log = logging.getLogger("dreamshard.placement")


def autoscaler_gpus() -> float:
    """GPUs the autoscaler could bring up, from the cluster config it published to the
    GCS; 0 when it published none (or this Ray cannot read it)."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception as error:  # a private Ray API: any failure means "not known"
        log.debug("no autoscaler cluster config: %s", error)
        return 0.0
    return float((limits or {}).get("GPU", 0) or 0)


def resolve_device(
    resources: dict[str, float], runtime: RuntimeConfig, device: str | None = None
) -> str:
    """``gpu`` or ``cpu``: ``device`` (a stage's own choice), else ``runtime.device``;
    ``auto`` is GPU when ``resources`` (the cluster's, up now) hold a worker's GPUs or the
    autoscaler can add them."""
    wanted = device or runtime.device
    if wanted != "auto":
        return wanted
    if resources.get("GPU", 0.0) >= runtime.gpus_per_worker:
        return "gpu"
    return "gpu" if autoscaler_gpus() >= runtime.gpus_per_worker else "cpu"


def actor_resources(
    resources: dict[str, float], runtime: RuntimeConfig, device: str
) -> tuple[dict[str, Any], int]:
    """Ray options of one actor on ``device`` (``gpu`` or ``cpu``) and how many actors to
    ask for: ``runtime.max_workers`` when given (those that do not fit yet wait for the
    autoscaler), else as many as ``resources`` (what is up now) hold, at least one."""
    custom = dict(runtime.resources_per_worker)
    options: dict[str, Any] = {"num_cpus": runtime.cpus_per_worker, "num_gpus": 0}
    needs = {"CPU": runtime.cpus_per_worker, **custom}
    if device == "gpu":
        options["num_gpus"] = runtime.gpus_per_worker
        needs = {"GPU": runtime.gpus_per_worker, **custom}
    if custom:
        options["resources"] = custom
    if runtime.workers:
        return options, runtime.workers
    fits = min(int(resources.get(name, 0.0) // amount) for name, amount in needs.items())
    return options, max(1, fits)
