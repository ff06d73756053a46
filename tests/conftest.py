"""Shared fixtures: a tiny real teacher checkpoint, config factories, a local Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tests_support import config_dict

# Ray on this machine: no usage reporting, no token auth, stay on loopback.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"

pytest_plugins = ["seaweed"]


def shared(path: Path) -> Path:
    """A file from ../shared; CI always has it, elsewhere the test is skipped."""
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must have ../shared")
        pytest.skip(f"{path} is not available here")
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ResNet-20 with seeded random weights and non-trivial BN statistics, saved as a
    dreamshard checkpoint (small and fast: the real thing, untrained)."""
    import torch

    from pipeline.config import TeacherConfig
    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import save_checkpoint

    torch.manual_seed(0)
    model = build_architecture("resnet20", 10)
    model.train()
    with torch.no_grad():  # a few forward passes give the BN layers running statistics
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32))
    path = tmp_path_factory.mktemp("teacher") / "resnet20-random.pt"
    save_checkpoint(model.eval(), TeacherConfig(checkpoint=str(path)), str(path))
    return str(path)


@pytest.fixture
def make_config(teacher_checkpoint: str, tmp_path: Path):
    """``make_config(**sections)`` -> a validated Config writing under tmp_path."""
    from pipeline.config import parse_config

    def make(**sections: dict[str, Any]):
        return parse_config(config_dict(str(tmp_path / "out"), teacher_checkpoint, **sections))

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the session (2 CPUs, no dashboard, on loopback, in its own
    temp dir: other Rays on this machine are left alone)."""
    ray = pytest.importorskip("ray")
    from pipeline.execution.executor import start_local_ray

    temp = tempfile.mkdtemp(prefix="test-ray-", dir="/tmp")
    if not ray.is_initialized():
        start_local_ray(ray, _temp_dir=temp, num_cpus=2)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
