"""Every benchmark script imports against the current code (a moved helper breaks one
silently: benchmarks run by hand, hours apart), and the ladder refuses bad rows."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py has no docstring saying what it measures"


def test_ladder_names_an_unknown_row() -> None:
    script = BENCHMARKS / "quality_ladder.py"
    done = subprocess.run(
        [sys.executable, str(script), "--rows", "real,dreaminversion"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown rows ['dreaminversion']" in done.stderr
    assert "class-conditional-C" in done.stderr  # the valid ones are listed


@pytest.mark.parametrize("row", ["real@100", "class-conditional@", "imagine@x", "adi@0"])
def test_ladder_refuses_a_curve_point_it_cannot_run(row: str) -> None:
    script = BENCHMARKS / "quality_ladder.py"
    done = subprocess.run(
        [sys.executable, str(script), "--rows", f"class-conditional@100,{row}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"unknown rows ['{row}']" in done.stderr  # the valid point is not named


def test_ladder_remeasures_only_a_row_it_has(tmp_path: Path) -> None:
    script = BENCHMARKS / "quality_ladder.py"
    results = tmp_path / "ladder.json"
    results.write_text('{"protocol": {}, "rows": {"real": {}}}')
    done = subprocess.run(
        [sys.executable, str(script), "--remeasure", "noise", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"--remeasure noise: {results} has no such row yet" in done.stderr
    assert "Traceback" not in done.stderr


def ladder_args(views: dict[str, float]) -> argparse.Namespace:
    """The arguments ``quality_ladder.eval_data`` reads: 60 epochs, inline KD, ``views``."""
    args = argparse.Namespace(epochs=60, kd_batch=64, eval_every=10, images=20, workers=2)
    args.gpu, args.views, args.loss, args.executor = False, views, {}, "inline"
    return args


def test_another_kd_schedule_never_shares_the_ladders_students(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ladder = importlib.import_module("quality_ladder")
    ours = ladder.student_path(tmp_path, "class-conditional@100", 1)
    longer = ladder.student_path(tmp_path, "class-conditional@100", 1, ladder.schedule_suffix(60))
    assert ladder.schedule_suffix(ladder.EPOCHS) == ""
    assert ours.parts[-3] == "class-conditional-i100-s1"
    assert longer.parts[-3] == "class-conditional-i100-s1-e60"  # its own folder, own resume
    views = ladder.schedule_suffix(60, {"mixup": 1.0, "blur": 0.0})  # 0: off, not named
    assert views == "-e60-mixup1" and ladder.schedule_suffix(30, {"blur": 1.5}) == "-blur1.5"
    data = ladder.eval_data("run", ladder_args({"mixup": 1.0}), "name", 0, tmp_path)
    assert data["data"]["mixup"] == 1.0 and data["train"]["epochs"] == 60
    assert data["runtime"]["executor"] == "inline"  # --executor reaches KD's runtime


def test_a_kd_recipe_variant_keeps_its_key_and_sends_loss_settings_to_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    recipe = importlib.import_module("kd_recipe")
    ladder = importlib.import_module("quality_ladder")
    # keys of results already recorded stay the same
    assert recipe.variant("mixup", 1.0, {"jpeg": 50}, "view")[:3] == (
        "mixup1+jpeg50",
        "m1j50",
        {"jpeg": 50, "mixup": 1.0},
    )
    tag, short, views, train = recipe.variant("jpeg", 75, {}, "stored")
    assert (tag, short, views, train) == (
        "jpeg75-stored",
        "j75s",
        {"jpeg": 75, "jpeg_teacher": "stored"},
        {},
    )
    tag, short, views, train = recipe.variant(
        "jpeg", 50, {"alpha": 1.0, "temperature": 4.0}, "view"
    )
    assert (tag, short) == ("jpeg50+alpha1+temperature4", "j50a1t4")
    assert views == {"jpeg": 50} and train == {"alpha": 1.0, "temperature": 4.0}
    data = ladder.eval_data("run", ladder_args({}), "name", 0, tmp_path)
    data["data"].update(views)
    data["train"].update(train)
    config = ladder.parse_eval_config(data)
    assert config.train.alpha == 1.0 and config.train.temperature == 4.0 and config.data.jpeg == 50
    # attention's letters differ from alpha's, so their runs never share a folder
    tag, short, _, train = recipe.variant("jpeg", 50, {"attention": 1000.0, "alpha": 1.0}, "view")
    assert (tag, short) == ("jpeg50+alpha1+attention1000", "j50a1at1000")
    assert train == {"attention": 1000.0, "alpha": 1.0}


def test_granularity_pools_each_group_like_the_metadata_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of g images: the mean of their means, and their variances' mean plus the
    spread of their means (the images of a row pooled pixel by pixel)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    granularity = importlib.import_module("statistics_granularity")
    from pipeline.stages.statistics import Sums

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    var = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    per_image = Sums(
        {"l": mean}, {"l": mean * mean}, {"l": var}, torch.ones(6, dtype=torch.float64)
    )
    labels = torch.tensor([0, 1, 0, 1, 0, 0])  # class 0: images 0, 2, 4, 5; class 1: 1, 3
    statistics, row_labels = granularity.group_statistics(per_image, labels, 2)
    assert row_labels == [0, 0, 1]
    for row, images in enumerate([[0, 2], [4, 5], [1, 3]]):
        pooled_mean = mean[images].mean(0)
        pooled_var = var[images].mean(0) + mean[images].var(0, unbiased=False)
        assert torch.allclose(statistics["l"][0][row], pooled_mean.float())
        assert torch.allclose(statistics["l"][1][row], pooled_var.float())
    assert granularity.target_rows(row_labels, 6)[1].tolist() == [0, 2, 1, 2, 0, 2]


def test_balancing_bias_undoes_a_class_prior_added_to_balanced_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Logits whose rows are the cyclic shifts of one vector have a uniform mean
    probability; adding a per-class prior ``c`` is undone by a shift of ``-c`` (centred)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    shift = importlib.import_module("student_bn_shift")
    row = torch.tensor([3.0, 1.0, 0.5, 0.0, -1.0])
    balanced = torch.stack([row.roll(k) for k in range(5)] * 4)
    prior = torch.tensor([2.0, 0.0, -1.0, 0.5, 0.0])
    bias = shift.balancing_bias(balanced + prior)
    assert torch.allclose(bias, -(prior - prior.mean()), atol=1e-4)
    means = (balanced + prior + bias).softmax(1).mean(0)
    assert torch.allclose(means, torch.full((5,), 0.2), atol=1e-5)
    assert (balanced + prior).argmax(1).tolist() != balanced.argmax(1).tolist()  # skewed


def test_bn_shift_finds_the_students_of_a_kd_view_where_the_ladder_put_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The diagnostic takes the ladder's view options, so that it scores the students of
    a view's recipe (``-e60-jpeg50``), not those of the plain recipe at the same epochs."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    shift = importlib.import_module("student_bn_shift")
    ladder = importlib.import_module("quality_ladder")
    monkeypatch.setattr(sys, "argv", ["student_bn_shift.py", "--epochs", "60", "--jpeg", "50"])
    args = shift.arguments()
    assert args.schedule == "-e60-jpeg50" == ladder.schedule_suffix(60, {"jpeg": 50})
    folder = ladder.student_path(Path("w"), "real", 1, args.schedule)
    assert "real-s1-e60-jpeg50" in folder.parts
    monkeypatch.setattr(sys, "argv", ["student_bn_shift.py", "--epochs", "60"])
    assert shift.arguments().schedule == "-e60"
    # attention transfer is part of the recipe's key, and the ladder sends it to train
    view = ["--epochs", "60", "--jpeg", "50", "--attention", "1000"]
    monkeypatch.setattr(sys, "argv", ["student_bn_shift.py", *view])
    assert shift.arguments().schedule == "-e60-attention1000-jpeg50"
    monkeypatch.setattr(sys, "argv", ["quality_ladder.py", *view])
    args = ladder.arguments()
    assert args.schedule == "-e60-attention1000-jpeg50"
    config = ladder.parse_eval_config(ladder.eval_data("run", args, "name", 0, Path("w")))
    assert config.train.attention == 1000 and config.data.jpeg == 50


def test_bn_shift_recomputes_exact_statistics_of_the_chosen_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ladder's recalibration (the diagnostic's too) gives the first BN the exact mean
    and (unbiased) variance of its input over all the images, and leaves the layers it was
    not asked for as they were."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ladder = importlib.import_module("quality_ladder")
    from pipeline.config import TeacherConfig
    from pipeline.models.accuracy import normalise
    from pipeline.models.archs import build_architecture
    from pipeline.models.teachers import Teacher

    torch.manual_seed(0)
    model = build_architecture("resnet20", 10).eval()
    spec = TeacherConfig(arch="resnet20", checkpoint="unused")
    images = torch.randint(0, 256, (450, 3, 32, 32), dtype=torch.uint8)
    deep = {k: v.clone() for k, v in model.layer3[2].bn2.state_dict().items()}
    student = Teacher(model, spec, "unused")
    assert ladder.recalibrated(student, images, 0.0, ("bn1", "layer1.")) is student
    with torch.no_grad():
        stem = model.conv1(normalise(images, spec.mean, spec.std))
    mean = stem.mean((0, 2, 3))
    var = stem.permute(1, 0, 2, 3).flatten(1).var(1)
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-4)
    assert torch.allclose(model.bn1.running_var, var, rtol=1e-3)
    for key, value in model.layer3[2].bn2.state_dict().items():
        assert torch.equal(value, deep[key]), key
    assert not model.training


def test_scaling_prices_a_row_in_real_images_between_measured_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    scaling = importlib.import_module("ladder_scaling")

    def ladder(images: int, rows: dict[str, list[float]]) -> Path:
        path = tmp_path / f"ladder-{images}-{len(list(tmp_path.iterdir()))}.json"
        record = {
            "protocol": {"images": images},
            "rows": {k: {"kd_top1": v} for k, v in rows.items()},
        }
        path.write_text(json.dumps(record))
        return path

    files = [ladder(260, {"real": [0.18, 0.22]}), ladder(1040, {"real": [0.4], "cc": [0.3, 0.3]})]
    entries = {(e["row"], e["images"]): e for e in scaling.summary(scaling.curves(files))}
    cc = entries[("cc", 1040)]
    assert cc["fraction_of_real"] == 0.75
    assert cc["worth_real_images"] == "520"  # halfway in log N between 260 and 1040
    assert entries[("real", 260)]["sd"] == pytest.approx(0.0283, abs=1e-4)
    assert scaling.real_worth({260: 0.2, 1040: 0.4}, 0.1) == "< 260"
    assert scaling.real_worth({260: 0.2, 1040: 0.4}, 0.5) == "> 1040"
    with pytest.raises(SystemExit, match="in two files"):
        scaling.curves([*files, ladder(1040, {"real": [0.41]})])
    longer = ladder(2080, {"real": [0.6]})
    record = json.loads(longer.read_text())
    record["protocol"]["epochs"] = 60
    longer.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="epochs 60 differs"):
        scaling.shared_protocol([*files, longer])
