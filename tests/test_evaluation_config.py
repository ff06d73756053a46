"""The evaluation config: shipped examples validate; mistakes name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.config import (
    FidelityNetwork,
    StudentTrainConfig,
    load_eval_config,
    parse_eval_config,
)
from pipeline.config import RunConfig
from pipeline.errors import InputError

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_eval_configs_are_valid(path: Path) -> None:
    config = load_eval_config(path, ["train.epochs=3"])
    assert config.train.epochs == 3 and config.train.temperature == 5.0
    assert config.data.shards and config.data.test


def test_defaults_are_the_papers() -> None:
    config = parse_eval_config({"data": {"shards": "run", "test": "test"}})
    train = config.train
    assert (train.epochs, train.batch_size, train.lr, train.momentum) == (200, 128, 0.1, 0.9)
    assert (train.weight_decay, train.temperature) == (5e-4, 5.0)
    assert (config.prune.epochs, config.prune.lr) == (20, 0.001)
    assert config.teacher is None  # taken from the run's manifest


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"shards": "r"}, "train": {"epoch": 3}}, "unknown key train.epoch; valid keys"),
        ({"data": {"shards": "r"}, "students": {}}, "unknown config section 'students'"),
        ({"data": {"shards": "r"}, "train": {"logits": "cached"}}, "online or stored"),
        ({"data": {"shards": "r"}, "prune": {"ratios": [1.5]}}, r"prune: ratios must be"),
        ({"data": {"shards": "r"}, "runtime": {"num_workers": "two"}}, "expected an integer"),
        ({"data": {}}, "data: shards is required"),
        ({"data": {"shards": "r", "mixup": -1}}, "mixup is a Beta parameter"),
        ({"data": {"shards": "r"}, "train": {"recalibrate": 2}}, "recalibrate is a colour"),
        ({"data": {"shards": "r", "colour": 1.5}}, r"colour is a strength in \[0, 1\]"),
    ],
)
def test_bad_fields_are_named(data: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_eval_config(data)


def test_run_is_the_pipelines_run_config_and_networks_are_typed() -> None:
    config = parse_eval_config(
        {
            "data": {"shards": "r"},
            "fidelity": {"networks": [{"arch": "resnet56", "checkpoint": "n.pt", "name": "n"}]},
        }
    )
    assert type(config.run) is RunConfig and config.run.name == "eval"  # its own default
    assert isinstance(config.train, StudentTrainConfig)
    (network,) = config.fidelity.networks
    assert network == FidelityNetwork(arch="resnet56", checkpoint="n.pt", name="n")
    assert network.overrides() == {"arch": "resnet56", "checkpoint": "n.pt"}
    with pytest.raises(InputError, match=r"fidelity.networks\[0\]: each of networks needs"):
        parse_eval_config({"data": {"shards": "r"}, "fidelity": {"networks": [{"arch": "x"}]}})
    with pytest.raises(InputError, match=r"unknown key fidelity.networks\[0\].depth"):
        parse_eval_config(
            {"data": {"shards": "r"}, "fidelity": {"networks": [{"arch": "x", "depth": 2}]}}
        )
