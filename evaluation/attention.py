"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): besides the teacher's logits,
the student matches the teacher's spatial attention maps (the channel mean of squared
activations, L2-normalised) at every feature-map size both networks have.

Logits hold ten numbers per image; the maps tell the student where in the image the
teacher's evidence sits at each depth, which a small (or synthetic) training set states
far less often than the full data would. The levels are
:func:`synthesizers.feature_pyramid.find_pyramid`'s (per spatial size, the module that
last produced it), so any two CNNs pair up without naming layers; widths may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from synthesizers.feature_pyramid import find_pyramid, tap_outputs


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): mean over channels of the squared activations, unit L2."""
    return F.normalize(features.pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """½ Σ over the paired levels of the mean squared difference of the attention maps
    (the paper's loss without its weight β)."""
    pairs = zip(student, teacher, strict=True)
    terms = [(attention_map(s) - attention_map(t)).pow(2).mean() for s, t in pairs]
    return 0.5 * torch.stack(terms).sum()


class AttentionTransfer:
    """The paired feature levels of ``student`` and ``teacher`` for (C, H, W) inputs."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, image_shape: tuple[int, int, int]
    ) -> None:
        mine, theirs = _levels(student, image_shape), _levels(teacher, image_shape)
        sizes = [size for size in mine if size in theirs]  # shallowest first
        if not sizes:
            raise ValueError(
                f"train.attention: the student's feature maps ({sorted(mine)}) and the "
                f"teacher's ({sorted(theirs)}) share no spatial size"
            )
        student_modules = dict(student.named_modules())
        teacher_modules = dict(teacher.named_modules())
        self.student = [student_modules[mine[size]] for size in sizes]
        self.teacher = [teacher_modules[theirs[size]] for size in sizes]
        self.pairs = [(mine[size], theirs[size]) for size in sizes]

    @contextmanager
    def tapped(self) -> Iterator[Callable[[], torch.Tensor]]:
        """Inside the block, calling the yielded function gives :func:`attention_loss` of
        the last forward passes of both networks."""
        with ExitStack() as stack:
            student = stack.enter_context(tap_outputs(self.student))
            teacher = stack.enter_context(tap_outputs(self.teacher))
            yield lambda: attention_loss(student, teacher)


def _levels(network: nn.Module, image_shape: tuple[int, int, int]) -> dict[tuple[int, int], str]:
    """Each feature-map size of ``network`` and the module that gives it, found by a probing
    forward pass in eval mode (a batch of zeros must not move the batch norms' statistics);
    the network is left in the mode it was in."""
    was_training = network.training
    network.eval()
    try:
        return {level.size: level.name for level in find_pyramid(network, image_shape)}
    finally:
        network.train(was_training)
