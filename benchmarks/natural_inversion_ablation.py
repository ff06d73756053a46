"""NaturalInversion's ablation (paper Table 3) at reduced scale on the shared ResNet-56.

Rows, each the same number of images, iterations, batch and seed, through ``run_job``
(inline executor, filter off, so every image is kept):

* ``deepinversion``: pixels optimised directly (lr ``--di-lr``);
* ``o2o``: NaturalInversion's generator, drawn afresh per batch, FTP and ACS off;
* ``o2o-ftp``, ``o2o-acs``: plus the Feature Transfer Pyramid, or the channel scales;
* ``o2o-ftp-acs``: all three (the method's default);
* ``shared`` (only with ``--rows``): one generator trained across batches, FTP and ACS
  off (Table 3's second row; with a single batch per row it equals ``o2o``).

NaturalInversion rows use the paper's learning rates (G 1e-3, P 5e-4, α 0.05).

Reported per row: the teacher's mean probability of the target class and the accept
rate at τ = 0.9 (confidence ≥ τ and argmax = target); the top-1 of the
independent shared ResNet-20 on the stored images; in that ResNet-20's penultimate
features (64-d), the Fréchet distance to real CIFAR-10 (JPEG) test images
(``--reference-per-class`` per class) and k-NN precision/recall (k = 3); synthesis
seconds per image; and, with ``--kd-epochs`` > 0, the test top-1 of a ResNet-20
student distilled from the teacher on the row's images (``evaluation``'s KD on Ray
Train, as ``benchmarks/kd_protocol.py``). The same statistics for as many real
*training* images as a row has give the floor that sample size allows: with 50 images
in 64 dimensions the covariance is rank-deficient and the distance is biased upwards,
so compare rows with each other and with that floor, never with the paper's Inception
FIDs; the k-NN precision and recall are less sensitive to the sample size. One
contact sheet: a row of images per method.

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/natural_inversion_ablation.py [--images 50] \
        [--batch 50] [--iterations 150] [--kd-epochs 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from class_conditional_quality import measure
from common import CIFAR, RESNET20, RESNET56, cpu_name, local_ray
from kd_protocol import distil

from evaluation.fidelity import frechet_distance, logits_and_features, precision_recall
from pipeline.config import TeacherConfig, parse_config
from pipeline.graph import run_job
from pipeline.io.images import contact_sheet, decode, open_image_folder
from pipeline.models.teachers import Teacher, load_teacher
from synthesizers import SynthesisSpec, build_synthesizer, get_synthesizer

ROWS = {
    "deepinversion": None,
    "shared": {"one_to_one": False, "ftp": False, "acs": False},
    "o2o": {"one_to_one": True, "ftp": False, "acs": False},
    "o2o-ftp": {"one_to_one": True, "ftp": True, "acs": False},
    "o2o-acs": {"one_to_one": True, "ftp": False, "acs": True},
    "o2o-ftp-acs": {"one_to_one": True, "ftp": True, "acs": True},
}
NAME = "cpu-natural-inversion-ablation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--di-lr", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--reference-per-class", type=int, default=100)
    parser.add_argument("--kd-epochs", type=int, default=10, help="0 skips KD")
    parser.add_argument("--kd-batch", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=50, help="KD test images")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers for KD")
    parser.add_argument("--rows", default="deepinversion,o2o,o2o-ftp,o2o-acs,o2o-ftp-acs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for synthesis")
    parser.add_argument("--timing-rounds", type=int, default=3, help="0 skips the timing")
    parser.add_argument("--timing-iterations", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default=NAME, help="results file name, without suffix")
    args = parser.parse_args()
    # on cores shared with other jobs, 2 threads ran 5-10x slower than 1 (OpenMP teams)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ni-bench-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_teacher(TeacherConfig(arch="resnet20", checkpoint=str(RESNET20)))
    reference = features(judge, open_image_folder(f"{CIFAR}/cifar10-jpeg/test"), args)
    per_class = max(1, args.images // 10)
    floor = features(judge, open_image_folder(f"{CIFAR}/cifar10-jpeg/train"), args, per_class)
    result = {
        "benchmark": "natural_inversion_ablation",
        "device": f"CPU, {os.cpu_count()} cores ({cpu_name()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "teacher": "resnet56 (shared CIFAR-10 checkpoint)",
        "judge": "resnet20 (shared CIFAR-10 checkpoint, independent of the teacher)",
        "settings": vars(args),
        "real_train_floor": {"images": len(floor), **distances(floor, reference)},
        "rows": [],
    }
    if args.timing_rounds:
        result["timing"] = side_by_side(args)
        print(json.dumps(result["timing"]), flush=True)
    cluster = local_ray("ni-ablation", num_cpus=2) if args.kd_epochs else contextlib.nullcontext()
    with cluster:
        rows_run(args, work, judge, reference, result, out)
    print(table(result))
    shutil.rmtree(work)


def rows_run(
    args: argparse.Namespace,
    work: Path,
    judge: Teacher,
    reference: torch.Tensor,
    result: dict,
    out: Path,
) -> None:
    """Each row: synthesise, measure, optionally distil; the table written after each."""
    sheets = []
    for row in args.rows.split(","):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        manifest = run_job(parse_config(row_config(row, args, work)))
        wall = time.perf_counter() - start
        run = work / "out" / row
        record = measure(row, run, manifest, judge, args.tau, wall)
        record.pop("metadata")
        record["load_average_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        images, labels, losses, target = stored(run)
        record["teacher_target_probability"] = target
        record.update(distances(features_of(judge, images), reference))
        record.update({f"final_{k}": round(float(np.mean(v)), 4) for k, v in losses.items()})
        if args.kd_epochs:
            kd = distil(work, row, manifest["run_url"], kd_args(args))
            record.update(kd_top1=kd["final"], kd_best=kd["best"], kd_seconds=kd["seconds"])
            result["teacher_test_top1"] = kd["teacher"]
        result["rows"].append(record)
        sheets.append(sheet_row(images, labels))
        print(json.dumps(record), flush=True)
        # after every row: a partial table survives an interruption
        write(out / args.name, result, sheets)


def row_config(row: str, args: argparse.Namespace, work: Path) -> dict:
    switches = ROWS[row]
    if switches is None:
        synthesizer = {"name": "deepinversion", "lr": args.di_lr}
    else:
        synthesizer = {"name": "natural-inversion", **switches}
    return {
        "run": {"name": row, "seed": args.seed, "output": str(work / "out")},
        "teacher": {"arch": "resnet56", "checkpoint": str(RESNET56)},
        "synthesizer": {**synthesizer, "iterations": args.iterations},
        "plan": {"num_images": args.images, "batch_size": args.batch, "shard_size": args.images},
        "filter": {"enabled": False, "max_attempts": 1},
        "runtime": {"executor": "inline", "progress": False},
    }


def side_by_side(args: argparse.Namespace) -> dict:
    """Seconds per iteration of every row at the benchmark's batch, the rows alternated
    in one process for ``timing_rounds`` rounds (the median per row, and its ratio to
    DeepInversion's), so that a change in the machine's load hits every row alike."""
    teacher = load_teacher(TeacherConfig(arch="resnet56", checkpoint=str(RESNET56)))
    shape = (3, teacher.config.image_size, teacher.config.image_size)
    labels = torch.arange(args.batch) % teacher.config.num_classes
    spec = SynthesisSpec(labels, shape, args.seed, teacher.config.mean, teacher.config.std)
    rows = args.rows.split(",")
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    for round_ in range(args.timing_rounds + 1):  # round 0 warms up and is dropped
        for row in rows:
            fields = row_config(row, args, Path("unused"))["synthesizer"]
            name = fields.pop("name")
            fields["iterations"] = args.timing_iterations
            config = get_synthesizer(name).config_class(**fields)
            synth = build_synthesizer(name, teacher.model, config)
            start = time.perf_counter()
            synth.synthesize(spec)
            if round_:
                seconds[row].append((time.perf_counter() - start) / args.timing_iterations)
    median = {row: float(np.median(values)) for row, values in seconds.items()}
    base = median.get("deepinversion")
    return {
        "batch": args.batch,
        "iterations_per_call": args.timing_iterations,
        "rounds": args.timing_rounds,
        "seconds_per_iteration": {row: round(v, 4) for row, v in median.items()},
        "ratio_to_deepinversion": {row: round(v / base, 3) for row, v in median.items()}
        if base
        else None,
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def kd_args(args: argparse.Namespace) -> argparse.Namespace:
    """What ``kd_protocol.distil`` reads."""
    return argparse.Namespace(
        seed=args.seed,
        test=args.test_per_class,
        epochs=args.kd_epochs,
        batch_size=args.kd_batch,
        workers=args.workers,
        gpu=False,
    )


def stored(run: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[float]], float]:
    """uint8 images (N, 3, H, W), labels (N,), each final loss term and the teacher's mean
    probability of the target class (from the stored logits), from the shards."""
    tars = sorted(str(p) for p in run.glob("shards/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    arrays = [decode(s["png"], s["__key__"]) for s in samples]
    images = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])
    infos = [json.loads(s["json"]) for s in samples]
    losses: dict[str, list[float]] = {}
    for info in infos:
        for name in ("ce", "bn"):
            losses.setdefault(name, []).append(info["losses"][name])
    labels = torch.tensor([info["label"] for info in infos])
    logits = torch.stack([torch.from_numpy(np.load(io.BytesIO(s["logits.npy"]))) for s in samples])
    target = torch.softmax(logits.float(), 1).gather(1, labels[:, None]).mean()
    return images, labels, losses, round(float(target), 4)


def features(judge, folder, args: argparse.Namespace, per_class: int | None = None):
    """The judge's penultimate features of ``per_class`` real images per class."""
    images, _ = folder.subset(per_class or args.reference_per_class).load()
    return features_of(judge, images)


def features_of(judge, images: torch.Tensor) -> torch.Tensor:
    spec = judge.config
    with torch.no_grad():
        _, found = logits_and_features(judge.model, images, spec.mean, spec.std)
    return found


def distances(found: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    pr = precision_recall(reference.float(), found.float(), 3)
    return {
        "frechet_resnet20": round(frechet_distance(found, reference), 3),
        "precision": round(pr["precision"], 4),
        "recall": round(pr["recall"], 4),
    }


def sheet_row(images: torch.Tensor, labels: torch.Tensor, per_class: int = 2) -> list[np.ndarray]:
    """``per_class`` images of each class, in class order, as (H, W, 3) uint8."""
    picked = []
    for label in sorted(set(labels.tolist())):
        picked += [i for i in range(len(labels)) if labels[i] == label][:per_class]
    return [images[i].permute(1, 2, 0).numpy() for i in picked]


def write(stem: Path, result: dict, sheets: list[list[np.ndarray]]) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table(result))
    columns = max(len(row) for row in sheets)
    stem.with_suffix(".png").write_bytes(contact_sheet(sheets, 32, columns, scale_to=64))


def table(result: dict) -> str:
    floor = result["real_train_floor"]
    kd = any("kd_top1" in row for row in result["rows"])
    lines = [
        "# NaturalInversion ablation (paper Table 3) at reduced scale",
        "",
        f"Device: {result['device']}; torch {result['torch']}. Teacher: {result['teacher']}; "
        f"judge: {result['judge']}. Settings: {json.dumps(result['settings'])}.",
        "",
        "| row | images | teacher p(target) | accept (τ = 0.9) "
        "| ResNet-20 top-1 | Fréchet (ResNet-20) | precision | recall | s / image "
        + ("| KD top-1 |" if kd else "|"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if kd else ""),
    ]
    for row in result["rows"]:
        line = (
            f"| {row['method']} | {row['images']} | {row['teacher_target_probability']:.3f} "
            f"| {row['accept_rate_tau']:.1%} | {row['independent_resnet20_top1']:.1%} "
            f"| {row['frechet_resnet20']:.1f} | {row['precision']:.2f} | {row['recall']:.2f} "
            f"| {row['synthesis_seconds_per_image']:.3f} |"
        )
        lines.append(line + (f" {row['kd_top1']:.1%} |" if kd else ""))
    lines.append(
        f"| real training images (floor) | {floor['images']} | | | "
        f"| {floor['frechet_resnet20']:.1f} | {floor['precision']:.2f} "
        f"| {floor['recall']:.2f} | |" + (" |" if kd else "")
    )
    if kd:
        lines += ["", f"Teacher on the KD test images: {result.get('teacher_test_top1')}."]
    timing = result.get("timing")
    if timing:
        lines += [
            "",
            f"Side by side, rows alternated in one process ({timing['rounds']} rounds of "
            f"{timing['iterations_per_call']} iterations at batch {timing['batch']}, median):",
            "",
            "| row | s / iteration | × DeepInversion |",
            "|---|---:|---:|",
        ]
        ratios = timing["ratio_to_deepinversion"] or {}
        for row, value in timing["seconds_per_iteration"].items():
            lines.append(f"| {row} | {value:.3f} | {ratios.get(row, float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
