"""The synthesizer protocol, the shared loop and DeepInversion, on a tiny BN teacher."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from synthesizers import (
    SYNTHESIZERS,
    Parametrisation,
    Stage,
    SynthesisSpec,
    Synthesizer,
    SynthesizerConfig,
    build_synthesizer,
    get_synthesizer,
    synthesizer_names,
)
from synthesizers.deepinversion import DeepInversionConfig
from synthesizers.hooks import (
    batchnorm_layers,
    capture_input_statistics,
    capture_statistics,
    conv_layers,
    named_layers,
)
from synthesizers.loop import weighted_total
from synthesizers.losses import (
    channel_statistics,
    fused_sample_moments,
    l2_prior,
    sample_moments,
    total_variation,
    total_variation_l1,
)
from synthesizers.parametrisation import PixelImages, normalise

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_teacher(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    return model.eval()


def spec(seed: int = 1, batch: int = 8) -> SynthesisSpec:
    return SynthesisSpec(torch.arange(batch) % 4, (3, 16, 16), seed, MEAN, STD)


def metadata_guidance(synth: Synthesizer, classes: int = 4, seed: int = 3) -> dict:
    """Per-class statistics of the layers ``synth`` reads, from random "source" images."""
    torch.manual_seed(seed)
    images, labels = torch.rand(4 * classes, 3, 16, 16), torch.arange(4 * classes) % classes
    layers = synth.feature_layers()
    with torch.no_grad(), capture_statistics(layers, synth.feature_side) as records:
        synth.teacher((images - torch.tensor(MEAN).view(1, 3, 1, 1)) / 0.25)
        statistics = {r.name: r.per_class(labels, classes)[:2] for r in records}
    return {"class_statistics": statistics}


def test_registry_lists_valid_names_on_unknown() -> None:
    assert "deepinversion" in synthesizer_names()
    with pytest.raises(KeyError, match="valid names: .*deepinversion"):
        get_synthesizer("deep-inversion")


@pytest.mark.parametrize("keep_best", [False, True])
@pytest.mark.parametrize("name", sorted(SYNTHESIZERS))
def test_every_registered_synthesizer_runs_two_iterations(name: str, keep_best: bool) -> None:
    method = get_synthesizer(name)
    config = method.config_class(iterations=2, keep_best=keep_best)
    synth = build_synthesizer(name, tiny_teacher(), config)
    request = spec()
    if method.uses_metadata:
        request.guidance.update(metadata_guidance(synth))
    if method.uses_target_images:  # image-guided methods (imagine): one target per sample
        request.guidance["target_images"] = torch.rand(8, 3, 16, 16)
    result = synth.synthesize(request)
    assert result.images.shape == (8, 3, 16, 16)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert torch.allclose(result.images * 255, (result.images * 255).round(), atol=1e-4)
    assert result.probs.shape == (8, 4)
    assert torch.allclose(result.probs.sum(1), torch.ones(8), atol=1e-5)
    assert result.iterations == 2
    assert "total" in result.losses and all(math.isfinite(v) for v in result.losses.values())
    assert graph_holders(synth) == []  # nothing of the last step's graph is kept


def graph_holders(obj: object, path: str = "synth", seen: set[int] | None = None) -> list[str]:
    """Paths of the tensors reachable from ``obj``'s attributes that require gradients or
    hold an autograd graph (modules: their parameters and buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path] if obj.requires_grad or obj.grad_fn is not None else []
    if isinstance(obj, nn.Module):
        tensors = [*obj.named_parameters(), *obj.named_buffers()]
        return [f"{path}.{n}" for n, t in tensors if t.requires_grad or t.grad_fn is not None]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif type(obj).__module__.startswith(("synthesizers", "test_")) and hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return []
    return [h for key, value in items for h in graph_holders(value, f"{path}.{key}", seen)]


def test_deepinversion_returns_every_term_and_teacher_stays_frozen() -> None:
    teacher = tiny_teacher()
    before = [p.clone() for p in teacher.parameters()]
    synth = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=3))
    result = synth.synthesize(spec())
    assert set(result.losses) == {"ce", "bn", "tv", "l2", "total"}
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not teacher.training


def test_same_seed_same_images_different_seed_different() -> None:
    synth = build_synthesizer("deepinversion", tiny_teacher(), DeepInversionConfig(iterations=3))
    first, again, other = (
        synth.synthesize(spec(1)),
        synth.synthesize(spec(1)),
        synth.synthesize(spec(2)),
    )
    assert torch.equal(first.images, again.images)
    assert first.losses == again.losses
    assert not torch.equal(first.images, other.images)


def test_a_smooth_start_has_low_frequencies_only_and_reaches_the_loop() -> None:
    from synthesizers.parametrisation import Start

    def neighbour_difference(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    torch.manual_seed(0)
    noise, smooth = Start("noise").draw(64, (3, 32, 32)), Start("smooth").draw(64, (3, 32, 32))
    assert noise.shape == smooth.shape == (64, 3, 32, 32)
    assert smooth.std().item() == pytest.approx(1.0, rel=1e-4)
    assert neighbour_difference(noise) == pytest.approx(2 / math.sqrt(math.pi), rel=0.02)
    assert neighbour_difference(smooth) < neighbour_difference(noise) / 3
    with pytest.raises(ValueError, match="init must be one of noise, smooth"):
        DeepInversionConfig(init="blobs")

    quiet = {"iterations": 1, "lr": 1e-6, "jitter": 0, "flip": False, "clip": False}
    plain = build_synthesizer("deepinversion", tiny_teacher(), DeepInversionConfig(**quiet))
    config = DeepInversionConfig(**quiet, init="smooth")
    started = build_synthesizer("deepinversion", tiny_teacher(), config)
    norm = torch.tensor(STD).view(1, 3, 1, 1)
    plain_images = plain.synthesize(spec(batch=32)).images / norm
    smooth_images = started.synthesize(spec(batch=32)).images / norm
    assert neighbour_difference(smooth_images) < neighbour_difference(plain_images) / 2


def test_the_start_scale_and_tint_set_the_pattern_and_each_images_colour() -> None:
    from synthesizers.parametrisation import Start

    def colour_spread(x: torch.Tensor) -> float:  # std over images of each mean colour
        return float(x.mean(dim=(2, 3)).std(dim=0).mean())

    torch.manual_seed(0)
    plain = Start("smooth").draw(256, (3, 32, 32))
    scaled = Start("smooth", scale=0.5).draw(256, (3, 32, 32))
    tinted = Start("smooth", scale=0.5, tint=0.5).draw(256, (3, 32, 32))
    assert scaled.std().item() == pytest.approx(0.5, rel=1e-4)
    assert colour_spread(plain) < 0.3
    assert colour_spread(tinted) == pytest.approx(0.5, abs=0.06)
    assert colour_spread(tinted) > 3 * colour_spread(scaled)
    with pytest.raises(ValueError, match="init_scale must be positive"):
        DeepInversionConfig(init_scale=0.0)
    with pytest.raises(ValueError, match="init_tint must be non-negative"):
        DeepInversionConfig(init_tint=-0.1)

    quiet = {"iterations": 1, "lr": 1e-6, "jitter": 0, "flip": False, "clip": False}
    config = DeepInversionConfig(**quiet, init="smooth", init_scale=0.5, init_tint=0.5)
    images = build_synthesizer("deepinversion", tiny_teacher(), config).synthesize(spec(batch=64))
    norm = torch.tensor(STD).view(1, 3, 1, 1)
    assert colour_spread(images.images / norm) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_the_start_correlation_makes_colour_channels_vary_together(kind: str) -> None:
    from synthesizers.parametrisation import Start

    def correlations(x: torch.Tensor) -> torch.Tensor:  # between channels, off the diagonal
        matrix = torch.corrcoef(x.transpose(0, 1).reshape(3, -1))
        return matrix[torch.triu_indices(3, 3, 1).unbind()]

    torch.manual_seed(0)
    independent = Start(kind).draw(128, (3, 32, 32))
    correlated = Start(kind, correlation=0.9).draw(128, (3, 32, 32))
    assert correlations(independent).abs().max() < 0.05
    assert torch.allclose(correlations(correlated), torch.full((3,), 0.9), atol=0.02)
    assert torch.allclose(correlated.std((0, 2, 3)), independent.std((0, 2, 3)), rtol=0.03)
    with pytest.raises(ValueError, match=r"init_correlation must be in \[0, 1\)"):
        DeepInversionConfig(init_correlation=1.0)

    quiet = {"iterations": 1, "lr": 1e-6, "jitter": 0, "flip": False, "clip": False}
    config = DeepInversionConfig(**quiet, init=kind, init_correlation=0.9)
    images = build_synthesizer("deepinversion", tiny_teacher(), config).synthesize(spec(batch=64))
    norm = torch.tensor(STD).view(1, 3, 1, 1)  # the channels' correlation survives to the images
    assert correlations(images.images / norm).min() > 0.85


def test_the_spectrum_starts_where_pixels_do_and_moves_low_frequencies_first() -> None:
    from synthesizers.parametrisation import PixelImages, SpectralImages, Start

    def frequencies(size: int) -> torch.Tensor:
        rows, columns = torch.fft.fftfreq(size) * size, torch.fft.rfftfreq(size) * size
        return (rows[:, None] ** 2 + columns[None, :] ** 2).sqrt()

    def step(images: Parametrisation, push: torch.Tensor) -> torch.Tensor:
        before = images().detach().clone()
        optimiser = torch.optim.Adam(images.parameters(), lr=0.05)
        (images() * push).sum().backward()  # the same gradient for every pixel's frequency
        optimiser.step()
        return images().detach() - before

    shape, start = (3, 32, 32), Start("smooth")
    torch.manual_seed(0)
    pixels = PixelImages(16, shape, MEAN, STD, clip=False, start=start)
    torch.manual_seed(0)
    spectral = SpectralImages(16, shape, MEAN, STD, clip=False, start=start, decay=1.0)
    assert torch.allclose(spectral(), pixels(), atol=1e-5)
    assert [name for name, _ in spectral.named_parameters()] == ["coefficients"]
    push = torch.randn(16, *shape)
    f = frequencies(32)
    for images, high_over_low in ((pixels, (0.7, 1.5)), (spectral, (0.0, 0.2))):
        change = torch.fft.rfft2(step(images, push), norm="ortho").abs()
        ratio = change[..., f > 8].mean() / change[..., (f >= 1) & (f <= 2)].mean()
        assert high_over_low[0] < ratio < high_over_low[1]

    clipped = SpectralImages(4, shape, MEAN, STD, init=torch.full((4, *shape), 0.5), decay=2.0)
    with torch.no_grad():
        clipped.coefficients.mul_(1e3)
    clipped.project()
    unit = clipped.to_unit(clipped())
    assert unit.min() > -1e-4 and unit.max() < 1 + 1e-4 and clipped().abs().max() > 1.5
    with pytest.raises(ValueError, match=r"spectrum must be a decay in \[0, 4\]"):
        DeepInversionConfig(spectrum=-1.0)
    teacher = tiny_teacher()
    config = {"lr": 0.1, "spectrum": 1.0}
    short = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=1, **config))
    long = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=60, **config))
    assert long.synthesize(spec()).losses["total"] < short.synthesize(spec()).losses["total"]


def test_the_blur_augmentation_gives_each_image_its_own_gaussian_from_the_loops_draws() -> None:
    from synthesizers.loop import gaussian_blur

    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16, requires_grad=True)
    sigmas = torch.tensor([0.0, 0.5, 1.0, 2.0])
    out = gaussian_blur(images, sigmas)
    assert torch.allclose(out[0], images[0], atol=1e-6)  # sigma 0 (clamped to 1e-3)
    energy = [(x[..., 1:] - x[..., :-1]).abs().mean().item() for x in out]
    assert energy[0] > energy[1] > energy[2] > energy[3]  # more blur, less fine detail
    out.sum().backward()  # differentiable in the images
    assert torch.allclose(images.grad.sum((1, 2, 3)), torch.full((4,), 768.0), rtol=1e-4)
    assert torch.equal(gaussian_blur(images, torch.zeros(4)), images)
    with pytest.raises(ValueError, match=r"blur is a largest sigma in \[0, 4\]"):
        DeepInversionConfig(blur=5.0)

    config = DeepInversionConfig(jitter=0, flip=False, blur=1.5)
    synthesizer = build_synthesizer("deepinversion", tiny_teacher(), config)
    batch = torch.randn(6, 3, 16, 16)
    rng = random.Random(7)
    drawn = torch.tensor([rng.uniform(0, 1.5) for _ in range(6)])
    augmented = synthesizer.augment(batch, random.Random(7))
    assert torch.allclose(augmented, gaussian_blur(batch, drawn))
    assert drawn.std() > 0.2 and not torch.allclose(augmented, batch)


def test_a_compiled_step_compiles_once_and_its_batch_norm_stores_no_traced_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # seen on one H200 (compile on, CUDA graphs): the affine batch norm cast its scale and
    # shift inside the compiled step and kept them; the graph returned them as extra
    # outputs, the next replay overwrote them, and reading them stopped the run
    from torch._dynamo.testing import CompileCounter

    from synthesizers.affine import affine_batchnorm

    counter, original = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: original(fn, backend=counter))
    config = DeepInversionConfig(iterations=3, compile="on", affine_batchnorm=True)
    synth = build_synthesizer("deepinversion", tiny_teacher(), config, torch.device("cpu"))
    for seed in range(3):
        synth.synthesize(spec(seed=seed))
    assert counter.frame_count == 1  # one compilation serves every iteration and batch

    layer = tiny_teacher()[1]
    graphs: list[torch.fx.GraphModule] = []
    x = torch.randn(2, 8, 4, 4)
    with affine_batchnorm([layer]):
        got = original(layer, backend=lambda gm, _: graphs.append(gm) or gm.forward)(x)
    (output,) = [node for node in graphs[0].graph.nodes if node.op == "output"]
    assert len(output.args[0]) == 1  # the result alone
    assert torch.allclose(got, layer(x), atol=1e-5)


def test_the_kept_iterate_owns_its_terms_when_the_step_reuses_its_outputs() -> None:
    # a step compiled with CUDA graphs writes every iteration's terms into the same
    # memory: the first kept iterate must be a copy, not a view of the step's outputs
    from synthesizers.loop import LoopRecord

    run = LoopRecord()
    terms, total = {"ce": torch.tensor(2.0)}, torch.tensor(3.0)
    run.keep_if_best(torch.zeros(1, 3, 2, 2), terms, total)
    terms["ce"].fill_(9.0), total.fill_(9.0)  # the next replay overwrites them
    assert float(run.best["ce"]) == 2.0 and float(run.best["total"]) == 3.0
    run.keep_if_best(torch.ones(1, 3, 2, 2), terms, total)  # 9 > 3: the first stays
    assert float(run.best["total"]) == 3.0 and float(run.best_images.sum()) == 0.0


def test_optimisation_lowers_the_loss() -> None:
    teacher = tiny_teacher()
    short = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=1))
    long = build_synthesizer("deepinversion", teacher, DeepInversionConfig(iterations=60, lr=0.1))
    assert long.synthesize(spec()).losses["total"] < short.synthesize(spec()).losses["total"]


@pytest.mark.parametrize(
    "name", sorted(name for name, cls in SYNTHESIZERS.items() if cls.needs_batchnorm)
)
def test_methods_reading_batch_norm_refuse_a_teacher_without_it(name: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=f"{name} matches batch-norm .*class-conditional"):
        build_synthesizer(name, model)


def test_methods_that_need_no_batch_norm_are_the_ones_that_say_so() -> None:
    needing = {name for name, cls in SYNTHESIZERS.items() if cls.needs_batchnorm}
    assert {"deepinversion", "adi", "natural-inversion"} <= needing
    assert "class-conditional" not in needing


def test_config_rejects_bad_values_and_wrong_config_type() -> None:
    with pytest.raises(ValueError, match="iterations"):
        DeepInversionConfig(iterations=0)
    with pytest.raises(ValueError, match="precision"):
        DeepInversionConfig(precision="fp8")
    with pytest.raises(TypeError, match="DeepInversionConfig"):
        build_synthesizer("deepinversion", tiny_teacher(), SynthesizerConfig())


def test_hooks_capture_statistics_and_are_always_removed() -> None:
    teacher = tiny_teacher()
    layers = batchnorm_layers(teacher)
    assert len(layers) == 2
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(RuntimeError, match="boom"), capture_input_statistics(layers) as records:
        teacher(x)
        assert records[0].mean.shape == (8,) and records[1].var.shape == (8,)
        expected_mean, expected_var = channel_statistics(teacher[0](x))
        assert torch.allclose(records[0].mean, expected_mean, atol=1e-5)
        assert torch.allclose(records[0].var, expected_var, atol=1e-5)
        raise RuntimeError("boom")
    assert all(not module._forward_hooks for _, module in layers)


def test_per_class_and_per_sample_statistics_match_direct_computation() -> None:
    teacher = tiny_teacher()
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([2, 0, 2, 2, 0, 1])
    conv = conv_layers(teacher)[0]
    with capture_statistics([conv], side="output") as (record,):
        teacher(x)
        output = conv[1](x)
        mean, var, counts = record.per_class(labels, num_classes=4)
        assert counts.tolist() == [2, 1, 3, 0]
        for c in range(3):
            expected_mean, expected_var = channel_statistics(output[labels == c])
            assert torch.allclose(mean[c], expected_mean, atol=1e-5)
            assert torch.allclose(var[c], expected_var, atol=1e-4)
        assert not mean[3].any() and not var[3].any()
        sample_mean, sample_var = record.per_sample()
        expected_mean, expected_var = channel_statistics(output[4:5])
        assert torch.allclose(sample_mean[4], expected_mean, atol=1e-5)
        assert torch.allclose(sample_var[4], expected_var, atol=1e-4)
    with pytest.raises(KeyError, match="valid layers"):
        named_layers(teacher, ["0", "nope"])


def test_weighted_total_needs_a_weight_for_every_term() -> None:
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    assert weighted_total(terms, {"a": 1.0, "b": 0.5}).item() == pytest.approx(3.5)
    with pytest.raises(KeyError, match="b"):
        weighted_total(terms, {"a": 1.0})
    with pytest.raises(ValueError, match="weight 0"):
        weighted_total(terms, {"a": 0.0, "b": 0.0})


def test_total_variation_is_zero_for_a_flat_image_and_positive_otherwise() -> None:
    assert total_variation(torch.ones(2, 3, 8, 8)).item() == 0
    assert total_variation(torch.rand(2, 3, 8, 8)).item() > 0


def test_pixels_are_projected_into_the_valid_range() -> None:
    pixels = PixelImages(2, (3, 8, 8), MEAN, STD)
    with torch.no_grad():
        pixels.pixels.mul_(100)
    pixels.project()
    unit = pixels.pixels * pixels.std + pixels.mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="labels"):
        SynthesisSpec(torch.tensor([]), (3, 8, 8), 0, MEAN, STD)
    with pytest.raises(ValueError, match="mean and std"):
        SynthesisSpec(torch.tensor([0]), (3, 8, 8), 0, (0.5,), (0.5,))


class NoiseGenerator(Parametrisation):
    """A tiny conditional generator: what NaturalInversion optimises instead of pixels."""

    def __init__(self, spec: SynthesisSpec) -> None:
        super().__init__(spec.mean, spec.std)
        self.register_buffer("z", torch.randn(len(spec.labels), 4, *spec.image_shape[1:]))
        self.net = nn.Conv2d(4, spec.image_shape[0], 3, padding=1)

    def forward(self) -> torch.Tensor:
        return self.net(self.z)


class TwoStageMethod(Synthesizer):
    """Generator parametrisation, two stages, an auxiliary critic, guidance input."""

    config_class = SynthesizerConfig

    def setup(self) -> None:
        super().setup()
        self.seen: list[tuple[str, float]] = []
        self.critic_steps = 0

    def prepare(self, spec: SynthesisSpec) -> None:
        self.target = spec.guidance["target_images"]
        self.critic = nn.Linear(3, 1)
        self.critic_optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)

    def parametrise(self, spec: SynthesisSpec) -> Parametrisation:
        self.generator = NoiseGenerator(spec)
        self.initial = [p.detach().clone() for p in self.generator.parameters()]
        return self.generator

    def stages(self) -> list[Stage]:
        return [Stage("warm", 2), Stage("adversarial", 3)]

    def weights(self, stage: Stage) -> dict[str, float]:
        return {"ce": 1.0, "match": 0.5, "critic": 0.0 if stage.name == "warm" else 1.0}

    def loss_terms(self, ctx) -> dict[str, torch.Tensor]:
        self.seen.append((ctx.stage.name, self.weights(ctx.stage)["critic"]))
        critic_score = self.critic(ctx.images.mean(dim=(2, 3))).mean()
        return {
            "ce": torch.nn.functional.cross_entropy(ctx.logits.float(), ctx.labels),
            "match": (ctx.images - self.target).pow(2).mean(),
            "critic": -critic_score,
        }

    def after_step(self, ctx) -> None:  # the auxiliary network's own step, alternately
        loss = self.critic(ctx.images.detach().mean(dim=(2, 3))).mean()
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        self.critic_steps += 1


def test_the_base_admits_generators_stages_auxiliary_networks_and_guidance() -> None:
    method = TwoStageMethod(tiny_teacher(), SynthesizerConfig(iterations=3, lr=0.01))
    request = spec()
    request.guidance["target_images"] = torch.zeros(8, 3, 16, 16)
    result = method.synthesize(request)
    assert result.iterations == 5 and method.critic_steps == 5
    assert method.seen == [("warm", 0.0)] * 2 + [("adversarial", 1.0)] * 3
    assert set(result.losses) == {"ce", "match", "critic", "total"}
    moved = [
        not torch.equal(a, b)
        for a, b in zip(method.initial, method.generator.parameters(), strict=True)
    ]
    assert all(moved)  # the generator, not pixels, was optimised
    assert result.images.shape == (8, 3, 16, 16)


def test_no_method_defines_a_constructor_and_setup_runs_once_per_build() -> None:
    """The base owns construction; a method (and the ADI mixin) fills in setup()."""
    import inspect

    for cls in SYNTHESIZERS.values():
        for klass in cls.__mro__:
            if klass is not Synthesizer and klass.__module__.startswith("synthesizers."):
                assert "__init__" not in vars(klass), f"{klass.__name__} defines __init__"
    assert inspect.signature(Synthesizer.__init__).parameters.keys() == {
        "self",
        "teacher",
        "config",
        "device",
    }

    calls: list[str] = []

    class Counting(get_synthesizer("adi")):  # a mixin and a method under it
        def setup(self) -> None:
            super().setup()
            calls.append("setup")

    synth = Counting(tiny_teacher(), get_synthesizer("adi").config_class(iterations=1))
    assert calls == ["setup"]
    assert synth.bn_layers and synth.student is None  # DeepInversion's and the mixin's


def test_one_normaliser_for_every_synthesizer() -> None:
    import synthesizers

    images = torch.rand(2, 3, 4, 4)
    expected = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalise(images, MEAN, STD), expected)
    assert torch.allclose(PixelImages(2, (3, 4, 4), MEAN, STD).normalise(images), expected)
    package = Path(synthesizers.__file__).parent
    for path in package.glob("*.py"):
        text = path.read_text()
        assert "_normaliser" not in text, path.name
        if path.name != "parametrisation.py":  # where the one normaliser lives
            assert "view(1, -1, 1, 1)" not in text, path.name


@pytest.mark.parametrize("moments", [sample_moments, fused_sample_moments])
def test_statistics_keep_a_small_variance_under_a_large_mean(moments) -> None:
    """Features of mean 1,000 and standard deviation 0.1: E[x²] − E[x]² in float32 keeps
    nothing of the variance (E[x²] ≈ 1e6 has a resolution of about 0.06); the centred
    moments combined with the parallel formula keep it to float32 rounding."""
    torch.manual_seed(0)
    reference = 1000.0 + 0.1 * torch.randn(6, 4, 8, 8, dtype=torch.float64)
    reference += torch.arange(6, dtype=torch.float64).view(6, 1, 1, 1) * 0.05  # means differ
    labels = torch.tensor([0, 1, 0, 1, 1, 2])
    layer = nn.Identity()
    with capture_statistics([("id", layer)], "output", moments) as (record,):
        layer(reference.float())
        batch_var = reference.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(record.var.double(), batch_var, rtol=1e-3, atol=0)
        _, sample_var = record.per_sample()
        expected = reference.var(dim=(2, 3), unbiased=False)
        torch.testing.assert_close(sample_var.double(), expected, rtol=1e-3, atol=0)
        _, class_var, _ = record.per_class(labels, 3)
        for k in range(3):
            expected = reference[labels == k].var(dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(class_var[k].double(), expected, rtol=1e-3, atol=0)


def test_only_2d_batch_norm_is_hooked() -> None:
    """A BatchNorm1d head (on pooled vectors) is neither matched nor breaks the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(8),
        nn.Linear(8, 4),
    ).eval()
    assert [name for name, _ in batchnorm_layers(model)] == ["1"]
    synth = build_synthesizer("deepinversion", model, DeepInversionConfig(iterations=2))
    assert len(synth.feature_layers()) == 1
    assert math.isfinite(synth.synthesize(spec()).losses["bn"])


class LearningRates(get_synthesizer("deepinversion")):
    """DeepInversion that records the image learning rate of every step."""

    def setup(self) -> None:
        super().setup()
        self.rates: list[float] = []

    def optimizer(self, parametrisation, stage):
        self.current = super().optimizer(parametrisation, stage)
        return self.current

    def after_step(self, ctx) -> None:
        self.rates.append(self.current.param_groups[0]["lr"])  # the next step's rate


def test_deepinversion_presets_are_the_authors_two_scripts() -> None:
    cifar = DeepInversionConfig()
    assert cifar.preset == "cifar"
    assert (cifar.betas, cifar.lr_schedule, cifar.warmup) == ((0.9, 0.999), "constant", 0)
    assert (cifar.flip, cifar.clip, cifar.jitter, cifar.lr) == (False, False, 2, 0.05)
    assert (cifar.bn_weight, cifar.tv_weight, cifar.l2_weight) == (10.0, 2.5e-5, 0.0)
    imagenet = DeepInversionConfig(preset="imagenet")
    assert (imagenet.betas, imagenet.lr_schedule, imagenet.warmup) == ((0.5, 0.9), "cosine", 100)
    assert (imagenet.flip, imagenet.clip, imagenet.l2_per_image) == (True, True, True)
    assert imagenet.first_bn_multiplier == 10.0
    with pytest.raises(
        ValueError, match="unknown preset 'cifar10'; valid presets: cifar, imagenet"
    ):
        DeepInversionConfig(preset="cifar10")
    # what the user sets wins over the preset
    mixed = DeepInversionConfig(preset="imagenet", flip=False, lr=0.1, warmup=0)
    assert (mixed.flip, mixed.lr, mixed.warmup, mixed.clip) == (False, 0.1, 0, True)
    assert get_synthesizer("adi").config_class(preset="imagenet").warmup == 100


def test_the_presets_drive_the_loop() -> None:
    teacher = tiny_teacher()
    constant = LearningRates(teacher, DeepInversionConfig(iterations=4))
    result = constant.synthesize(spec())
    assert constant.rates == [0.05] * 4
    assert set(result.losses) == {"ce", "bn", "tv", "l2", "total"}
    config = DeepInversionConfig(preset="imagenet", iterations=104, jitter=2)
    warm = LearningRates(teacher, config)
    result = warm.synthesize(spec())
    assert warm.rates[0] == pytest.approx(0.25 * 2 / 100)  # after step 0: step 1's rate
    assert warm.rates[98] == pytest.approx(0.25)  # step 99, the last of the warm-up
    assert warm.rates[99] == pytest.approx(0.25)  # step 100: the cosine starts at lr
    assert warm.rates[100] < 0.25
    assert set(result.losses) == {"ce", "bn", "tv", "tv_l1", "l2", "total"}
    # the CIFAR script neither flips nor clips
    image = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    jitterless = build_synthesizer("deepinversion", teacher, DeepInversionConfig(jitter=0))
    rng = random.Random(0)
    assert all(torch.equal(jitterless.augment(image, rng), image) for _ in range(20))
    pixels = jitterless.parametrise(spec())
    with torch.no_grad():
        pixels.pixels.mul_(100)
    before = pixels.pixels.clone()
    pixels.project()
    assert torch.equal(pixels.pixels, before)


def test_per_image_l2_and_tv_l1() -> None:
    x = torch.zeros(2, 1, 2, 2)
    x[0] = 3.0  # image 0 has norm 6, image 1 norm 0
    assert l2_prior(x).item() == pytest.approx(6.0)
    assert l2_prior(x, per_image=True).item() == pytest.approx(3.0)
    ramp = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    # |dx| = 1 everywhere, dy = 0, both diagonals 1
    assert total_variation_l1(ramp).item() == pytest.approx(3.0)


class Tracing(get_synthesizer("deepinversion")):
    """DeepInversion that records every iterate it computes a loss on, with the total."""

    def setup(self) -> None:
        super().setup()
        self.trace: list[tuple[float, torch.Tensor]] = []

    def forward_loss(self, ctx, weights):
        terms, total = super().forward_loss(ctx, weights)
        self.trace.append((float(total.detach()), ctx.images.detach().clone()))
        return terms, total


def test_keep_best_returns_the_lowest_loss_iterate_of_the_batch() -> None:
    """Per batch, as the authors' CIFAR scripts: the whole batch at the iteration whose
    total loss was lowest (the images that loss was computed on, before their step)."""
    fields = {"iterations": 12, "lr": 0.5, "precision": "fp32", "channels_last": False}
    assert SynthesizerConfig().keep_best is False  # the last iterate unless asked
    kept = Tracing(tiny_teacher(), DeepInversionConfig(keep_best=True, **fields))
    result = kept.synthesize(spec())
    totals = [total for total, _ in kept.trace]
    best = min(range(len(totals)), key=totals.__getitem__)
    assert best < len(totals) - 1  # the run's loss went up again: the test means something
    pixels = kept.parametrise(spec())  # the normalisation, to map the kept iterate back
    expected = (pixels.to_unit(kept.trace[best][1]) * 255).round() / 255
    assert torch.equal(result.images, expected)
    assert result.losses["total"] == pytest.approx(totals[best], rel=1e-6)
    last = Tracing(tiny_teacher(), DeepInversionConfig(**fields)).synthesize(spec())
    assert not torch.equal(last.images, result.images)
    assert last.losses["total"] == pytest.approx(totals[-1], rel=1e-6)
