"""The demo's quality: do networks this project never trained recognise its images?

Runs ``dreamshard run`` on a config (the demo's by default) as a user would, timed wall
clock from the command's start to its exit, then classifies every stored image with the
shared pretrained CIFAR-10 ResNet-56 and ResNet-20 (trained elsewhere, on lossless
CIFAR-10) and reports how often each agrees with the image's label. For a method that
needs statistics, the metadata artifact is collected first (timed apart: the demo ships
its artifact) from ``--metadata-per-class`` CIFAR-10 (JPEG) training images per class.

One row per ``--name``; rows already in the results file are kept (the benchmark
resumes), a row of the same name is replaced::

    python benchmarks/demo_quality.py --name cc-demo-teacher \
        --set synthesizer.name=class-conditional [--teacher models/demo-resnet20.pt]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from common import CIFAR, RESNET20, RESNET56, ROOT, cpu_name
from PIL import Image

from pipeline.config import TeacherConfig, load_config
from pipeline.models.accuracy import normalise
from pipeline.models.teachers import load_teacher
from pipeline.stages.metadata import ensure_metadata

JUDGES = {"resnet56": RESNET56, "resnet20": RESNET20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the row's name")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--teacher", help="a teacher checkpoint (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--metadata-per-class", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="demo-quality-"))
    overrides = [*args.overrides, f"run.output={work / 'out'}", "run.name=demo"]
    if args.teacher:
        overrides.append(f"teacher.checkpoint={Path(args.teacher).resolve()}")
    config = load_config(args.config, overrides)
    metadata_seconds = None
    if config.synthesizer.name in ("class-conditional", "impression"):
        if not config.metadata.configured:
            overrides += [
                f"metadata.source={CIFAR}/cifar10-jpeg/train",
                f"metadata.max_per_class={args.metadata_per_class}",
            ]
            config = load_config(args.config, overrides)
        start = time.perf_counter()
        ensure_metadata(config, load_teacher(config.teacher))
        metadata_seconds = round(time.perf_counter() - start, 1)
    command = [sys.executable, "-m", "pipeline.cli", "run", args.config]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=os.environ)
    wall = round(time.perf_counter() - start, 1)
    run_url = work / "out" / "demo"
    images, labels = read_run(run_url)
    manifest = json.loads((run_url / "manifest.json").read_text())
    row = {
        "name": args.name,
        "teacher": str(config.teacher.checkpoint),
        "synthesizer": manifest["config"]["synthesizer"],
        "images": len(labels),
        "synthesized": manifest["totals"]["synthesized"],
        "accept_rate": round(len(labels) / max(manifest["totals"]["synthesized"], 1), 4),
        "run_wall_seconds": wall,
        "metadata_seconds": metadata_seconds,
        "agreement": {name: agreement(path, images, labels) for name, path in JUDGES.items()},
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg()[0],
    }
    (Path(args.out) / f"cpu-demo-quality-{args.name}.png").write_bytes(
        (run_url / "preview.png").read_bytes()
    )
    save(Path(args.out) / "cpu-demo-quality.json", row)
    print(json.dumps(row, indent=2))


def read_run(run_url: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored image, uint8 (N, 3, H, W), and its label."""
    urls = sorted(str(p) for p in (run_url / "shards").glob("*.tar"))
    images, labels = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        labels.append(int(sample["cls"]))
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def agreement(checkpoint: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """How often a network this project never trained puts an image in its label."""
    arch = "resnet56" if "resnet56" in checkpoint.name else "resnet20"
    judge = load_teacher(TeacherConfig(arch=arch, checkpoint=str(checkpoint)))
    mean, std = judge.config.mean, judge.config.std
    predicted = torch.cat(
        [judge.model(normalise(batch, mean, std)).argmax(1) for batch in images.split(256)]
    )
    return round((predicted == labels).float().mean().item(), 4)


def save(path: Path, row: dict) -> None:
    """Add (or replace) the row by name; the file keeps every other row."""
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    judges = ", ".join(f"the shared pretrained {name}" for name in JUDGES)
    record = {
        "what": f"agreement of {judges} (CIFAR-10, trained elsewhere) with the demo's labels",
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
