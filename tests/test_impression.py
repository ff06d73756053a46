"""Impression codes (Eq. 1, 5, 6), decoding and translation, on a tiny BN teacher."""

from __future__ import annotations

import pytest
import torch
from test_synthesizers import MEAN, STD, tiny_teacher

from synthesizers import SynthesisSpec, build_synthesizer
from synthesizers.hooks import capture_statistics
from synthesizers.impression import (
    ImpressionConfig,
    class_codes,
    distance,
    encode,
    ensemble,
    flatten,
    template_layers,
)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_default_layers_are_every_convolution_and_unknown_names_list_valid_ones() -> None:
    teacher = tiny_teacher()
    assert [name for name, _ in template_layers(teacher)] == ["0", "3"]
    with pytest.raises(KeyError, match="valid layers: 0, 1, 2, 3"):
        template_layers(teacher, ["0", "conv9"])
    with pytest.raises(ValueError, match="synthesizer.layers: .*'conv9'"):
        build_synthesizer("impression", teacher, ImpressionConfig(layers=["conv9"]))


def test_an_images_code_does_not_depend_on_the_rest_of_its_batch() -> None:
    teacher = tiny_teacher()
    layers = template_layers(teacher)
    torch.manual_seed(3)
    image = torch.randn(1, 3, 16, 16)
    others = [torch.randn(5, 3, 16, 16), torch.rand(9, 3, 16, 16) * 4]
    alone, _ = encode(teacher, image, layers)
    for batch in others:
        mixed, _ = encode(teacher, torch.cat([batch[:2], image, batch[2:]]), layers)
        for name in alone:
            for part in range(2):
                torch.testing.assert_close(mixed[name][part][2], alone[name][part][0])
    # batching inside encode does not change a code either
    stack = torch.cat([others[1], image])
    whole, _ = encode(teacher, stack, layers, batch_size=64)
    pieces, _ = encode(teacher, stack, layers, batch_size=4)
    torch.testing.assert_close(flatten(whole), flatten(pieces), rtol=1e-5, atol=1e-5)


def test_ensembled_code_equals_the_code_of_the_concatenation() -> None:
    teacher = tiny_teacher()
    layers = template_layers(teacher)
    torch.manual_seed(4)
    images = torch.randn(12, 3, 16, 16) * torch.linspace(0.5, 2, 12).view(12, 1, 1, 1)
    codes, _ = encode(teacher, images, layers)
    direct = {}
    with torch.no_grad(), capture_statistics(layers, side="output") as records:
        teacher(images)
        for record in records:
            direct[record.name] = (record.mean, record.var)  # over all pixels of all images
    ensembled = ensemble(codes)
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(ensembled[name][0], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ensembled[name][1], var, rtol=1e-4, atol=1e-5)
    # each class's row is the ensembled code of that class's images alone
    labels = torch.tensor([0, 1, 2] * 4)
    rows, counts = class_codes(codes, labels, 4)
    assert counts.tolist() == [4, 4, 4, 0]
    for k in range(3):
        own = ensemble({n: (m[labels == k], v[labels == k]) for n, (m, v) in codes.items()})
        torch.testing.assert_close(flatten(rows)[k], flatten(own), rtol=1e-5, atol=1e-6)
    assert float(flatten(rows)[3].abs().sum()) == 0.0


def test_flat_codes_and_distances() -> None:
    teacher = tiny_teacher()
    codes, logits = encode(teacher, torch.randn(5, 3, 16, 16), template_layers(teacher))
    assert logits.shape == (5, 4)
    assert flatten(codes).shape == (5, 32) and flatten(codes, mean_only=True).shape == (5, 16)
    assert flatten(ensemble(codes)).shape == (32,)
    d = distance(flatten(codes), flatten(codes)[:2])
    assert d.shape == (5, 2)
    assert torch.allclose(d.diagonal(), torch.zeros(2), atol=1e-6)
    assert bool((d[2:] > 0).all())


def one_shot_target(teacher: torch.nn.Module) -> tuple[dict, torch.Tensor]:
    """The code of one 'real' image (a smooth pattern) as class 0's row."""
    ramp = torch.linspace(0, 1, 16)
    image = torch.stack([ramp.view(1, -1).expand(16, 16), ramp.view(-1, 1).expand(16, 16)] * 2)
    image = image[:3].unsqueeze(0)  # (1, 3, 16, 16) in [0, 1]
    codes, _ = encode(teacher, normalise(image), template_layers(teacher))
    return codes, image


@pytest.mark.parametrize("match", ["class", "sample"])
def test_one_shot_decoding_reduces_the_code_distance(match: str) -> None:
    teacher = tiny_teacher()
    target, _ = one_shot_target(teacher)
    layers = template_layers(teacher)
    request = SynthesisSpec(torch.zeros(6, dtype=torch.int64), (3, 16, 16), 5, MEAN, STD)
    request.guidance["class_statistics"] = target  # one image's code: K = 1 row
    distances = []
    for iterations in (1, 40):
        config = ImpressionConfig(iterations=iterations, match=match, precision="fp32")
        result = build_synthesizer("impression", teacher, config).synthesize(request)
        codes, _ = encode(teacher, normalise(result.images), layers)
        ensembled = flatten(ensemble(codes)) if match == "class" else flatten(codes)
        distances.append(
            float(distance(ensembled.reshape(-1, ensembled.shape[-1]), flatten(target)).mean())
        )
        assert set(result.losses) == {"impression", "total"}
    assert distances[1] < 0.5 * distances[0]


def test_translation_pulls_toward_the_target_and_the_content_term_holds_the_source() -> None:
    teacher = tiny_teacher()
    target, _ = one_shot_target(teacher)
    torch.manual_seed(6)
    sources = torch.rand(4, 3, 16, 16) * 0.3  # dark noise, far from the target's ramps
    layers = template_layers(teacher)
    start, _ = encode(teacher, normalise(sources), layers)
    before = float(distance(flatten(ensemble(start))[None], flatten(target)))
    moved = []
    for weight in (0.0, 1.0):
        request = SynthesisSpec(torch.zeros(4, dtype=torch.int64), (3, 16, 16), 5, MEAN, STD)
        request.guidance.update(class_statistics=target, init_images=sources)
        config = ImpressionConfig(iterations=30, content_weight=weight, precision="fp32")
        result = build_synthesizer("impression", teacher, config).synthesize(request)
        assert "content" in result.losses
        codes, _ = encode(teacher, normalise(result.images), layers)
        after = float(distance(flatten(ensemble(codes))[None], flatten(target)))
        assert after < before
        moved.append(float((result.images - sources).abs().mean()))
    assert moved[1] < moved[0]  # λ > 0 keeps the images nearer their sources


def test_guidance_is_checked() -> None:
    teacher = tiny_teacher()
    synth = build_synthesizer("impression", teacher, ImpressionConfig(iterations=1))
    request = SynthesisSpec(torch.zeros(2, dtype=torch.int64), (3, 16, 16), 1, MEAN, STD)
    with pytest.raises(ValueError, match="class_statistics"):
        synth.synthesize(request)
    target, _ = one_shot_target(teacher)
    request.guidance["class_statistics"] = {"0": target["0"]}
    with pytest.raises(ValueError, match="no code for layers"):
        synth.synthesize(request)
    request.guidance["class_statistics"] = target
    request.labels[1] = 3
    with pytest.raises(ValueError, match="beyond the 1 rows"):
        synth.synthesize(request)
    with pytest.raises(ValueError, match="needs guidance\\['init_images'\\]"):
        build_synthesizer(
            "impression", teacher, ImpressionConfig(iterations=1, content_weight=1e-5)
        ).synthesize(
            SynthesisSpec(
                torch.zeros(2, dtype=torch.int64),
                (3, 16, 16),
                1,
                MEAN,
                STD,
                {"class_statistics": target},
            )
        )


def test_cli_translate_writes_translated_shards(teacher_checkpoint, tmp_path, capsys) -> None:
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from pipeline.cli.main import main

    rng = np.random.default_rng(0)
    for folder, count in (("source", 6), ("target", 4)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            image = rng.integers(0, 256 if folder == "target" else 64, (32, 32, 3), np.uint8)
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "source" / "broken.jpg").write_bytes(b"nope")
    config = {
        "run": {"name": "tr", "output": str(tmp_path / "out")},
        "teacher": {"arch": "resnet20", "checkpoint": teacher_checkpoint},
        "synthesizer": {"name": "impression", "iterations": 3, "content_weight": 1e-4},
        "runtime": {"progress": False},
        "plan": {"batch_size": 4, "shard_size": 4},
        "translation": {"source": str(tmp_path / "source"), "target": str(tmp_path / "target")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    assert main(["translate", str(path), "--set", f"translation.target={tmp_path / 'empty'}"]) == 2
    assert "translation.target: " in capsys.readouterr().err
    config["synthesizer"] = {"name": "deepinversion"}
    (tmp_path / "di.yaml").write_text(json.dumps(config))
    assert main(["translate", str(tmp_path / "di.yaml")]) == 2
    assert "synthesizer.name: impression" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    config["synthesizer"] = {"name": "impression", "iterations": 3, "content_weight": 1e-4}
    assert main(["translate", str(path)]) == 0
    assert "wrote 6 images in 2 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "tr" / "translation.json").read_text())
    assert manifest["totals"]["source_skipped"] == 1
    urls = [shard["url"] for shard in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb"))
    assert len(samples) == 6
    assert {s["json"]["source"].rsplit("/", 1)[-1] for s in samples} == {
        f"{i}.png" for i in range(6)
    }
    assert all(set(s["json"]["losses"]) == {"impression", "content", "total"} for s in samples)
    assert all(int(s["cls"]) == int(np.argmax(s["logits.npy"])) for s in samples)
