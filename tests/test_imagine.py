"""IMAGINE: the two stages and the discriminator, the controls, the counterfactual, and
image-guided runs through the task graph (inline and on 2 Ray actors)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_synthesizers import MEAN, STD, graph_holders, tiny_teacher
from torch import nn

from pipeline.cli.main import main
from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.attribution import centroid, gaussian_blob, grad_cam
from synthesizers.discriminator import (
    PatchDiscriminator,
    critic_loss,
    gradient_penalty,
    interpolate,
)
from synthesizers.imagine import Imagine, ImagineConfig, default_layers
from synthesizers.imagine_counterfactual import counterfactual

FAST = {"discriminator_width": 8, "discriminator_blocks": 1}  # tiny D for 16×16 images


def request(batch: int = 4, seed: int = 1, **guidance) -> SynthesisSpec:
    torch.manual_seed(100 + seed)
    guidance.setdefault("target_images", torch.rand(batch, 3, 16, 16))
    return SynthesisSpec(torch.arange(batch) % 4, (3, 16, 16), seed, MEAN, STD, guidance)


class Recording(Imagine):
    """Imagine that logs, per step, whether the adversarial term was computed and
    whether the discriminator's weights changed."""

    def setup(self) -> None:
        super().setup()
        self.computed: list[tuple[str, bool]] = []
        self.trained: list[tuple[str, bool]] = []

    def loss_terms(self, ctx):
        terms = super().loss_terms(ctx)
        self.computed.append((ctx.stage.name, "adversarial" in terms))
        return terms

    def after_step(self, ctx) -> None:
        network = self.discriminator
        before = [p.clone() for p in network.parameters()] if network is not None else []
        super().after_step(ctx)
        after = list(network.parameters()) if network is not None else []
        changed = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        self.trained.append((ctx.stage.name, changed))


def test_the_discriminator_appears_in_stage_two_only() -> None:
    synth = Recording(tiny_teacher(), ImagineConfig(iterations=6, **FAST))
    result = synth.synthesize(request())
    assert [s.iterations for s in synth.stages()] == [3, 3]
    expected = [("matching", False)] * 3 + [("adversarial", True)] * 3
    assert synth.computed == expected and synth.trained == expected
    assert {"ce", "tv", "l2", "feature", "adversarial", "total"} == set(result.losses)
    assert synth.weights(synth.stages()[1])["adversarial"] == 10.0

    without = Recording(tiny_teacher(), ImagineConfig(iterations=4, adversarial_weight=0))
    without.synthesize(request())
    assert [s.name for s in without.stages()] == ["matching"]
    assert without.discriminator is None and not any(c for _, c in without.computed)


def test_same_seed_same_variations() -> None:
    synth = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(iterations=4, **FAST))
    targets = torch.rand(4, 3, 16, 16)
    first, again, other = (
        synth.synthesize(request(seed=s, target_images=targets)) for s in (1, 1, 2)
    )
    assert torch.equal(first.images, again.images) and first.losses == again.losses
    assert not torch.equal(first.images, other.images)


def test_the_image_prior_is_the_squared_norm_of_each_image() -> None:
    """Eq. 2: β‖x̂‖² (squared), per image and averaged over the batch, on x̂ as the teacher
    sees it (one iteration, no jitter or flip: the starting pixels)."""
    config = ImagineConfig(iterations=1, adversarial_weight=0, jitter=0, flip=False)
    synth = build_synthesizer("imagine", tiny_teacher(), config)
    built = []
    parametrise = synth.parametrise

    def record(spec):
        pixels = parametrise(spec)
        built.append(pixels.pixels.detach().clone())
        return pixels

    synth.parametrise = record  # type: ignore[method-assign]
    result = synth.synthesize(request())
    expected = built[0].square().flatten(1).sum(dim=1).mean()
    assert result.losses["l2"] == pytest.approx(float(expected), rel=1e-5)
    assert result.losses["l2"] > 10 * float(built[0].norm())  # not the batch's plain norm


def test_the_target_crops_have_a_stream_of_their_own() -> None:
    """Seeded from the request's seed, but not with it: the loop's jitter stream is
    random.Random(seed), and the targets' crops must not replay its draws."""
    synth = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(iterations=2, **FAST))
    draws = []
    for _ in range(2):
        synth.prepare(request(seed=7))
        draws.append([synth.crop_rng.random() for _ in range(4)])
    assert draws[0] == draws[1]  # deterministic
    loop = random.Random(7)
    assert draws[0] != [loop.random() for _ in range(4)]


def test_no_graph_outlives_synthesize() -> None:
    """With the position control and the discriminator on, the last step's activations
    and blob (which hold the autograd graph) are dropped when synthesize returns."""
    config = ImagineConfig(iterations=4, position=[0.5, 0.5], position_layer="1", **FAST)
    synth = build_synthesizer("imagine", tiny_teacher(), config)
    synth.synthesize(request())
    assert graph_holders(synth) == []


def test_the_discriminator_is_table_1_and_reseeded_per_request() -> None:
    network = PatchDiscriminator()
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 128, (3, 3), (1, 1)),
        *[(128, 128, (3, 3), (1, 1))] * 3,
        (128, 1, (1, 1), (1, 1)),
    ]
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    relus = [m for m in network.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(norms) == 4 and all(n.num_features == 128 and n.affine for n in norms)
    assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)
    assert network(torch.rand(2, 3, 32, 32)).shape == (2, 1, 24, 24)
    synth = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(iterations=2, **FAST))
    synth.prepare(request(seed=5))
    first = [p.clone() for p in synth.discriminator.parameters()]
    synth.prepare(request(seed=5))
    assert all(
        torch.equal(a, b) for a, b in zip(first, synth.discriminator.parameters(), strict=True)
    )
    synth.prepare(request(seed=6))
    assert not torch.equal(first[0], next(synth.discriminator.parameters()))


class Quadratic(nn.Module):
    """A critic with D(x) = ½‖x‖², so ∇D(x) = x: the penalty shows where it was taken."""

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.flatten(1).pow(2).sum(dim=1)


def test_the_gradient_penalty_is_taken_on_interpolates() -> None:
    torch.manual_seed(0)
    real, fake = torch.rand(3, 3, 8, 8), -torch.rand(3, 3, 8, 8)
    epsilon = torch.tensor([0.0, 0.3, 1.0])
    mixed = interpolate(real, fake, epsilon)
    assert torch.equal(mixed[0], fake[0]) and torch.equal(mixed[2], real[2])
    assert torch.allclose(mixed[1], 0.3 * real[1] + 0.7 * fake[1])
    expected = (mixed.flatten(1).norm(dim=1) - 1).pow(2).mean()
    penalty = gradient_penalty(Quadratic(), real, fake, epsilon)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    at_real = (real.flatten(1).norm(dim=1) - 1).pow(2).mean()
    assert penalty.item() != pytest.approx(at_real.item(), rel=1e-3)
    # the critic loss reaches the discriminator's weights through the penalty (create_graph)
    network = PatchDiscriminator(width=4, blocks=1)
    loss = critic_loss(network, real, fake, 10.0, epsilon)
    loss.backward()
    weights = [p for p in network.parameters() if p.ndim > 1]  # (biases before BN get none)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_default_layers_follow_the_paper_mapping() -> None:
    torchvision = pytest.importorskip("torchvision")
    from pipeline.models.archs import build_architecture

    assert default_layers(torchvision.models.resnet50()) == [
        "conv1",
        "layer1.2",
        "layer2.3",
        "layer3.5",
    ]
    assert default_layers(build_architecture("resnet20", 10)) == [
        "bn1",
        "layer1",
        "layer2",
        "layer3",
    ]
    assert default_layers(tiny_teacher()) == ["1", "4"]  # before the strided conv, the end
    with pytest.raises(ValueError, match=r"synthesizer.shape_layers: no layer named 'nope'"):
        build_synthesizer("imagine", tiny_teacher(), ImagineConfig(shape_layers=["nope"]))


def test_shape_and_style_change_which_layers_are_matched() -> None:
    synth = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(iterations=2, **FAST))
    plain = request()
    synth.prepare(plain)
    assert [(r.name, r.layers) for r in synth.references] == [("target", ["1", "4"])]
    synth.prepare(request(shape_image=torch.rand(1, 16, 16)))  # greyscale: made RGB
    assert [(r.name, r.layers) for r in synth.references] == [
        ("shape", ["4"]),
        ("target", ["1"]),
    ]
    assert synth.describe()["shape_layers"] == ["4"]
    synth.prepare(request(style_image=torch.rand(3, 16, 16)))
    assert [(r.name, r.layers) for r in synth.references] == [("style", ["1"])]
    custom = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(shape_layers=["1"], **FAST))
    custom.prepare(request(shape_image=torch.rand(3, 16, 16)))
    assert [(r.name, r.layers) for r in custom.references] == [
        ("shape", ["1"]),
        ("target", ["4"]),
    ]
    # style starts from the content (the target); a few tiny steps stay near it
    still = build_synthesizer(
        "imagine", tiny_teacher(), ImagineConfig(iterations=1, lr=1e-4, jitter=0, **FAST)
    )
    content = request(style_image=torch.rand(3, 16, 16))
    result = still.synthesize(content)
    assert (result.images - content.guidance["target_images"]).abs().max() < 0.01
    with pytest.raises(ValueError, match="4 channels.*RGB or greyscale"):
        synth.prepare(request(style_image=torch.rand(4, 16, 16)))


def cam_centroids(teacher: nn.Module, layer: str, images: torch.Tensor, labels) -> torch.Tensor:
    kept = {}
    module = dict(teacher.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: kept.update(a=o))
    try:
        x = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        logits = teacher(x.requires_grad_(True))
        return centroid(grad_cam(kept["a"], logits, labels, tuple(images.shape[-2:])).detach())
    finally:
        handle.remove()


def test_position_control_moves_the_grad_cam_toward_the_blob() -> None:
    teacher = tiny_teacher()
    found = {}
    for corner in ((0.2, 0.2), (0.8, 0.8)):
        config = ImagineConfig(
            iterations=40,
            adversarial_weight=0,
            position=list(corner),
            position_sigma=0.15,
            position_layer="1",
            jitter=0,
            flip=False,
            precision="fp32",
        )
        synth = build_synthesizer("imagine", teacher, config)
        result = synth.synthesize(request(batch=4, seed=3))
        found[corner] = cam_centroids(teacher, "1", result.images, result.labels)
    for corner, other in (((0.2, 0.2), (0.8, 0.8)), ((0.8, 0.8), (0.2, 0.2))):
        to_own = (found[corner] - torch.tensor(corner)).norm(dim=1)
        to_other = (found[corner] - torch.tensor(other)).norm(dim=1)
        assert bool((to_own < to_other).all()), (corner, found[corner])
    blob = gaussian_blob((16, 16), 4.5 / 16, 12.5 / 16, 0.1)  # centred on pixel (12, 4)
    assert blob.argmax() == 12 * 16 + 4 and blob.max() <= 1.0


def test_counterfactual_keeps_the_query_outside_the_region() -> None:
    teacher = tiny_teacher()
    torch.manual_seed(0)
    query, example = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    region = torch.zeros(16, 16)
    region[4:12, 4:12] = 1
    config = ImagineConfig(iterations=30, adversarial_weight=0, precision="fp32")
    result = counterfactual(teacher, query, region, example, region, MEAN, STD, config, seed=2)
    change = (result.images[0] - query).abs().mean(dim=0)  # (H, W)
    outside, inside = change[region == 0].mean(), change[region == 1].mean()
    assert outside < 0.02 and inside > 5 * outside, (outside, inside)
    assert set(result.losses) >= {"ce", "feature", "query"}
    with pytest.raises(ValueError, match="only 0 and 1"):
        counterfactual(teacher, query, region * 0.5, example, region, MEAN, STD, config)


def test_bad_controls_are_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="outside the image"):
        ImagineConfig(position=[1.2, 0.5])
    with pytest.raises(ValueError, match="shape_image or style_image"):
        ImagineConfig(shape_image="a.png", style_image="b.png")
    synth = build_synthesizer("imagine", tiny_teacher(), ImagineConfig(**FAST))
    with pytest.raises(ValueError, match="target_images"):
        synth.prepare(SynthesisSpec(torch.arange(2), (3, 16, 16), 0, MEAN, STD))


# ---- through the task graph ---------------------------------------------------------------
def save_targets(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"target-{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def imagine_sections(targets: Path, **synthesizer) -> dict:
    return {
        "synthesizer": {
            "name": "imagine",
            "iterations": 2,
            "discriminator_width": 8,
            **synthesizer,
        },
        "metadata": {"source": str(targets), "scenario": "seeds", "variations": 2},
        "plan": {"batch_size": 4, "shard_size": 4},
    }


def written(run: Path) -> list[dict]:
    tars = sorted(str(p) for p in (run / "shards").glob("*.tar"))
    return [json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)]


def test_an_image_guided_run_links_every_sample_to_its_target(make_config, tmp_path) -> None:
    from pipeline.graph import run_job

    paths = save_targets(tmp_path / "targets", 3)
    grey = tmp_path / "shape.png"
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L").save(grey)
    config = make_config(**imagine_sections(tmp_path / "targets", shape_image=str(grey)))
    manifest = run_job(config)
    assert manifest["totals"]["images"] == 6
    infos = written(tmp_path / "out" / "test")
    assert sorted(i["seed_image"] for i in infos) == sorted(str(p) for p in paths for _ in "ab")
    artifact = json.loads(
        Path(manifest["metadata"]["url"][: -len(".safetensors")] + ".json").read_text()
    )
    label_of = {row["seed"]: row["label"] for row in artifact["seeds"]}
    for info in infos:
        assert info["synthesizer"] == "imagine" and info["label"] == label_of[info["seed_image"]]
        assert info["controls"]["shape_image"] == str(grey)
        assert info["controls"]["layers"] == ["bn1", "layer1", "layer2", "layer3"]


def test_targets_spread_over_two_ray_actors(make_config, tmp_path, ray_cluster) -> None:
    from pipeline.graph import run_job

    paths = save_targets(tmp_path / "targets", 4)
    sections = imagine_sections(tmp_path / "targets", position=[0.3, 0.6])
    sections["runtime"] = {"executor": "ray", "num_workers": 2, "progress": False}
    manifest = run_job(make_config(**sections))
    assert len(manifest["shards"]) == 2 and manifest["totals"]["images"] == 8
    infos = written(tmp_path / "out" / "test")
    assert sorted({i["seed_image"] for i in infos}) == sorted(str(p) for p in paths)
    assert all(i["controls"]["position"]["x"] == 0.3 for i in infos)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"synthesizer": {"position": [1.5, 0.5]}}, "position .* is outside the image"),
        ({"synthesizer": {"layers": ["layer9"]}}, "synthesizer.layers: no layer named 'layer9'"),
        (
            {"synthesizer": {"shape_image": "MISSING"}},
            "synthesizer.shape_image .*missing.png: no such",
        ),
        ({"synthesizer": {"style_image": "BROKEN"}}, "synthesizer.style_image .*broken.png: not a"),
        ({"metadata": {"source": "BROKEN"}}, "broken.png: not a readable image"),
        ({"metadata": {"source": "NOWHERE"}}, "nowhere: no such folder"),
        ({"metadata": {"scenario": "A"}}, "variations of target images: set metadata.scenario"),
    ],
)
def test_bad_input_exits_2_naming_the_culprit_and_writes_nothing(
    change: dict, message: str, teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    import yaml
    from tests_support import config_dict

    save_targets(tmp_path / "targets", 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    sections = imagine_sections(tmp_path / "targets")
    paths = {"MISSING": tmp_path / "missing.png", "BROKEN": broken, "NOWHERE": tmp_path / "nowhere"}
    for section, values in change.items():
        if section == "metadata" and values.get("scenario") == "A":
            sections["metadata"] = {"source": str(tmp_path / "targets")}
            continue
        sections[section].update(
            {k: str(paths.get(v, v)) if isinstance(v, str) else v for k, v in values.items()}
        )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(config_dict(str(tmp_path / "out"), teacher_checkpoint, **sections))
    )
    assert main(["run", str(config)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    out = tmp_path / "out"
    assert not (out / "test").exists() and not list(out.glob("**/*.safetensors"))


def test_the_counterfactual_command(teacher_checkpoint: str, tmp_path: Path, capsys) -> None:
    import yaml
    from tests_support import config_dict

    rng = np.random.default_rng(1)
    for name in ("query", "example"):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "region.png")
    sections = imagine_sections(tmp_path)
    sections["synthesizer"].update(iterations=12, adversarial_weight=0.0, precision="fp32")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(config_dict(str(tmp_path / "out"), teacher_checkpoint, **sections))
    )
    args = ["counterfactual", str(config), "--query", str(tmp_path / "query.png")]
    args += [
        "--query-region",
        str(tmp_path / "region.png"),
        "--example",
        str(tmp_path / "example.png"),
    ]
    args += ["--example-region", str(tmp_path / "region.png"), "--variations", "2"]
    assert main([*args, "--out", str(tmp_path / "cf")]) == 0
    summary = json.loads((tmp_path / "cf" / "counterfactual.json").read_text())
    assert len(summary["confidence_in_target"]) == 2 and "query" in summary["losses"]
    query = np.asarray(Image.open(tmp_path / "query.png"), dtype=np.float32)
    result = np.asarray(Image.open(tmp_path / "cf" / "counterfactual-0.png"), dtype=np.float32)
    outside = np.abs(result - query)[mask == 0].mean() / 255
    inside = np.abs(result - query)[mask > 0].mean() / 255
    assert outside < 0.03 and inside > 3 * outside, (outside, inside)
    assert (tmp_path / "cf" / "sheet.png").exists()
    capsys.readouterr()
    args[3] = str(tmp_path / "nope.png")
    assert main([*args, "--out", str(tmp_path / "cf2")]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err
