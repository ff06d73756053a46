"""``report.json`` and ``report.html`` next to an evaluation's output.

The HTML holds the configuration, the result tables, accuracy-per-epoch plots (PNG), a
per-class image grid of the training shards and any extra images (t-SNE) — every image
is a file in the same folder, linked by a relative name.
"""

from __future__ import annotations

import html
import io
import json
import platform
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evaluation.loader import read_shard
from pipeline.io.images import contact_sheet, decode
from pipeline.io.storage import absolute, atomic_open, filesystem, join, redact

if TYPE_CHECKING:
    from evaluation.inputs import Inputs


def write_bytes(url: str, data: bytes, options: dict[str, Any] | None) -> None:
    with atomic_open(url, options) as f:
        f.write(data)


def accuracy_plot(curves: dict[str, list[dict]]) -> bytes:
    """Test accuracy per epoch, one line per curve, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    for label, history in curves.items():
        history = [entry for entry in history if "test_accuracy" in entry]  # evaluated epochs
        epochs = [entry["epoch"] for entry in history]
        axes.plot(
            epochs, [100 * entry["test_accuracy"] for entry in history], marker="o", label=label
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel("top-1 on the real test set (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    pyplot.close(figure)
    return buffer.getvalue()


def class_grid(inputs: Inputs, per_class: int = 8, max_samples: int = 4000) -> bytes:
    """One row per class, up to ``per_class`` training images each, as PNG bytes."""
    classes = inputs.teacher_config.num_classes
    found: dict[int, list[np.ndarray]] = {c: [] for c in range(classes)}
    read = 0
    for shard in inputs.shards.shards:
        for sample in read_shard(shard, inputs.options):
            label = int(sample["cls"])
            if 0 <= label < classes and len(found[label]) < per_class:
                found[label].append(decode(sample["png"], shard.url))
            read += 1
        if read >= max_samples or all(len(v) >= per_class for v in found.values()):
            break
    rows = [found[label] for label in range(classes)]
    return contact_sheet(rows, inputs.teacher_config.image_size, per_class, scale_to=96)


def comparison_rows(inputs: Inputs, command: str, results: dict[str, Any]) -> list[dict]:
    """This evaluation next to the other runs' ``{command}`` reports under ``run.output``
    (e.g. KD on real, synthetic and noise images, each its own ``run.name``)."""
    fs, root = filesystem(absolute(inputs.config.run.output), inputs.options)
    rows = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*/{command}/report.json")):
        name = path.rstrip("/").split("/")[-3]
        if name == inputs.config.run.name:
            continue
        with fs.open(path, "rb") as f:
            other = json.load(f)
        rows.append(_comparison(name, other["config"]["data"]["shards"], other["results"]))
    rows.append(_comparison(inputs.config.run.name, inputs.config.data.shards, results))
    return rows


def _comparison(name: str, shards: str, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": name,
        "shards": shards,
        "final": results.get("final", {}).get("test_accuracy"),
        "best": results.get("best", {}).get("test_accuracy"),
    }


def write_report(
    inputs: Inputs,
    command: str,
    results: dict[str, Any],
    curves: dict[str, list[dict]],
    images: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write the plots, the grid, ``report.json`` and ``report.html`` under the output."""
    options, output = inputs.options, inputs.output
    files: dict[str, bytes] = dict(images or {})
    if curves:
        files["accuracy.png"] = accuracy_plot(curves)
    files["classes.png"] = class_grid(inputs)
    for name, data in files.items():
        write_bytes(join(output, name), data, options)
    config = inputs.config.to_dict()
    config["run"]["storage_options"] = redact(config["run"]["storage_options"])
    report = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "teacher": json.loads(json.dumps(inputs.teacher_config.__dict__, default=list)),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": "cuda" if inputs.config.runtime.use_gpu else "cpu",
            "workers": inputs.config.runtime.num_workers,
        },
        "shards": inputs.shards.summary(),  # says so when there are no checksums
        "results": results,
        "files": sorted(files),
    }
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    write_bytes(join(output, "report.json"), text.encode() + b"\n", options)
    write_bytes(join(output, "report.html"), render_html(report, inputs.classes).encode(), options)
    return report


def render_html(report: dict[str, Any], classes: list[str]) -> str:
    """A self-contained page; images are linked by their file names in the same folder."""
    results = report["results"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>dreamshard eval {html.escape(report['command'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
        f"<h1>dreamshard eval {html.escape(report['command'])}</h1>",
        f"<p>{html.escape(report['created'])} · torch {html.escape(report['environment']['torch'])}"
        f" · {report['environment']['workers']} {report['environment']['device']} worker(s)</p>",
        f"<p>shards: {report['shards']['count']} ({report['shards']['samples']} samples); "
        f"checksums: {html.escape(report['shards']['checksums'])}</p>",
        "<h2>Results</h2>",
        _table([{k: v for k, v in results.items() if _scalar(v)}]),
    ]
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts += [f"<h3>{html.escape(key)}</h3>", _table([_flat(v) for v in value])]
        elif isinstance(value, dict) and value and key != "per_class":
            parts += [f"<h3>{html.escape(key)}</h3>", _table([_flat(value)])]
    if isinstance(results.get("per_class"), dict):
        parts += ["<h3>per-class accuracy</h3>", _table([results["per_class"]])]
    for name in report["files"]:
        parts.append(f"<h2>{html.escape(name)}</h2><img src='{html.escape(name)}' alt='{name}'>")
        if name == "classes.png":
            parts.append(f"<p>rows, top to bottom: {html.escape(', '.join(classes))}</p>")
    parts += [
        "<h2>Configuration</h2><pre>",
        html.escape(json.dumps(report["config"], indent=2, default=str)),
        "</pre><p><a href='report.json'>report.json</a></p></body></html>",
    ]
    return "\n".join(parts)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if _scalar(v)})
        elif _scalar(value):
            flat[key] = value
    return flat


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(row.get(c, ''))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
