"""The task graph end to end on a local folder: plan, shards, filter, resume, Ray."""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from tests_support import config_dict

from pipeline.config import parse_config
from pipeline.errors import InputError
from pipeline.execution.executor import RunFailed
from pipeline.graph import run_job
from pipeline.io.shards import shard_sha256
from pipeline.stages.plan import derive_seed, make_plan
from pipeline.stages.synthesis import ShardWorker


def shard_files(run: Path) -> list[Path]:
    return sorted((run / "shards").glob("*.tar"))


def test_plan_is_class_balanced_and_seeded_per_shard(make_config) -> None:
    config = make_config(
        plan={"num_images": 50, "shard_size": 20, "batch_size": 8, "classes": [2, 5, 7]}
    )
    plan = make_plan(config)
    assert [t.name for t in plan] == ["train-000000", "train-000001", "train-000002"]
    assert [len(t.labels) for t in plan] == [20, 20, 10]
    labels = [label for t in plan for label in t.labels]
    assert {c: labels.count(c) for c in (2, 5, 7)} == {2: 17, 5: 17, 7: 16}
    assert [len(b) for b in plan[0].batches()] == [8, 8, 4]
    assert plan[1].seed == derive_seed(7, 1) and len({t.seed for t in plan}) == 3
    assert make_plan(config) == plan  # a pure function of the config


def test_by_class_batching_puts_one_class_in_each_batch_and_keeps_the_balance(
    make_config,
) -> None:
    plan = {"num_images": 50, "shard_size": 20, "batch_size": 4, "classes": [2, 5, 7]}
    mixed = make_plan(make_config(plan=plan))
    by_class = make_plan(make_config(plan={**plan, "batching": "by_class"}))
    for a, b in zip(mixed, by_class, strict=True):
        assert sorted(a.labels) == list(b.labels) and a.seed == b.seed
    batches = by_class[0].batches()  # 7, 7, 6 slots of classes 2, 5, 7
    assert [len(batch) for batch in batches] == [4, 3, 4, 3, 4, 2]
    assert all(len(set(batch)) == 1 for task in by_class for batch in task.batches())
    assert by_class[0].spans()[:3] == [(0, 4), (4, 7), (7, 11)]
    with pytest.raises(InputError, match="mixed, by_class"):
        make_config(plan={"batching": "sorted"})


def test_a_by_class_run_synthesizes_single_class_batches_and_fills_every_slot(
    make_config, tmp_path: Path
) -> None:
    config = make_config(
        plan={"num_images": 24, "batch_size": 5, "shard_size": 12, "batching": "by_class"}
    )
    manifest = run_job(config)
    tars = [str(t) for t in shard_files(tmp_path / "out" / "test")]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert manifest["totals"]["images"] == len(samples) == 24
    keys = sorted(s["__key__"] for s in samples)
    assert keys == [f"{shard:06d}-{slot:05d}" for shard in (0, 1) for slot in range(12)]
    batches: dict[int, set[int]] = {}
    for sample in samples:
        info = json.loads(sample["json"])
        batches.setdefault(info["seed"], set()).add(info["label"])
    assert all(len(labels) == 1 for labels in batches.values())  # one class per batch
    assert len(batches) == 20  # 2 shards x 10 classes (1 or 2 slots of each per shard)


def test_inline_run_writes_readable_shards_manifest_index_preview(
    make_config, tmp_path: Path
) -> None:
    config = make_config()
    manifest = run_job(config)
    run = tmp_path / "out" / "test"
    tars = shard_files(run)
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar"]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(samples) == 32 == manifest["totals"]["images"]
    first = samples[0]
    assert first["__key__"] == "000000-00000"
    image = Image.open(io.BytesIO(first["png"]))
    assert image.mode == "RGB" and image.size == (32, 32)
    info = json.loads(first["json"])
    assert int(first["cls"]) == info["label"] == 0
    assert {"confidence", "synthesizer", "seed", "losses"} <= set(info)
    assert set(info["losses"]) == {"ce", "bn", "tv", "l2", "total"}
    logits = np.load(io.BytesIO(first["logits.npy"]))
    assert logits.dtype == np.float16 and logits.shape == (10,)
    for tar in tars:
        sidecar = json.loads(tar.with_suffix(".json").read_text())
        assert sidecar["sha256"] == shard_sha256(str(tar))
        assert sidecar["samples"] == 16 and sum(sidecar["classes"].values()) == 16
    index = pq.read_table(run / "index.parquet").to_pylist()
    assert [r["key"] for r in index] == [s["__key__"] for s in samples]
    assert {r["synthesizer"] for r in index} == {"deepinversion"}
    preview = Image.open(run / "preview.png")
    assert preview.size[0] > 0 and preview.size[1] > preview.size[0]  # 10 rows × 8 columns
    saved = json.loads((run / "manifest.json").read_text())
    assert saved["totals"]["classes"] == {str(c): 4 if c < 2 else 3 for c in range(10)}
    assert [s["name"] for s in saved["shards"]] == ["train-000000", "train-000001"]


def test_resume_rewrites_only_the_missing_shard(make_config, tmp_path: Path) -> None:
    config = make_config(plan={"num_images": 48})
    run_job(config)
    run = tmp_path / "out" / "test"
    before = {t.name: (t.read_bytes(), t.stat().st_mtime_ns) for t in shard_files(run)}
    victim = run / "shards" / "train-000001.tar"
    victim.unlink()
    victim.with_suffix(".json").unlink()
    run_job(config)
    after = {t.name: (t.read_bytes(), t.stat().st_mtime_ns) for t in shard_files(run)}
    assert set(after) == set(before)
    for name in ("train-000000.tar", "train-000002.tar"):
        assert after[name] == before[name]  # untouched: same bytes, same mtime
    assert after["train-000001.tar"][1] != before["train-000001.tar"][1]  # rewritten
    assert after["train-000001.tar"][0] == before["train-000001.tar"][0]  # deterministic
    # a shard without its sidecar does not exist: it is regenerated too
    (run / "shards" / "train-000002.json").unlink()
    run_job(config)
    assert (run / "shards" / "train-000002.json").exists()
    assert not list((run / "shards").glob("*.partial-*"))


def test_rerun_with_a_different_config_is_refused(make_config) -> None:
    run_job(make_config())
    with pytest.raises(InputError, match="different config .*synthesizer"):
        run_job(make_config(synthesizer={"iterations": 3}))
    run_job(make_config(runtime={"max_retries": 1}))  # runtime may change on resume


def test_a_run_recorded_before_a_new_field_resumes_with_its_default(
    make_config, tmp_path: Path
) -> None:
    """run.json written by a version without ``synthesizer.init_scale``: the field's
    default keeps that behaviour, so the run resumes; a recorded value that differs from
    today's request is still refused."""
    run_job(make_config(plan={"num_images": 16}))
    record_file = tmp_path / "out" / "test" / "run.json"
    record = json.loads(record_file.read_text())
    del record["config"]["synthesizer"]["init_scale"]
    record_file.write_text(json.dumps(record))
    manifest = run_job(make_config(plan={"num_images": 16}))
    assert manifest["this_run"]["shards_resumed"] == 1
    record["config"]["synthesizer"]["jitter"] += 1
    record_file.write_text(json.dumps(record))
    with pytest.raises(InputError, match="different config .*synthesizer"):
        run_job(make_config(plan={"num_images": 16}))


def test_the_same_checkpoint_at_another_path_resumes_a_different_one_is_refused(
    make_config, teacher_checkpoint: str, tmp_path: Path
) -> None:
    run_job(make_config(plan={"num_images": 16}))
    moved = tmp_path / "elsewhere" / "teacher.pt"
    moved.parent.mkdir()
    shutil.copy(teacher_checkpoint, moved)
    manifest = run_job(make_config(plan={"num_images": 16}, teacher={"checkpoint": str(moved)}))
    assert manifest["this_run"]["shards_resumed"] == 1
    other = tmp_path / "elsewhere" / "other.pt"
    state = torch.load(moved, weights_only=True)
    next(iter(state["state_dict"].values())).add_(1.0)
    torch.save(state, other)
    with pytest.raises(InputError, match="teacher checkpoint"):
        run_job(make_config(plan={"num_images": 16}, teacher={"checkpoint": str(other)}))


def test_filter_keeps_only_confident_correct_samples_and_counts_the_rest(
    make_config, tmp_path: Path
) -> None:
    config = make_config(
        filter={"enabled": True, "min_confidence": 0.2, "max_attempts": 2}, plan={"num_images": 16}
    )
    manifest = run_job(config)
    sidecar = json.loads((tmp_path / "out/test/shards/train-000000.json").read_text())
    assert sidecar["accepted"] + sidecar["rejected"] == 16
    assert sidecar["attempts"] in (1, 2)
    assert sidecar["synthesized"] == 16 * sidecar["attempts"]
    samples = list(
        wds.WebDataset(str(tmp_path / "out/test/shards/train-000000.tar"), shardshuffle=False)
    )
    assert len(samples) == sidecar["accepted"] == manifest["totals"]["images"]
    for sample in samples:
        info = json.loads(sample["json"])
        assert info["confidence"] >= 0.2
        assert np.load(io.BytesIO(sample["logits.npy"])).argmax() == info["label"]


def test_failed_shards_are_retried_a_bounded_number_of_times(make_config, monkeypatch) -> None:
    calls = {"n": 0}
    real_run = ShardWorker.run

    def flaky(self, task):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("transient")
        return real_run(self, task)

    monkeypatch.setattr(ShardWorker, "run", flaky)
    assert run_job(make_config())["totals"]["images"] == 32
    assert calls["n"] == 3

    def broken(self, task):
        raise OSError("disk on fire")

    monkeypatch.setattr(ShardWorker, "run", broken)
    config = make_config(run={"name": "other"}, runtime={"max_retries": 2})
    with pytest.raises(RunFailed, match="2 shard.* 3 tries .*disk on fire.*rerun"):
        run_job(config)


def test_ray_actors_write_shards_that_ray_data_reads(
    ray_cluster, teacher_checkpoint: str, tmp_path: Path, monkeypatch
) -> None:
    # relative paths, as in configs/demo.yaml: actors run in other folders
    monkeypatch.chdir(tmp_path)
    shutil.copy(teacher_checkpoint, tmp_path / "teacher.pt")
    runtime = {"executor": "ray", "num_workers": 2, "cpus_per_worker": 1}
    config = parse_config(config_dict("out", "teacher.pt", runtime=runtime))
    manifest = run_job(config)
    assert manifest["totals"]["images"] == 32
    run = tmp_path / "out" / "test"
    sidecars = [json.loads(p.read_text()) for p in (run / "shards").glob("*.json")]
    assert all(sidecar["device"].startswith("cpu") for sidecar in sidecars)
    # each sidecar names the node that wrote it: this machine, this Ray node
    node_id = ray_cluster.get_runtime_context().get_node_id()
    assert {sidecar["node"]["ray_node_id"] for sidecar in sidecars} == {node_id}
    assert {sidecar["node"]["hostname"] for sidecar in sidecars} == {socket.gethostname()}
    dataset = ray_cluster.data.read_webdataset(str(run / "shards"), file_extensions=["tar"])
    rows = dataset.take_all()
    assert len(rows) == 32
    assert {row["__key__"] for row in rows} == {
        f"00000{s}-{i:05d}" for s in (0, 1) for i in range(16)
    }
    assert np.asarray(rows[0]["png"]).shape == (32, 32, 3)


def test_parse_resolves_the_same_plan_from_a_manifest(make_config, tmp_path: Path) -> None:
    manifest = run_job(make_config())
    again = parse_config(manifest["config"])
    assert make_plan(again) == make_plan(make_config())
    assert again.plan == make_config().plan
    assert again.synthesizer == make_config().synthesizer


def test_ray_retries_a_failing_shard_then_fails_clearly_and_resumes(
    ray_cluster, make_config, tmp_path: Path
) -> None:
    config = make_config(
        plan={"num_images": 48},
        runtime={"executor": "ray", "num_workers": 2, "max_retries": 1},
    )
    blocker = tmp_path / "out" / "test" / "shards" / "train-000001.tar"
    blocker.mkdir(parents=True)  # the tar cannot be renamed into place: every try fails
    with pytest.raises(RunFailed, match=r"1 shard\(s\) failed after 2 tries .*train-000001"):
        run_job(config)
    shards = tmp_path / "out" / "test" / "shards"
    assert sorted(p.name for p in shards.glob("*.json")) == [
        "train-000000.json",
        "train-000002.json",
    ]
    assert not (tmp_path / "out" / "test" / "manifest.json").exists()
    assert not list(shards.glob("*.partial-*"))
    blocker.rmdir()
    assert run_job(config)["totals"]["images"] == 48


@pytest.mark.parametrize(
    ("resources", "runtime", "options", "count"),
    [
        ({"CPU": 16.0, "GPU": 4.0}, {}, {"num_gpus": 1.0, "num_cpus": 1.0}, 4),
        (
            {"CPU": 16.0, "GPU": 4.0},
            {"gpus_per_worker": 0.5},
            {"num_gpus": 0.5, "num_cpus": 1.0},
            8,
        ),
        ({"CPU": 2.0}, {}, {"num_cpus": 1.0, "num_gpus": 0}, 2),
        ({"CPU": 8.0}, {"cpus_per_worker": 4.0}, {"num_cpus": 4.0, "num_gpus": 0}, 2),
        ({"CPU": 8.0, "GPU": 2.0}, {"num_workers": 1}, {"num_gpus": 1.0, "num_cpus": 1.0}, 1),
        # max_workers: asked for up front, whatever is up now (the autoscaler adds nodes)
        ({"CPU": 1.0}, {"max_workers": 8}, {"num_cpus": 1.0, "num_gpus": 0}, 8),
        ({"CPU": 1.0}, {"device": "gpu", "max_workers": 8}, {"num_gpus": 1.0, "num_cpus": 1.0}, 8),
        # a GPU cluster scaled to zero: device gpu keeps GPU actors (one, until it scales)
        ({"CPU": 4.0}, {"device": "gpu"}, {"num_gpus": 1.0, "num_cpus": 1.0}, 1),
        ({"CPU": 8.0, "GPU": 2.0}, {"device": "cpu"}, {"num_cpus": 1.0, "num_gpus": 0}, 8),
        (
            {"CPU": 8.0, "board": 3.0},
            {"resources_per_worker": {"board": 1.0}},
            {"num_cpus": 1.0, "num_gpus": 0, "resources": {"board": 1.0}},
            3,
        ),
    ],
)
def test_actors_use_gpus_only_when_the_cluster_has_them(
    make_config, resources: dict, runtime: dict, options: dict, count: int
) -> None:
    from pipeline.execution.placement import actor_resources, resolve_device

    runtime = make_config(runtime=runtime).runtime
    device = resolve_device(resources, runtime)
    assert actor_resources(resources, runtime, device) == (options, count)


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"device": "tpu"}, "device must be auto, gpu or cpu"),
        ({"max_workers": 0}, "max_workers must be positive"),
        ({"max_workers": 2, "num_workers": 3}, "not both"),
        ({"resources_per_worker": {"board": 0}}, "resources_per_worker"),
    ],
)
def test_bad_runtime_placement_is_refused(make_config, runtime: dict, message: str) -> None:
    from pipeline.errors import InputError

    with pytest.raises(InputError, match=message):
        make_config(runtime=runtime)
