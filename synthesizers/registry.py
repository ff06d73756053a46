"""The one dict of synthesizers, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from synthesizers.base import Synthesizer

SYNTHESIZERS: dict[str, type[Synthesizer]] = {}
T = TypeVar("T", bound=type[Synthesizer])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a synthesizer available under ``name``."""

    def decorate(cls: T) -> T:
        if name in SYNTHESIZERS:
            raise ValueError(f"synthesizer {name!r} registered twice")
        cls.name = name
        SYNTHESIZERS[name] = cls
        return cls

    return decorate


def synthesizer_names() -> list[str]:
    return sorted(SYNTHESIZERS)


def get_synthesizer(name: str) -> type[Synthesizer]:
    """The class registered as ``name``; a KeyError listing the valid names otherwise."""
    try:
        return SYNTHESIZERS[name]
    except KeyError:
        raise KeyError(
            f"unknown synthesizer {name!r}; valid names: {', '.join(synthesizer_names())}"
        ) from None
