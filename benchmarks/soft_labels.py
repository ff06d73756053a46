"""What the teacher says about each quality-ladder row's images: why a student learns less
from synthetic images than from real ones at equal N.

KD teaches the student the teacher's whole output distribution (at T = 5), not only the
label. This benchmark reads every finished ladder row's shards (run
``quality_ladder.py`` first; nothing is synthesised here) and runs the ladder's teacher
on the stored images, unaugmented. Per row:

* ``teacher_agreement``: the share of images whose label is the teacher's argmax (the
  ``noise`` row is labelled by the teacher, so 1 by construction);
* ``confidence``: the teacher's mean probability of the label (T = 1);
* ``entropy_t5``: the mean entropy of its T = 5 distribution, as a fraction of log 10
  (how much the KD target says beyond the label);
* ``dark_knowledge_js``: for each class, the teacher's mean T = 5 distribution over the
  *other* nine classes on that class's images, compared with the same on the real row's
  images by Jensen–Shannon divergence (bits), averaged over classes: 0 means the images
  carry the class-similarity structure (cat near dog) that real images do;
* ``feature_spread``: the mean within-class cosine distance of the teacher's penultimate
  features, relative to the real row's (diversity as the teacher sees it).

The last column is the row's mean KD top-1 from the ladder; the Spearman rank
correlation of each measure with it over the method rows is printed and stored.

    python benchmarks/soft_labels.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import cpu_name
from quality_ladder import TEACHER, run_folder

from evaluation.fidelity import logits_and_features
from evaluation.loader import load_all
from evaluation.sources import resolve_shards
from pipeline.config import TeacherConfig
from pipeline.models.teachers import load_teacher

MEASURES = ["teacher_agreement", "confidence", "entropy_t5", "dark_knowledge_js", "feature_spread"]


def other_classes(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per class: the mean distribution over the nine other classes, renormalised (10, 10);
    NaN rows for a class without images."""
    table = torch.full((10, 10), float("nan"), dtype=torch.float64)
    for c in range(10):
        if not (labels == c).any():
            continue
        mean = probs[labels == c].double().mean(0)
        mean[c] = 0
        table[c] = mean / mean.sum()
    return table


def js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log2()).sum()

    return float((kl(p, m) + kl(q, m)) / 2)


def spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean within-class cosine distance (over classes with two images or more)."""
    values = []
    for c in range(10):
        unit = torch.nn.functional.normalize(features[labels == c], dim=1)
        n = len(unit)
        if n < 2:
            continue
        values.append(float(1 - (unit @ unit.T).sum().sub(n).div(n * (n - 1))))
    return float(np.mean(values))


def describe(teacher: Any, shards: str) -> tuple[dict[str, float], torch.Tensor, float]:
    images, labels = load_all(resolve_shards(shards))
    mean, std = teacher.config.mean, teacher.config.std
    logits, features = logits_and_features(teacher.model, images, mean, std)
    probs1, probs5 = logits.softmax(1), (logits / 5).softmax(1)
    entropy = -(probs5 * probs5.clamp_min(1e-12).log()).sum(1) / math.log(10)
    facts = {
        "teacher_agreement": float((logits.argmax(1) == labels).float().mean()),
        "confidence": float(probs1.gather(1, labels.view(-1, 1)).mean()),
        "entropy_t5": float(entropy.mean()),
    }
    return facts, other_classes(probs5, labels), spread(features, labels)


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ladder", default="benchmarks/results/quality-ladder.json")
    parser.add_argument("--work", default="outputs/quality-ladder")
    parser.add_argument("--results", default="benchmarks/results/cpu-soft-labels.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a side job next to the ladder
    ladder = json.loads(Path(args.ladder).read_text())["rows"]
    teacher = load_teacher(TeacherConfig(**TEACHER))
    described = {
        row: describe(teacher, f"{run_folder(row, Path(args.work))}/shards")
        for row, entry in ladder.items()
        if entry["kd_top1"]
    }
    _, real_table, real_spread = described["real"]
    rows = {}
    for row, (facts, table, feature_spread) in described.items():
        js = float(np.nanmean([js_bits(table[c], real_table[c]) for c in range(10)]))
        rows[row] = {
            **{k: round(v, 4) for k, v in facts.items()},
            "dark_knowledge_js": round(js, 4),
            "feature_spread": round(feature_spread / real_spread, 3),
            "kd_top1_mean": ladder[row]["kd_top1_mean"],
        }
    methods = [r for r in rows if r not in ("real", "noise")]
    kd = [rows[r]["kd_top1_mean"] for r in methods]
    correlation = {m: round(spearman([rows[r][m] for r in methods], kd), 2) for m in MEASURES}
    record = {
        "device": f"CPU ({cpu_name()})",
        "teacher": "resnet56 (shared CIFAR-10 checkpoint), unaugmented stored images",
        "rows": rows,
        "spearman_with_kd_over_method_rows": correlation,
    }
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    header = "| row | " + " | ".join(MEASURES) + " | KD top-1 mean |"
    lines = [header, "|---" * (len(MEASURES) + 2) + "|"]
    for row, values in rows.items():
        cells = " | ".join(str(values[m]) for m in MEASURES)
        lines.append(f"| {row} | {cells} | {100 * values['kd_top1_mean']:.1f}% |")
    lines.append(f"| Spearman with KD ({len(methods)} method rows) | ")
    lines[-1] += " | ".join(str(correlation[m]) for m in MEASURES) + " | |"
    Path(args.results).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
