"""NaturalInversion: the pyramid on real architectures, the generator re-drawn per batch,
each switch, the ADI combination, and a run through ``dreamshard run``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from test_synthesizers import spec, tiny_teacher
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.io.shards import Sidecar
from pipeline.models.archs import build_architecture
from pipeline.stages.manifest import inspect_run
from synthesizers import build_synthesizer
from synthesizers.adi import SmallStudent
from synthesizers.feature_pyramid import FeatureTransferPyramid, find_pyramid, tap_outputs
from synthesizers.natural_inversion import NaturalImages, NaturalInversion, NaturalInversionConfig
from synthesizers.spec import PLAIN_PATH


def natural(teacher: torch.nn.Module | None = None, **fields) -> NaturalInversion:
    fields = {"iterations": 3, "precision": "fp32", **fields}
    synth = build_synthesizer(
        "natural-inversion", teacher or tiny_teacher(), NaturalInversionConfig(**fields)
    )
    assert isinstance(synth, NaturalInversion)
    return synth


def spy(synth: NaturalInversion) -> list[tuple[NaturalImages, dict[str, torch.Tensor]]]:
    """Every parametrisation ``synth`` builds, with a copy of its parameters as built."""
    built: list[tuple[NaturalImages, dict[str, torch.Tensor]]] = []
    parametrise = synth.parametrise

    def record(request):
        images = parametrise(request)
        built.append((images, state(images)))
        return images

    synth.parametrise = record  # type: ignore[method-assign]
    return built


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("arch", "size", "names"),
    [
        ("resnet20", 32, ["layer1", "layer2", "layer3"]),
        ("resnet56", 32, ["layer1", "layer2", "layer3"]),
        ("vgg11_bn_cifar", 32, None),
        ("mobilenetv2_cifar", 32, None),
        ("torchvision:resnet18", 224, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_pyramid_follows_the_teacher_and_ends_at_image_resolution(
    arch: str, size: int, names: list[str] | None
) -> None:
    torch.manual_seed(0)
    model = build_architecture(arch, 10).eval()
    levels = find_pyramid(model, (3, size, size))
    if names is not None:
        assert [level.name for level in levels] == names
    sizes = [level.size[0] for level in levels]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes) >= 3
    assert 1 not in sizes  # the pooled vector is no level
    pyramid = FeatureTransferPyramid(levels, (3, size, size))
    modules = dict(model.named_modules())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad(), tap_outputs([modules[lv.name] for lv in levels]) as features:
        model(images)
        m = pyramid(features)
    assert m.shape == (2, 3, size, size)  # m_L: image channels at image resolution
    assert len(pyramid.project) == len(levels) and len(pyramid.mix) == len(levels) - 1


def test_pyramid_layers_can_be_named_and_bad_names_list_the_candidates() -> None:
    model = build_architecture("resnet20", 10).eval()
    levels = find_pyramid(model, (3, 32, 32), ["layer3", "layer1"])
    assert [(lv.name, lv.channels, lv.size) for lv in levels] == [
        ("layer1", 16, (32, 32)),
        ("layer3", 64, (8, 8)),
    ]
    with pytest.raises(ValueError, match="candidates: .*layer2"):
        find_pyramid(model, (3, 32, 32), ["layer9"])


def test_alpha_is_per_sample_and_per_channel_and_each_component_has_its_rate() -> None:
    synth = natural()
    built = spy(synth)
    result = synth.synthesize(spec())
    images, _ = built[0]
    assert images.alpha is not None and images.alpha.shape == (8, 3, 1, 1)
    assert not torch.equal(images.alpha, torch.ones(8, 3, 1, 1))  # α was learned
    assert images.z.shape == (8, synth.config.latent_dim)
    assert set(images.parameter_groups()) == {"generator", "pyramid", "alpha"}
    optimizer = synth.optimizer(images, synth.stages()[0])
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4, 0.05]
    assert set(result.losses) == {"ce", "bn", "tv", "l2", "total"}
    c = synth.config
    weighted = sum(getattr(c, f"{k}_weight") * result.losses[k] for k in ("ce", "bn", "tv", "l2"))
    assert result.losses["total"] == pytest.approx(weighted, rel=1e-5)
    assert all(not p.requires_grad for p in synth.teacher.parameters())


def test_one_to_one_draws_a_fresh_generator_per_batch_from_its_seed() -> None:
    synth = natural()
    built = spy(synth)
    for seed in (1, 2, 1):
        synth.synthesize(spec(seed=seed))
    (first, at_first), (second, at_second), (third, at_third) = built
    assert first.generator is not second.generator and first.pyramid is not second.pyramid
    assert not same(at_first, at_second)  # another batch, other parameters
    assert not torch.equal(first.z, second.z)
    assert same(at_first, at_third)  # same seed, same parameters, whatever came between
    assert torch.equal(first.z, third.z)
    trained = state(first)
    assert not same(trained, at_first)  # the generator was optimised


def test_without_one_to_one_one_generator_trains_across_batches() -> None:
    synth = natural(one_to_one=False)
    built = spy(synth)
    synth.synthesize(spec(seed=1))
    after_first = state(built[0][0].generator)
    synth.synthesize(spec(seed=2))
    (first, _), (second, at_second) = built
    assert second.generator is first.generator and second.pyramid is first.pyramid
    generator_state = {k: v for k, v in at_second.items() if k.startswith("generator.")}
    assert same({f"generator.{k}": v for k, v in after_first.items()}, generator_state)
    assert second.alpha is not first.alpha  # α belongs to a batch's images
    assert not torch.equal(at_second["alpha"], state(first)["alpha"])  # drawn afresh
    assert not torch.equal(first.z, second.z)


def test_each_switch_changes_the_computation() -> None:
    def run(**switches) -> tuple[list[torch.Tensor], list[dict[str, float]], set[str]]:
        synth = natural(**switches)
        built = spy(synth)
        results = [synth.synthesize(spec(seed=seed)) for seed in (1, 2)]
        parameters = {k for images, _ in built for k in state(images)}
        return [r.images for r in results], [r.losses for r in results], parameters

    images, losses, parameters = run()
    assert {k.split(".")[0] for k in parameters} == {"generator", "pyramid", "alpha"}
    for switch, gone in (("ftp", "pyramid"), ("acs", "alpha")):
        other_images, other_losses, other_parameters = run(**{switch: False})
        assert parameters - other_parameters == {k for k in parameters if k.startswith(gone)}
        assert not torch.equal(other_images[0], images[0]), switch
        assert other_losses[0]["total"] != losses[0]["total"], switch
    # one_to_one: the first batch is drawn alike; the second starts from the trained one
    other_images, other_losses, _ = run(one_to_one=False)
    assert torch.equal(other_images[0], images[0])
    assert not torch.equal(other_images[1], images[1])
    assert other_losses[1]["total"] != losses[1]["total"]


def test_speed_switches_keep_the_result() -> None:
    """The second teacher pass (P's features) under channels_last, affine BN, fused
    moments and fused Adam computes what the plain path computes."""
    plain = natural(**PLAIN_PATH).synthesize(spec()).losses
    fast = {"channels_last": True, "fused_moments": True, "fused_optimizer": True}
    switched = natural(**{**PLAIN_PATH, **fast, "affine_batchnorm": True}).synthesize(spec())
    assert set(switched.losses) == set(plain)
    for name, value in plain.items():
        assert switched.losses[name] == pytest.approx(value, rel=1e-4), name


def test_same_seed_same_images() -> None:
    first = natural().synthesize(spec(seed=4))
    again = natural().synthesize(spec(seed=4))
    other = natural().synthesize(spec(seed=5))
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert first.images.min() >= 0 and first.images.max() <= 1


def test_the_adi_combination_adds_the_competition_term_and_distils_the_student() -> None:
    plain = natural()
    result = plain.synthesize(spec())
    assert "competition" not in result.losses and plain.student is None
    plain.after_batch(result, torch.ones(8, dtype=torch.bool))  # nothing to distil
    assert plain.student is None

    synth = natural(competition_weight=5.0, distill_steps=2)
    result = synth.synthesize(spec())
    losses = result.losses
    assert set(losses) == {"ce", "bn", "tv", "l2", "competition", "total"}
    assert 1.0 - math.log(2) <= losses["competition"] <= 1.0
    c = synth.config
    weighted = sum(getattr(c, f"{k}_weight") * losses[k] for k in ("ce", "bn", "tv", "l2"))
    assert losses["total"] == pytest.approx(weighted + 5.0 * losses["competition"], rel=1e-5)
    assert isinstance(synth.student, SmallStudent) and not synth.student.training
    before = state(synth.student)
    synth.after_batch(result, torch.tensor([True, False] * 4))
    assert not same(before, state(synth.student)) and synth.distill_loss is not None

    twin = natural(competition_weight=5.0)
    twin.attach_student(copy.deepcopy(twin.teacher))  # agrees with the teacher everywhere
    assert twin.synthesize(spec()).losses["competition"] == pytest.approx(1.0, abs=1e-6)


def test_the_authors_settings_tv_alpha_and_a_detached_pyramid_input() -> None:
    """kdst-team/NaturalInversion: --var_scale 6e-3, α ~ N(5, 1), and the pyramid fed the
    teacher's features of x̂.clone().detach() under no_grad."""
    assert NaturalInversionConfig().tv_weight == 6e-3
    synth = natural()
    built = spy(synth)
    seen: list[tuple[bool, bool, bool]] = []
    features_of = synth.pyramid_features

    def recording(levels):
        features = features_of(levels)

        def record(images: torch.Tensor) -> list[torch.Tensor]:
            out = features(images)
            grads = any(f.requires_grad or f.grad_fn is not None for f in out)
            seen.append((torch.is_grad_enabled(), images.requires_grad, grads))
            return out

        return record

    synth.pyramid_features = recording  # type: ignore[method-assign]
    synth.synthesize(spec())
    assert seen and all(entry == (False, False, False) for entry in seen)
    alpha = built[0][1]["alpha"]  # as drawn, before any step
    assert alpha.shape == (8, 3, 1, 1)
    assert 4.3 < float(alpha.mean()) < 5.7 and 0.5 < float(alpha.std()) < 1.6
    # the generator still learns (through its own output), and so does the pyramid
    images, at_build = built[0]
    trained = state(images)
    for part in ("generator", "pyramid"):
        keys = [k for k in trained if k.startswith(part)]
        assert any(not torch.equal(trained[k], at_build[k]) for k in keys), part


def test_config_is_validated() -> None:
    defaults = NaturalInversionConfig()
    assert (defaults.lr, defaults.ftp_lr, defaults.alpha_lr) == (1e-3, 5e-4, 0.05)
    assert (defaults.iterations, defaults.bn_weight, defaults.l2_weight) == (2000, 10.0, 1.5e-5)
    assert defaults.competition_weight == 0.0
    for field, value in (("alpha_lr", 0.0), ("ftp_lr", -1.0), ("latent_dim", 0)):
        with pytest.raises(ValueError, match=field):
            NaturalInversionConfig(**{field: value})
    with pytest.raises(ValueError, match="competition_weight"):
        NaturalInversionConfig(student_arch="resnet20")
    with pytest.raises(ValueError, match="competition_weight must be >= 0"):
        NaturalInversionConfig(competition_weight=-1.0)
    with pytest.raises(ValueError, match="batch-norm"):
        natural(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))


def test_two_iterations_through_dreamshard_run_write_valid_shards(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    """The worker attaches a registry student for the ADI combination, as for ADI."""
    data = config_dict(
        str(tmp_path / "out"),
        teacher_checkpoint,
        synthesizer={
            "name": "natural-inversion",
            "iterations": 2,
            "competition_weight": 1.0,
            "student_arch": "resnet20",
        },
        plan={"num_images": 16, "batch_size": 8, "shard_size": 8},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--set", "synthesizer.acs=false"]) == 0
    run = tmp_path / "out" / "test"
    tars = sorted(str(p) for p in (run / "shards").glob("*.tar"))
    assert len(tars) == 2
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb"))
    assert len(samples) == 16
    for sample in samples:
        assert sample["png"].shape == (32, 32, 3)
        info = sample["json"]
        assert info["synthesizer"] == "natural-inversion" and int(sample["cls"]) == info["label"]
        assert set(info["losses"]) == {"ce", "bn", "tv", "l2", "competition", "total"}
    report = inspect_run(str(run), verify=True)
    assert report["complete"] and report["corrupt"] == [] and report["totals"]["images"] == 16
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["synthesizer"]["acs"] is False
    assert Sidecar.read(str(run), "train-000000").samples == 8
