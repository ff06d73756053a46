"""BN fusion: the fused copy computes the same logits, keeps its module names, and
reports the BNs it cannot fold."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import CIFAR_TAR, RESNET20, shared
from torch import nn

from pipeline.config import TeacherConfig
from pipeline.io.images import open_image_folder
from pipeline.models.accuracy import normalise
from pipeline.models.archs import build_architecture
from pipeline.models.teachers import load_teacher
from synthesizers import build_synthesizer
from synthesizers.deepinversion import DeepInversionConfig
from synthesizers.fuse import fuse_batchnorm, fusion_plan
from synthesizers.hooks import batchnorm_layers, capture_statistics, conv_layers, named_layers

FUSABLE = ["resnet20", "resnet56", "resnet18_cifar", "vgg11_bn_cifar", "mobilenetv2_cifar"]


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the (0, 1) defaults, so that a
    fold that ignored any of them would change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorm_layers(model):
            size = bn.num_features
            bn.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            bn.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return model.eval()


def assert_same_logits(original: nn.Module, fused: nn.Module, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = original(inputs), fused(inputs)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "torchvision:resnet18":  # random weights: nothing is downloaded
        return randomise_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10))
    return randomise_batchnorm(build_architecture(name, 10))


@pytest.mark.parametrize("name", [*FUSABLE, "torchvision:resnet18"])
def test_fused_architecture_gives_the_same_logits_without_any_batchnorm(name: str) -> None:
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_batchnorm(model)
    assert batchnorm_layers(fused) == []
    assert_same_logits(model, fused, torch.randn(4, 3, 32, 32, generator=torch.Generator()))
    # the original is untouched: same tensors, still has its BNs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(batchnorm_layers(model)) == len(fusion_plan(model).pairs) > 0


def test_conv_names_are_kept_and_folded_bns_become_identities() -> None:
    model = make("resnet20")
    fused = fuse_batchnorm(model)
    assert [name for name, _ in conv_layers(fused)] == [name for name, _ in conv_layers(model)]
    assert type(fused) is type(model)
    modules = dict(fused.named_modules())
    assert isinstance(modules["layer2.1.bn2"], nn.Identity)
    conv = modules["layer2.1.conv2"]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    # a hook by name on the fused conv sees what the original BN produced
    inputs = torch.randn(2, 3, 32, 32)
    with (
        capture_statistics(named_layers(model, ["layer2.1.bn2"]), "output") as (expected,),
        capture_statistics(named_layers(fused, ["layer2.1.conv2"]), "output") as (actual,),
        torch.no_grad(),
    ):
        model(inputs), fused(inputs)
        torch.testing.assert_close(actual.mean, expected.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(actual.var, expected.var, rtol=1e-4, atol=1e-4)


def test_wide_resnet_preactivation_bns_are_reported_or_left_with_strict_false() -> None:
    model = make("wrn40_2")
    plan = fusion_plan(model)
    # bn2 of each of the 18 blocks follows conv1; blocks.0.bn1 follows the stem conv;
    # the other pre-activation BNs and the final BN follow a residual sum
    assert sorted(plan.pairs) == sorted(
        [(f"blocks.{i}.conv1", f"blocks.{i}.bn2") for i in range(18)] + [("conv1", "blocks.0.bn1")]
    )
    assert sorted(plan.unfoldable) == sorted([f"blocks.{i}.bn1" for i in range(1, 18)] + ["bn"])
    assert set(plan.unfoldable.values()) == {"its input is the result of add, not a convolution"}
    with pytest.raises(ValueError, match=r"18 batch-norm layers .*blocks\.1\.bn1 .*strict=False"):
        fuse_batchnorm(model)
    fused = fuse_batchnorm(model, strict=False)
    assert [name for name, _ in batchnorm_layers(fused)] == list(plan.unfoldable)
    assert_same_logits(model, fused, torch.randn(4, 3, 32, 32))


class Unusual(nn.Module):
    """BNs that do not fold: on the input, after a ReLU, after a conv whose output is
    also used, called twice; and one that folds."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_input = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)
        self.conv_shared = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_twice = nn.BatchNorm2d(4)
        self.conv_ok = nn.Conv2d(4, 4, 1)
        self.bn_ok = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(self.bn_input(x)))
        x = self.bn_relu(x)
        shared = self.conv_shared(x)
        x = self.bn_shared(shared) + shared
        x = self.bn_twice(self.bn_twice(x))
        return self.bn_ok(self.conv_ok(x))


def test_unfoldable_batchnorms_name_the_reason() -> None:
    model = randomise_batchnorm(Unusual())
    plan = fusion_plan(model)
    assert plan.pairs == [("conv_ok", "bn_ok")]
    assert plan.unfoldable == {
        "bn_input": "its input is the network input, not a convolution",
        "bn_relu": "its input is the result of relu, not a convolution",
        "bn_shared": "the output of conv_shared is also used elsewhere",
        "bn_twice": "called 2 times",
    }
    fused = fuse_batchnorm(model, strict=False)
    assert isinstance(fused.bn_ok, nn.Identity) and isinstance(fused.bn_twice, nn.BatchNorm2d)
    assert_same_logits(model, fused, torch.randn(2, 3, 8, 8))


def test_untraceable_model_is_a_value_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace"):
        fuse_batchnorm(DataDependent())


def test_deepinversion_refuses_a_fused_teacher() -> None:
    fused = fuse_batchnorm(make("resnet20"))
    with pytest.raises(ValueError, match="class-conditional"):
        build_synthesizer("deepinversion", fused, DeepInversionConfig(iterations=1))


def test_shared_pretrained_resnet20_fuses_with_the_same_logits() -> None:
    config = TeacherConfig(arch="resnet20", checkpoint=str(shared(RESNET20)))
    teacher = load_teacher(config).model
    folder = open_image_folder(f"{shared(CIFAR_TAR)}/cifar10-jpeg/test").subset(5)
    images, labels = folder.load()  # (50, 3, 32, 32) uint8
    inputs = normalise(images, config.mean, config.std)
    fused = fuse_batchnorm(teacher)
    assert batchnorm_layers(fused) == [] and len(conv_layers(fused)) == 19
    assert_same_logits(teacher, fused, inputs)
    with torch.no_grad():  # and still a good classifier on real images
        assert (fused(inputs).argmax(1) == labels).float().mean() >= 0.8
