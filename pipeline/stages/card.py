"""What a finished run folder tells a reader who has no dreamshard: a dataset card
(``README.md``), a ``wids`` shard index (``wids-index.json``) and a brace pattern of the
shard URLs (in the manifest). Written by :func:`pipeline.stages.manifest.finalise_run`
before the manifest, which marks the run as complete.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.io.storage import atomic_open, join, protocol_of, write_json

CARD_NAME = "README.md"
WIDS_INDEX_NAME = "wids-index.json"
MAX_TABLE_CLASSES = 32  # rows of the per-class table; every class is in the manifest


def shard_pattern(run_url: str, names: list[str]) -> str | None:
    """One brace pattern for the shards, ``{run}/shards/train-{000000..000003}.tar``
    (webdataset and wids expand it), or None when the names are not one split with
    consecutive indices."""
    if not names:
        return None
    split = names[0].rsplit("-", 1)[0]
    indices = [int(name.rsplit("-", 1)[1]) for name in names]
    same_split = all(name.rsplit("-", 1)[0] == split for name in names)
    if not same_split or indices != list(range(indices[0], indices[0] + len(indices))):
        return None
    if len(indices) == 1:
        return join(run_url, "shards", f"{names[0]}.tar")
    first, last = indices[0], indices[-1]
    return join(run_url, "shards", f"{split}-{{{first:06d}..{last:06d}}}.tar")


def wids_index(name: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``wids-shard-index-v1`` description (``wids.ShardListDataset(url)`` opens it):
    shard URLs relative to the index's folder (the run folder), so a copied or moved run
    keeps a valid index, and each shard's sample count."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [
            {"url": f"shards/{shard['name']}.tar", "nsamples": shard["samples"]} for shard in shards
        ],
    }


def write_card_and_index(
    run_url: str, manifest: dict[str, Any], options: dict[str, Any] | None
) -> None:
    """Write ``wids-index.json`` and ``README.md`` into the run folder."""
    name = manifest["config"]["run"]["name"]
    write_json(join(run_url, WIDS_INDEX_NAME), wids_index(name, manifest["shards"]), options)
    with atomic_open(join(run_url, CARD_NAME), options) as f:
        f.write(dataset_card(manifest).encode())


def dataset_card(manifest: dict[str, Any]) -> str:
    """The run's ``README.md``: what it is, how it was made, how to load it."""
    config, totals = manifest["config"], manifest["totals"]
    teacher, synthesizer = config["teacher"], dict(config["synthesizer"])
    method = synthesizer.pop("name")
    accept = totals["images"] / max(totals["synthesized"], 1)
    lines = [
        f"# {config['run']['name']}",
        "",
        f"Synthetic images made by inverting a `{teacher['arch']}` teacher with "
        f"`{method}` (dreamshard {manifest['dreamshard_version']}). WebDataset shards: each "
        "sample has `png` (RGB), `cls` (class index), `json` (teacher label and confidence, "
        "seed, final losses) and optionally `logits.npy` (teacher logits, float16).",
        "",
        preview_line(manifest.get("preview")),
        "",
        "## Teacher",
        "",
        f"- architecture `{teacher['arch']}`, {teacher['num_classes']} classes, "
        f"{teacher['image_size']}×{teacher['image_size']} pixels",
        f"- digest `{manifest['teacher_digest']}`",
        f"- input normalisation: mean {teacher['mean']}, std {teacher['std']}",
        "",
        "## Method and settings",
        "",
        f"`{method}`; the filter keeps confidence ≥ {config['filter']['min_confidence']} "
        f"with argmax = target (enabled: {str(config['filter']['enabled']).lower()}, "
        f"attempts per batch: {config['filter']['max_attempts']}); run seed "
        f"{config['run']['seed']}.",
        "",
        "```yaml",
        yaml.safe_dump(
            {"synthesizer": synthesizer, "plan": config["plan"]},
            sort_keys=False,
            default_flow_style=None,  # lists on one line
        ).rstrip(),
        "```",
        "",
        "## Totals",
        "",
        f"{totals['images']} images in {len(manifest['shards'])} shards; "
        f"{totals['synthesized']} synthesized, {accept:.1%} accepted; "
        f"{totals['seconds']:.0f} s of worker time.",
        "",
        *per_class_table(totals),
        "",
        "## Loading",
        "",
        *loading_examples(manifest),
    ]
    return "\n".join(lines) + "\n"


def preview_line(preview: dict[str, Any] | None) -> str:
    """The preview image, saying which classes it shows when it does not show them all."""
    if preview and len(preview["classes"]) < preview["classes_total"]:
        return (
            f"![preview: {len(preview['classes'])} of the {preview['classes_total']} classes "
            "(the first that have images), one row each](preview.png)"
        )
    return "![preview: one row per class](preview.png)"


def per_class_table(totals: dict[str, Any]) -> list[str]:
    """Images per class and the filter's accept rate: every class with planned slots, or
    past :data:`MAX_TABLE_CLASSES` a summary and the classes with the lowest accept rate."""
    per_class = totals.get("per_class") or {}
    images = {label: totals["classes"].get(label, 0) for label in per_class}
    images.update(totals["classes"])  # a sidecar without per-class entries
    labels = sorted(images, key=int)
    rows = ["| class | images | synthesized | accept rate |", "| --- | --- | --- | --- |"]
    intro: list[str] = []
    if len(labels) > MAX_TABLE_CLASSES:
        rates = [per_class[k]["accept_rate"] for k in labels if k in per_class]
        counts = sorted(images.values())
        intro = [
            f"{len(labels)} classes: {counts[0]}–{counts[-1]} images per class (median "
            f"{counts[len(counts) // 2]})"
            + (f", accept rate {min(rates):.1%}–{max(rates):.1%}" if rates else "")
            + f". The {MAX_TABLE_CLASSES} classes with the lowest accept rate (then the "
            "fewest images) are listed; `manifest.json` (`totals.per_class`) has every class.",
            "",
        ]
        labels = sorted(
            labels, key=lambda k: (per_class.get(k, {}).get("accept_rate", 1.0), images[k], int(k))
        )[:MAX_TABLE_CLASSES]
    for label in labels:
        entry = per_class.get(label, {})
        rate = entry.get("accept_rate")
        rate_text = f"{rate:.1%}" if rate is not None else "–"
        rows.append(
            f"| {label} | {images[label]} | {entry.get('synthesized', '–')} | {rate_text} |"
        )
    return intro + rows


def loading_examples(manifest: dict[str, Any]) -> list[str]:
    """webdataset, wids, Ray Data and the evaluation loader, with this run's URLs."""
    run_url = manifest["run_url"]
    pattern = manifest.get("shard_pattern") or join(run_url, "shards", "*.tar")
    teacher = manifest["config"]["teacher"]
    s3 = protocol_of(run_url) == "s3"
    opener = (
        [
            "from pipeline.io.storage import register_webdataset_opener",
            "",
            "register_webdataset_opener({'endpoint_url': 'http://HOST:9000'})  # s3:// URLs",
        ]
        if s3
        else []
    )
    filesystem = (
        [
            "from pyarrow import fs",
            "",
            "s3 = fs.S3FileSystem(endpoint_override='HOST:9000', scheme='http')  # or AWS defaults",
        ]
        if s3
        else []
    )
    shards_path = join(run_url, "shards").removeprefix("s3://") if s3 else join(run_url, "shards")
    ray_args = ", filesystem=s3" if s3 else ""
    return [
        "With `webdataset` (the brace pattern expands to every shard):",
        "",
        "```python",
        "import webdataset as wds",
        *opener,
        "",
        f'dataset = wds.WebDataset("{pattern}", shardshuffle=False)',
        'dataset = dataset.decode("torchrgb").to_tuple("png", "cls")',
        "```",
        "",
        f"With `wids` (random access; `{WIDS_INDEX_NAME}` lists the shards relative to this "
        "folder and their sample counts"
        + (
            "; wids fetches s3:// files with the `aws` command line, which reads `AWS_ENDPOINT_URL`"
            if s3
            else ""
        )
        + "):",
        "",
        "```python",
        "import wids",
        "",
        f'dataset = wids.ShardListDataset("{join(run_url, WIDS_INDEX_NAME)}")',
        "sample = dataset[0]  # {'__key__': ..., '.png': PIL image, '.cls': ..., ...}",
        "```",
        "",
        "With Ray Data:",
        "",
        "```python",
        "import ray",
        *filesystem,
        "",
        f'dataset = ray.data.read_webdataset("{shards_path}", file_extensions=["tar"]{ray_args})',
        "```",
        "",
        "With dreamshard's evaluation loader (checks every tar against its sha256):",
        "",
        "```python",
        "from evaluation.loader import ShardDataset, resolve_shards",
        "",
        f'shards = resolve_shards("{run_url}")',
        f"dataset = ShardDataset(shards.shards, mean={tuple(teacher['mean'])}, "
        f"std={tuple(teacher['std'])}, logits=True)",
        "```",
        "",
        "Or `dreamshard eval kd CONFIG` with `data.shards` set to this folder.",
    ]
