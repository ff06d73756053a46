"""Config parsing: dataclasses, overrides, and clear errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests_support import base_config

from pipeline.config import load_config, parse_config
from pipeline.errors import InputError
from synthesizers import synthesizer_names
from synthesizers.deepinversion import DeepInversionConfig


def test_defaults_and_synthesizer_section_become_dataclasses() -> None:
    config = parse_config(base_config())
    assert isinstance(config.synthesizer.params, DeepInversionConfig)
    assert config.synthesizer.params.iterations == 2
    assert config.synthesizer.params.bn_weight == 10.0  # the paper's default kept
    assert config.classes == list(range(10))
    assert config.teacher.mean == (0.485, 0.456, 0.406)
    flat = config.to_dict()
    assert flat["synthesizer"]["name"] == "deepinversion"
    assert flat["synthesizer"]["lr"] == 0.05


def test_overrides_set_nested_fields_with_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config()))
    config = load_config(path, ["plan.classes=[1, 3]", "synthesizer.lr=0.1", "run.seed=9"])
    assert config.classes == [1, 3]
    assert config.synthesizer.params.lr == 0.1
    assert config.run.seed == 9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": {"bogus": 1}}, "unknown key plan.bogus"),
        ({"extra": {}}, "unknown config section 'extra'"),
        ({"synthesizer": {"name": "nope"}}, "valid names: .*deepinversion"),
        ({"synthesizer": {"name": "deepinversion", "iters": 3}}, "synthesizer.iters"),
        ({"plan": {"batch_size": 0}}, "batch_size must be positive"),
        ({"plan": {"num_images": -5}}, "num_images must be positive"),
        ({"plan": {"batch_size": "big"}}, "plan.batch_size: expected an integer"),
        ({"plan": {"classes": [3, 12]}}, r"plan.classes: \[12\] outside"),
        ({"plan": {"classes": []}}, "non-empty"),
        ({"filter": {"min_confidence": 1.5}}, "min_confidence"),
        ({"teacher": {"mean": [0.5, 0.5]}}, "mean and std"),
        ({"teacher": {"checkpoint": ""}}, "checkpoint is required"),
        ({"runtime": {"executor": "spark"}}, "executor"),
        ({"run": {"seed": True}}, "run.seed: expected an integer"),
        ({"synthesizer": {"name": "deepinversion", "lr": -1.0}}, "lr must be positive"),
    ],
)
def test_bad_configs_name_the_culprit(change: dict, message: str) -> None:
    data = base_config()
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(InputError, match=message):
        parse_config(data)


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(InputError, match="mapping"):
        load_config(bad)
    bad.write_text(yaml.safe_dump(base_config()))
    with pytest.raises(InputError, match="expected key.path=value"):
        load_config(bad, ["plan.batch_size"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.synthesizer.name in synthesizer_names()
    assert config.plan.num_images >= config.plan.batch_size


def test_absolute_paths_covers_every_local_path_a_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests_support import config_dict

    from pipeline.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    data = config_dict(
        "out",
        "teacher.pt",
        synthesizer={"name": "imagine", "iterations": 2, "shape_image": "shape.png"},
        filter={"verifier": {"arch": "resnet20", "checkpoint": "verifier.pt"}},
        metadata={"source": "targets", "scenario": "seeds"},
        retrieval={"pool": "pool", "labeled": "s3://bucket/labeled", "num_select": 4},
    )
    config = absolute_paths(parse_config(data))
    assert config.run.output == str(tmp_path / "out")
    assert config.teacher.checkpoint == str(tmp_path / "teacher.pt")
    assert config.filter.verifier.checkpoint == str(tmp_path / "verifier.pt")
    assert config.metadata.source == str(tmp_path / "targets")
    assert config.synthesizer.params.shape_image == str(tmp_path / "shape.png")
    assert config.synthesizer.params.style_image is None  # unset fields stay unset
    assert config.retrieval.pool == str(tmp_path / "pool")
    assert config.retrieval.labeled == "s3://bucket/labeled"  # URLs are left as they are


@pytest.mark.parametrize(
    ("value", "expected"),
    [("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on"), ("auto", "auto")],
)
def test_a_switch_takes_yaml_on_off_back_as_words(tmp_path: Path, value, expected) -> None:
    # YAML 1.1 reads bare on/off/yes/no as booleans; compile's choices include on and off
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config()))
    config = load_config(path, [f"synthesizer.compile={value}"])
    assert config.synthesizer.params.compile == expected
    imagine = {**base_config(), "synthesizer": {"name": "imagine", "compile": False}}
    imagine["metadata"] = {"source": "targets", "scenario": "seeds"}
    assert parse_config(imagine).synthesizer.params.compile == "off"  # a subclass's field too


def test_other_fields_still_refuse_a_boolean_and_say_why() -> None:
    data = base_config()
    data["synthesizer"]["compile"] = "sometimes"
    with pytest.raises(InputError, match="synthesizer.compile: expected one of auto, on, off"):
        parse_config(data)
    data = base_config()
    data["run"]["name"] = False  # `name: no`: a run must not be quietly named "off"
    with pytest.raises(InputError, match="run.name: expected a string .*quote it"):
        parse_config(data)
    data = base_config()
    data["synthesizer"]["precision"] = True  # precision's choices hold no on/off
    with pytest.raises(InputError, match="synthesizer.precision: expected a string"):
        parse_config(data)


def test_storage_options_parse_like_set() -> None:
    from pipeline.cli.arguments import storage_options

    options = storage_options(
        [
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
            "anon=false",
            "default_block_size=5242880",
            "config_kwargs.retries={max_attempts: 2}",
            "profile=",
        ]
    )
    assert options == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "anon": False,
        "default_block_size": 5242880,
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "profile": "",
    }
    with pytest.raises(InputError, match="--storage-option 'anon': expected key.path=value"):
        storage_options(["anon"])
    with pytest.raises(InputError, match="--storage-option 'a.b=1': a is not a section"):
        storage_options(["a=1", "a.b=1"])
