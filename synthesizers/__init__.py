"""Model-inversion methods. Imports torch only: no I/O, no Ray.

Every method is registered by name in :data:`SYNTHESIZERS`; build one with
:func:`build_synthesizer` and call ``synthesize(SynthesisSpec(...))``.
"""

from __future__ import annotations

import torch
from torch import nn

from synthesizers import (  # noqa: F401  (each module registers its method)
    adi,
    class_conditional,
    deepinversion,
    imagine,
    impression,
    natural_inversion,
)
from synthesizers.base import Synthesizer
from synthesizers.parametrisation import Parametrisation, PixelImages
from synthesizers.registry import SYNTHESIZERS, get_synthesizer, register, synthesizer_names
from synthesizers.spec import (
    Stage,
    StepContext,
    SynthesisResult,
    SynthesisSpec,
    SynthesizerConfig,
)

__all__ = [
    "SYNTHESIZERS",
    "Parametrisation",
    "PixelImages",
    "Stage",
    "StepContext",
    "SynthesisResult",
    "SynthesisSpec",
    "Synthesizer",
    "SynthesizerConfig",
    "build_synthesizer",
    "get_synthesizer",
    "register",
    "synthesizer_names",
]


def build_synthesizer(
    name: str,
    teacher: nn.Module,
    config: SynthesizerConfig | None = None,
    device: torch.device | str | None = None,
) -> Synthesizer:
    """Build the synthesizer registered as ``name`` around a teacher."""
    return get_synthesizer(name)(teacher, config, device)
