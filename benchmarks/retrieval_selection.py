"""Data selection by impression distance, in the spirit of Impression Space's Table 2.

The pool mixes CIFAR-10 (JPEG) train images (in-domain) with out-of-domain images:
Fashion-MNIST train images (Debian's ``dataset-fashion-mnist``, grey to RGB, 28→32
pixels) and generated distractors (uniform noise, blurred noise, flat colours, stripes,
checkerboards, gradients). It is written as WebDataset shards. The labeled images are
n_l ∈ {5, 20, 100} other CIFAR-10 train images (a seeded draw from 10 per class). The
teacher is the shared CIFAR-10 ResNet-56 with ImageNet mean/std; the template layers are
its 55 convolutions (codes of 2 × 2,032 values per image with variances, Eq. 5).

Two measurements, one process:

1. Scoring pass: every pool task is streamed and encoded as the stage's workers do
   (decode, resize, bf16 autocast where the CPU has it), keeping every code; images/s
   of that pass is the scoring throughput. After each batch's encoding the same batch
   goes once more through the bare teacher (no hooks, same precision), so the cost of
   the codes is also given as a ratio measured side by side. From those codes, the
   selection of n_t images for every n_l, for global and per-class selection and for
   mean+variance (Eq. 5) and mean-only (Eq. 1) codes, against random selection (5
   seeds): precision (fraction of the selected images that are CIFAR-10) and class
   balance (the true classes of the selected CIFAR-10 images: fewest, most, entropy /
   log 10).
2. The stage end to end (``run_retrieval``, inline executor: scoring pass, re-read,
   teacher labels, shards, manifest) for n_l = 20, global: wall time, pool images/s,
   and whether its selection equals the one computed in pass 1.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    python benchmarks/retrieval_selection.py --threads 1 \
        --json benchmarks/results/cpu-retrieval-selection.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import random
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import CIFAR, RESNET56
from PIL import Image, ImageFilter

from pipeline.config import parse_config
from pipeline.io.pool import list_pool
from pipeline.stages.retrieval import labeled_images, run_retrieval, split_quota, target_codes
from pipeline.stages.retrieval_worker import PoolWorker
from synthesizers.impression import distance, encode, flatten

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def cifar_train(rng: random.Random) -> dict[str, list[tuple[str, bytes]]]:
    """Every CIFAR-10 (JPEG) train image as (file name, bytes), by class, shuffled."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] == "train":
                by_class.setdefault(parts[2], []).append((parts[3], tar.extractfile(member).read()))
    for files in by_class.values():
        rng.shuffle(files)
    return by_class


def fashion(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    with gzip.open(FASHION) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    chosen = rng.choice(len(data), count, replace=False)
    images = []
    for index in chosen:
        grey = Image.fromarray(data[index]).resize((32, 32), Image.BILINEAR)
        images.append(np.asarray(grey.convert("RGB")))
    return images


def generated(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    images = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        elif kind == 1:
            noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)))
        elif kind == 2:
            image = np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8)
        elif kind == 3:
            image = np.zeros((32, 32, 3), np.uint8)
            image[:, :: int(rng.integers(2, 8))] = rng.integers(0, 256, 3)
        elif kind == 4:
            cell = int(rng.integers(2, 9))
            grid = (np.indices((32, 32)) // cell).sum(0) % 2
            image = (grid[..., None] * rng.integers(0, 256, 3)).astype(np.uint8)
        else:
            ramp = np.linspace(0, 1, 32)[None, :, None]
            image = ramp * rng.integers(0, 256, 3) + (1 - ramp) * rng.integers(0, 256, 3)
            image = np.broadcast_to(image, (32, 32, 3)).astype(np.uint8)
        images.append(image)
    return images


def write_pool(root: Path, items: list[tuple[str, bytes, str]], shard_size: int) -> None:
    """WebDataset shards of (key, bytes, extension), in a seeded shuffled order."""
    root.mkdir(parents=True)
    for shard, start in enumerate(range(0, len(items), shard_size)):
        with tarfile.open(root / f"pool-{shard:06d}.tar", "w") as tar:
            for key, data, extension in items[start : start + shard_size]:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def build(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], Path, Path]:
    """The pool shards, the labeled folder, and each pool key's truth ("cifar:<class>",
    "fashion", "generated")."""
    rng, nprng = random.Random(args.seed), np.random.default_rng(args.seed)
    by_class = cifar_train(rng)
    labeled = work / "labeled"
    items, truth = [], {}
    per_class = args.pool_cifar // len(by_class)
    for name, files in sorted(by_class.items()):
        (labeled / name).mkdir(parents=True)
        for file, data in files[:10]:  # the labeled draw never overlaps the pool
            (labeled / name / file).write_bytes(data)
        for file, data in files[10 : 10 + per_class]:
            key = f"cifar-{name}-{file.split('.')[0]}"
            items.append((key, data, "jpg"))
            truth[key] = f"cifar:{name}"
    for i, image in enumerate(fashion(args.pool_fashion, nprng)):
        items.append((f"fashion-{i:05d}", png(image), "png"))
        truth[f"fashion-{i:05d}"] = "fashion"
    for i, image in enumerate(generated(args.pool_generated, nprng)):
        items.append((f"generated-{i:05d}", png(image), "png"))
        truth[f"generated-{i:05d}"] = "generated"
    rng.shuffle(items)
    write_pool(work / "pool", items, args.shard_size)
    return truth, work / "pool", labeled


def config_for(work: Path, pool: Path, labeled: Path, args: argparse.Namespace, **fields: Any):
    return parse_config(
        {
            "run": {"name": "bench", "seed": args.seed, "output": str(work / "out")},
            "teacher": {"arch": "resnet56", "checkpoint": str(RESNET56)},
            "synthesizer": {"name": "impression"},
            "plan": {"shard_size": 1024},
            "runtime": {"executor": "inline", "progress": False},
            "retrieval": {
                "pool": str(pool),
                "labeled": str(labeled),
                "num_select": args.num_select,
                "batch_size": args.batch,
                **fields,
            },
        }
    )


def score_pool(config) -> tuple[list[str], torch.Tensor, torch.Tensor, dict[str, float]]:
    """Every pool image's key, flat code (Eq. 5) and its mean-only part, and seconds:
    the whole pass, reading + decoding, encoding, and (side by side, batch by batch) a
    plain forward pass of the teacher on the same batch, in the same precision."""
    worker = PoolWorker(config, "unused", torch.zeros(1, 1))
    keys, codes, means = [], [], []
    seconds = {"total": 0.0, "read_decode": 0.0, "encode": 0.0, "plain_forward": 0.0}
    start = mark = time.perf_counter()
    for task in list_pool(config.retrieval.pool):
        for _, names, images in worker.batches(task):
            seconds["read_decode"] += time.perf_counter() - mark
            x = worker.normalised(images)
            mark = time.perf_counter()
            batch, _ = encode(worker.model, x, worker.layers, len(images), worker.dtype)
            keys += [n.rsplit(".", 1)[0] for n in names]
            codes.append(flatten(batch).cpu())
            means.append(flatten(batch, mean_only=True).cpu())
            seconds["encode"] += time.perf_counter() - mark
            mark = time.perf_counter()
            with (
                torch.no_grad(),
                torch.autocast(
                    "cpu", dtype=worker.dtype or torch.float32, enabled=worker.dtype is not None
                ),
            ):
                worker.model(x)
            seconds["plain_forward"] += time.perf_counter() - mark
            mark = time.perf_counter()
    seconds["total"] = time.perf_counter() - start - seconds["plain_forward"]
    return keys, torch.cat(codes), torch.cat(means), seconds


def select(codes: torch.Tensor, targets: torch.Tensor, n: int) -> list[int]:
    """The stage's rule: global top-n, or each image to its nearest class, n split evenly."""
    d = distance(codes, targets)  # (N, T)
    if len(targets) == 1:
        return torch.argsort(d[:, 0])[:n].tolist()
    best, nearest = d.min(dim=1)
    chosen = []
    for k, quota in enumerate(split_quota(n, len(targets))):
        members = torch.nonzero(nearest == k).flatten()
        chosen += members[torch.argsort(best[members])[:quota]].tolist()
    return chosen


def quality(chosen: list[int], keys: list[str], truth: dict[str, str]) -> dict[str, Any]:
    kinds = [truth[keys[i]] for i in chosen]
    classes = [k.split(":")[1] for k in kinds if k.startswith("cifar:")]
    names = sorted({v.split(":")[1] for v in truth.values() if v.startswith("cifar:")})
    counts = [classes.count(c) for c in names]
    total = max(sum(counts), 1)
    entropy = -sum(c / total * math.log(c / total) for c in counts if c)
    return {
        "selected": len(chosen),
        "precision": round(len(classes) / max(len(chosen), 1), 4),
        "fashion": kinds.count("fashion"),
        "generated": kinds.count("generated"),
        "class_counts": dict(zip(names, counts, strict=True)),
        "class_min": min(counts),
        "class_max": max(counts),
        "class_entropy": round(entropy / math.log(len(names)), 4),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool-cifar", type=int, default=1000)
    parser.add_argument("--pool-fashion", type=int, default=600)
    parser.add_argument("--pool-generated", type=int, default=400)
    parser.add_argument("--num-select", type=int, default=500)
    parser.add_argument("--labeled", default="5,20,100")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        work = Path(tmp)
        truth, pool, labeled = build(args, work)
        config = config_for(work, pool, labeled, args)
        keys, codes, means, seconds = score_pool(config)
        result["scoring"] = {
            "images": len(keys),
            "code_size": codes.shape[1],
            "precision": str(PoolWorker(config, "unused", torch.zeros(1, 1)).dtype or "fp32"),
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "images_per_s": round(len(keys) / seconds["total"], 1),
            "encode_images_per_s": round(len(keys) / seconds["encode"], 1),
            "plain_forward_images_per_s": round(len(keys) / seconds["plain_forward"], 1),
            "encode_over_plain_forward_time": round(
                seconds["encode"] / seconds["plain_forward"], 3
            ),
        }
        print(json.dumps(result["scoring"]))
        rows = []
        for n_l in [int(n) for n in args.labeled.split(",")]:
            for selection in ("global", "per_class"):
                fields = {"labeled_total": n_l, "selection": selection}
                try:
                    cfg = config_for(work, pool, labeled, args, **fields)
                    worker = PoolWorker(cfg, "unused", torch.zeros(1, 1))
                    images, labels = labeled_images(cfg)
                except Exception as error:  # per_class with classes missing from n_l
                    rows.append({"n_l": n_l, "selection": selection, "refused": str(error)[:120]})
                    continue
                for code, pool_codes in (("mean+var", codes), ("mean", means)):
                    cfg.retrieval.mean_only = code == "mean"
                    targets = target_codes(worker.model, cfg, worker.layers, images, labels)
                    chosen = select(pool_codes, targets, args.num_select)
                    rows.append(
                        {
                            "n_l": n_l,
                            "selection": selection,
                            "code": code,
                            **quality(chosen, keys, truth),
                        }
                    )
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "class_counts"}))
        randoms = [
            quality(random.Random(s).sample(range(len(keys)), args.num_select), keys, truth)
            for s in range(5)
        ]
        rows.append(
            {
                "n_l": None,
                "selection": "random",
                "code": None,
                "precision_seeds": [r["precision"] for r in randoms],
                **randoms[0],
                "precision": round(sum(r["precision"] for r in randoms) / 5, 4),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "class_counts"}))
        result["selection"] = rows

        stage_config = config_for(work, pool, labeled, args, labeled_total=20)
        start = time.perf_counter()
        manifest = run_retrieval(stage_config)
        wall = time.perf_counter() - start
        chosen_keys = set()
        for shard in manifest["shards"]:
            with tarfile.open(shard["url"]) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        info = json.loads(tar.extractfile(member).read())
                        chosen_keys.add(info["member"].rsplit(".", 1)[0])
        worker = PoolWorker(stage_config, "unused", torch.zeros(1, 1))
        targets = target_codes(
            worker.model, stage_config, worker.layers, *labeled_images(stage_config)
        )
        expected = {keys[i] for i in select(codes, targets, args.num_select)}
        result["stage"] = {
            "n_l": 20,
            "selection": "global",
            "wall_seconds": round(wall, 2),
            "pool_images_per_s": round(manifest["totals"]["pool_scored"] / wall, 1),
            "images_written": manifest["totals"]["images"],
            "shards": len(manifest["shards"]),
            "same_selection_as_scoring_pass": len(chosen_keys & expected) / len(expected),
            "teacher_label_histogram": manifest["totals"]["classes"],
        }
        print(json.dumps(result["stage"]))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
