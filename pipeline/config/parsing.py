"""YAML and ``--set`` overrides turned into the section dataclasses, once, at the edge.

Unknown keys, wrong types and impossible values raise :class:`InputError` naming the
field. :func:`load_config` also resolves the config (absolute paths, ``{date}`` in the
run name); :func:`parse_config` only validates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.resolution import resolve
from pipeline.config.sections import OPTIONAL_SECTIONS, SECTIONS, Config, SynthesizerSection
from pipeline.errors import InputError
from pipeline.keypaths import assign
from pipeline.models.archs import architecture_names
from synthesizers import get_synthesizer, synthesizer_names


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    now: dt.datetime | None = None,
) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides, validate everything, and
    resolve it (absolute local paths; ``{date}`` in ``run.name`` as of ``now``, UTC)."""
    return resolve(parse_config(read_config_data(path, overrides)), now)


def read_config_data(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """A YAML config file as a mapping of sections, with ``key.path=value`` overrides
    applied (not yet validated)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise InputError(f"config {path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise InputError(f"config {path}: not UTF-8 text ({error.reason})") from error
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise InputError(f"config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"config {path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``data``; the value is parsed as YAML (``1``, ``[1, 2]``)."""
    assign(data, override, "--set")


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a plain mapping into a :class:`Config`."""
    unknown = sorted(set(data) - {*SECTIONS, "synthesizer", *OPTIONAL_SECTIONS})
    if unknown:
        raise InputError(
            f"unknown config section {unknown[0]!r}; valid sections: "
            f"{', '.join([*SECTIONS, 'synthesizer', *OPTIONAL_SECTIONS])}"
        )
    sections = {
        name: build(cls, _mapping(data.get(name), name), name) for name, cls in SECTIONS.items()
    }
    for name, cls in OPTIONAL_SECTIONS.items():
        if data.get(name) is not None:
            sections[name] = build(cls, _mapping(data[name], name), name)
    config = Config(
        synthesizer=_synthesizer(_mapping(data.get("synthesizer"), "synthesizer")), **sections
    )
    check_method(config)
    bad = [c for c in config.classes if not 0 <= c < config.teacher.num_classes]
    if bad:
        raise InputError(
            f"plan.classes: {bad} outside the teacher's "
            f"{config.teacher.num_classes} classes (0 … "
            f"{config.teacher.num_classes - 1})"
        )
    return config


def check_method(config: Config) -> None:
    """What the chosen synthesizer needs from the teacher and the metadata section."""
    method = get_synthesizer(config.synthesizer.name)
    if method.needs_batchnorm and config.teacher.fuse_bn:
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} matches the statistics stored in batch-norm "
            "layers, and teacher.fuse_bn removes them; use synthesizer.name=class-conditional, "
            "which collects its own statistics (metadata section), or set teacher.fuse_bn=false"
        )
    student_arch = getattr(config.synthesizer.params, "student_arch", "")
    known = student_arch.startswith("torchvision:") or student_arch in architecture_names()
    if student_arch and not known:
        raise InputError(
            f"synthesizer.student_arch: unknown architecture {student_arch!r}; valid "
            f"names: {', '.join(architecture_names())}, torchvision:<name>"
        )
    if method.uses_target_images and config.metadata.scenario != "seeds":
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} makes variations of target images: set "
            "metadata.scenario=seeds and metadata.source to a folder of them (or one image)"
        )
    if config.metadata.scenario == "seeds" and not method.uses_metadata:
        raise InputError(
            f"metadata.scenario=seeds guides a method that matches statistics "
            f"(class-conditional); {config.synthesizer.name!r} does not"
        )


def check_inversion(config: Config) -> None:
    """What an inversion run (``dreamshard run`` without a translation section) needs
    beyond a valid config: statistics for a method that matches them. Checked before
    anything runs; ``retrieve`` and ``translate`` never invert and skip it."""
    method = get_synthesizer(config.synthesizer.name)
    if method.uses_metadata and not config.metadata.configured:
        raise InputError(
            f"synthesizer {config.synthesizer.name!r} needs feature statistics: set "
            "metadata.source (class folders, or seed images with metadata.scenario) "
            "or metadata.artifact"
        )


def _synthesizer(data: dict[str, Any]) -> SynthesizerSection:
    data = dict(data)
    name = data.pop("name", None)
    if not isinstance(name, str):
        raise InputError(
            f"synthesizer.name is required; valid names: {', '.join(synthesizer_names())}"
        )
    try:
        method = get_synthesizer(name)
    except KeyError as error:
        raise InputError(f"synthesizer.name: {error.args[0]}") from error
    return SynthesizerSection(name, build(method.config_class, data, "synthesizer"))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a mapping of fields, got {type(value).__name__}")
    return value


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from ``data``, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise InputError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: {error}") from error


SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (converting lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], where)
    if hint is Any:
        return value
    if origin is typing.Literal:
        return choice(value, args, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, _mapping(value, where), where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint in SCALARS:
        accepted, description = SCALARS[hint]
        # bool is an int in Python; a YAML `true` is never a number here
        if not isinstance(value, accepted) or (isinstance(value, bool) and hint is not bool):
            if hint is str and isinstance(value, bool):
                description += " (YAML reads a bare yes/no/on/off as a boolean: quote it)"
            raise InputError(f"{where}: expected {description}, got {value!r}")
        return float(value) if hint is float else value
    raise InputError(f"{where}: unsupported field type {hint}")


SWITCH_WORDS = ("on", "off")


def choice(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    """One of a ``Literal``'s ``choices``.

    YAML 1.1 (PyYAML) reads a bare ``on``/``off``/``yes``/``no`` as a boolean, so
    ``--set synthesizer.compile=off`` arrives as ``False``. A field whose choices include
    both ``"on"`` and ``"off"`` is a switch: a boolean means exactly those words there, and
    is taken back as ``"on"``/``"off"``. Other fields keep refusing a boolean (``run.name:
    no`` must not quietly become ``"off"``).
    """
    if isinstance(value, bool) and all(word in choices for word in SWITCH_WORDS):
        value = "on" if value else "off"
    if isinstance(value, bool) or value not in choices:
        raise InputError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value
