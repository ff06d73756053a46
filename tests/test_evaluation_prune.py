"""L1 filter pruning with torch-pruning on the registry's architectures (no Ray)."""

from __future__ import annotations

import pytest
import torch

from evaluation.prune import prune_model, residual_stream_convs
from pipeline.models.archs import build_architecture


def test_option_a_resnet_keeps_its_residual_stream_and_the_highest_l1_filters() -> None:
    torch.manual_seed(0)
    model = build_architecture("resnet20", 10).eval()
    block = model.layer2[1]
    norms = block.conv1.weight.abs().sum(dim=(1, 2, 3))  # L1 norm per output filter
    kept_expected = norms.argsort(descending=True)[:16].sort().values
    survivors = block.conv1.weight[kept_expected]
    pruned = prune_model(model, 0.5, 32)
    assert pruned.layer2[1].conv1.out_channels == 16 == pruned.layer2[1].conv2.in_channels
    assert torch.equal(pruned.layer2[1].conv1.weight, survivors)  # the 16 largest, in order
    for conv in residual_stream_convs(pruned):  # stem and every block's conv2: whole
        assert conv.out_channels in (16, 32, 64)
    assert model.layer2[1].conv1.out_channels == 32  # the original is untouched
    assert pruned(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["vgg11_bn_cifar", "resnet18_cifar"])
def test_other_architectures_prune_every_layer_uniformly(arch: str) -> None:
    model = build_architecture(arch, 10).eval()
    assert residual_stream_convs(model) == []
    before = sum(p.numel() for p in model.parameters())
    pruned = prune_model(model, 0.5, 32)
    after = sum(p.numel() for p in pruned.parameters())
    assert 0.2 < after / before < 0.3  # about (1 - 0.5)² of every conv
    assert pruned(torch.rand(2, 3, 32, 32)).shape == (2, 10)
