"""The quality ladder at several N: does the gap to real close with more images, and how
many real images is a row's set worth?

Reads ladder results files written at different ``--images`` (each with its own
``--work``), e.g.

    python benchmarks/quality_ladder.py --images 520 --seeds 4 --rows real \\
        --work outputs/ladder-n520 --results benchmarks/results/quality-ladder-n520.json
    python benchmarks/ladder_scaling.py benchmarks/results/quality-ladder-n*.json \\
        benchmarks/results/quality-ladder.json --out benchmarks/results/quality-ladder-scaling

and writes, per N and row: KD top-1 mean and standard deviation over its seeds, the
fraction of real at that N, and the row's worth in real images: the N at which the real
row's mean (linear in log N between measured points) equals the row's mean; outside the
measured range it is given as a bound. Nothing is retrained.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SAME = ("teacher", "student", "epochs", "batch_size", "iterations", "statistics_per_class")


def shared_protocol(paths: list[Path]) -> dict[str, Any]:
    """The protocol fields (:data:`SAME`) every file must share: only N may differ."""
    protocols = [json.loads(p.read_text())["protocol"] for p in paths]
    first = {k: protocols[0].get(k) for k in SAME}
    for path, protocol in zip(paths[1:], protocols[1:], strict=True):
        for key in SAME:
            if protocol.get(key) != first[key]:
                raise SystemExit(
                    f"{path}: {key} {protocol.get(key)!r} differs from {paths[0]}'s "
                    f"{first[key]!r}; only N may differ"
                )
    return first


def curves(paths: list[Path]) -> dict[str, dict[int, list[float]]]:
    """Per row (its name without N), per N: the final KD top-1 of each seed."""
    rows: dict[str, dict[int, list[float]]] = {}
    for path in paths:
        record = json.loads(path.read_text())
        images = int(record["protocol"]["images"])
        for name, row in record["rows"].items():
            if row.get("kd_top1"):
                if images in rows.get(name, {}):
                    raise SystemExit(f"{path}: {name} at N = {images} is in two files")
                rows.setdefault(name, {})[images] = list(row["kd_top1"])
    if "real" not in rows:
        raise SystemExit("no file has a real row with KD results")
    return rows


def real_worth(real: dict[int, float], value: float) -> str:
    """The real N whose mean KD top-1 equals ``value`` (linear in log N between the
    measured points; a bound outside them)."""
    points = sorted(real.items())
    if value < points[0][1]:
        return f"< {points[0][0]}"
    if value > points[-1][1]:
        return f"> {points[-1][0]}"
    for (n0, a0), (n1, a1) in itertools.pairwise(points):
        if a0 <= value <= a1 and a1 > a0:
            t = (value - a0) / (a1 - a0)
            return str(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))))
    return "–"  # real's means do not rise monotonically around this value


def summary(rows: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
    real = {n: float(np.mean(v)) for n, v in rows["real"].items()}
    out = []
    for name, by_n in rows.items():
        for n, values in sorted(by_n.items()):
            mean = float(np.mean(values))
            out.append(
                {
                    "row": name,
                    "images": n,
                    "kd_top1": values,
                    "mean": round(mean, 4),
                    "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
                    "fraction_of_real": round(mean / real[n], 3) if n in real else None,
                    "worth_real_images": None if name == "real" else real_worth(real, mean),
                }
            )
    return out


def markdown(entries: list[dict[str, Any]], sources: list[Path], protocol: dict) -> str:
    lines = [
        "# Quality ladder at several N",
        "",
        "From " + ", ".join(f"`{p.name}`" for p in sources) + " (same protocol, only N "
        f"differs: KD {protocol['epochs']} epochs; synthetic rows always use the statistics "
        f"of {protocol['statistics_per_class']} training images per class). Worth: the real "
        "N with the same mean KD top-1, linear in log N between the real row's measured "
        "points.",
        "",
        "| row | N | KD top-1 per seed | mean | sd | fraction of real | worth (real images) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for e in entries:
        seeds = ", ".join(f"{100 * v:.1f}%" for v in e["kd_top1"])
        sd = "–" if e["sd"] is None else f"{100 * e['sd']:.1f}"
        fraction = "–" if e["fraction_of_real"] is None else f"{e['fraction_of_real']:.2f}"
        lines.append(
            f"| {e['row']} | {e['images']} | {seeds} | {100 * e['mean']:.1f}% | {sd} "
            f"| {fraction} | {e['worth_real_images'] or '–'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="ladder results files")
    parser.add_argument("--out", type=Path, required=True, help="path stem for .json and .md")
    args = parser.parse_args()
    protocol = shared_protocol(args.results)
    entries = summary(curves(args.results))
    args.out.with_suffix(".json").write_text(json.dumps(entries, indent=2) + "\n")
    text = markdown(entries, args.results, protocol)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
