"""Counterfactual explanations with IMAGINE (Eq. 13).

"Why is the query x^q class A and not class B?" Answer with an image: the query with the
B-discriminant region of an example x⁰ of class B translated into the query's region.
The :class:`~synthesizers.imagine.Imagine` synthesizer does it when the guidance holds
``query_images``: x̂ starts from the query, y* is class B, and Eq. 9's distribution
matching is replaced by

    R_cou = ‖r^q ⊙ (x^q − x̂)‖₁ + R_dm((1 − r^q) ⊙ x̂; (1 − r^0) ⊙ x⁰, Φ)

with Φ all of IMAGINE's layers. The paper's masks r are 1 *outside* the regions; here the
user gives region masks that are 1 *inside* (what one draws), so r = 1 − region. The L1
term (``counterfactual_weight``) sums over the pixels of each image, in the teacher's
normalised space; masking is done there too (outside a region, the mean colour).
Computing the regions automatically is out of scope: they are inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from synthesizers.imagine import Imagine, ImagineConfig
from synthesizers.parametrisation import normalise
from synthesizers.spec import SynthesisResult, SynthesisSpec


def counterfactual(
    teacher: nn.Module,
    query: torch.Tensor,
    query_region: torch.Tensor,
    example: torch.Tensor,
    example_region: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    config: ImagineConfig | None = None,
    seed: int = 0,
    target_class: int | None = None,
    variations: int = 1,
    device: torch.device | str | None = None,
) -> SynthesisResult:
    """``variations`` counterfactual images of ``query`` (C, H, W) in [0, 1].

    ``example`` (C, H, W) is an image of the counterfactual class; ``query_region`` and
    ``example_region`` are 0/1 masks ((H, W), 1 inside the region). The class is
    ``target_class``, or by default the teacher's prediction on ``example``.
    """
    if query.ndim != 3 or example.ndim != 3:
        raise ValueError("query and example must be single (C, H, W) images")
    synthesizer = Imagine(teacher, config, device)
    if target_class is None:
        with torch.no_grad():
            inputs = normalise(example.unsqueeze(0).float(), mean, std).to(synthesizer.device)
            target_class = int(synthesizer.teacher(inputs).argmax(dim=1))
    guidance = {
        "query_images": query.unsqueeze(0).expand(variations, -1, -1, -1),
        "query_regions": query_region,
        "target_images": example.unsqueeze(0).expand(variations, -1, -1, -1),
        "target_regions": example_region,
    }
    labels = torch.full((variations,), target_class, dtype=torch.int64)
    spec = SynthesisSpec(labels, tuple(query.shape), seed, tuple(mean), tuple(std), guidance)
    return synthesizer.synthesize(spec)
