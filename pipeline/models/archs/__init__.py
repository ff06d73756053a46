"""The architecture registry: one dict from name to builder, plus ``torchvision:<name>``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from pipeline.errors import InputError
from pipeline.models.archs.resnet_cifar import cifar_resnet, resnet_cifar_variant
from pipeline.models.archs.small_cifar import mobilenetv2_cifar, vgg11_bn_cifar, wrn40_2

ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": partial(cifar_resnet, 20),
    "resnet32": partial(cifar_resnet, 32),
    "resnet44": partial(cifar_resnet, 44),
    "resnet56": partial(cifar_resnet, 56),
    "resnet110": partial(cifar_resnet, 110),
    "resnet18_cifar": partial(resnet_cifar_variant, [2, 2, 2, 2]),
    "resnet34_cifar": partial(resnet_cifar_variant, [3, 4, 6, 3]),
    "vgg11_bn_cifar": vgg11_bn_cifar,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "wrn40_2": wrn40_2,
}
TORCHVISION_PREFIX = "torchvision:"


def architecture_names() -> list[str]:
    """Every valid name (torchvision models as the ``torchvision:<name>`` pattern)."""
    return [*ARCHITECTURES, f"{TORCHVISION_PREFIX}<name>"]


def build_architecture(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model of architecture ``name``."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        model_name = name[len(TORCHVISION_PREFIX) :]
        valid = torchvision.models.list_models(module=torchvision.models)
        if model_name not in valid:
            raise InputError(
                f"teacher.arch: unknown torchvision model {model_name!r}; "
                f"torchvision classification models: {', '.join(sorted(valid))}"
            )
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    if name not in ARCHITECTURES:
        raise InputError(
            f"teacher.arch: unknown architecture {name!r}; valid names: "
            f"{', '.join(architecture_names())}"
        )
    return ARCHITECTURES[name](num_classes)
