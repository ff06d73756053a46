"""``key.path=value`` assignments, as ``--set`` and ``--storage-option`` take them.

Kept free of heavy imports (yaml only): the command line parses ``--storage-option``
before any stage is imported.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.errors import InputError


def assign(data: dict[str, Any], item: str, flag: str = "--set") -> None:
    """Set ``a.b.c=value`` in ``data`` (sections created as needed). The value is parsed
    as YAML: ``1`` is a number, ``true`` a boolean, ``[1, 2]`` a list, ``{a: 1}`` a
    mapping; an empty value is the empty string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise InputError(f"{flag} {item!r}: expected key.path=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"{flag} {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise InputError(f"{flag} {item!r}: the value is not valid YAML ({error})") from error


def assignments(items: list[str] | tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY.PATH=VALUE`` items as one nested mapping."""
    data: dict[str, Any] = {}
    for item in items:
        assign(data, item, flag)
    return data
