"""Resolving a validated config once, at the edge: local paths made absolute (Ray
workers run in other folders) and ``{date}`` / ``{datetime}`` in ``run.name`` filled in.

The name is resolved once: ``dreamshard submit`` resolves it on the submitting machine
and sends the resolved config, so a job that waits in a queue past midnight keeps the
night it was submitted for. A resolved config resolves to itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from pipeline.config.sections import Config
from pipeline.errors import InputError
from pipeline.io.storage import absolute
from synthesizers import get_synthesizer

PLACEHOLDERS = {
    "date": "%Y-%m-%d",
    "datetime": "%Y%m%dT%H%M%SZ",
}


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def resolve(config: Config, now: dt.datetime | None = None) -> Config:
    """``config`` with absolute local paths and its run name resolved."""
    return resolve_run_name(absolute_paths(config), now)


def resolve_name(name: str, now: dt.datetime | None = None) -> str:
    """``name`` with ``{date}``/``{datetime}`` filled in (UTC); other names unchanged.

    A resolved name holds no braces, so resolving it again changes nothing.
    """
    now = (now or utc_now()).astimezone(dt.timezone.utc)

    def fill(match: re.Match) -> str:
        field = match.group(1)
        if field not in PLACEHOLDERS:
            raise InputError(
                f"run.name {name!r}: unknown placeholder {{{field}}}; valid: "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            )
        return now.strftime(PLACEHOLDERS[field])

    resolved = re.sub(r"\{([^{}]*)\}", fill, name)
    if "{" in resolved or "}" in resolved:
        raise InputError(f"run.name {name!r}: unbalanced brace (placeholders are {{date}}, …)")
    return resolved


def resolve_run_name(config: Config, now: dt.datetime | None = None) -> Config:
    """``config`` with ``run.name`` resolved (a no-op for a name without placeholders)."""
    name = resolve_name(config.run.name, now)
    if name == config.run.name:
        return config
    return dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))


def absolute_paths(config: Config) -> Config:
    """Every local path the config names made absolute (Ray workers run in other folders):
    the output, the teacher's and verifier's checkpoints, the metadata source or artifact,
    the retrieval and translation sets, and the image files the method's config names."""

    def local(url: str | None) -> str | None:
        return url if url is None else absolute(url)

    params = config.synthesizer.params
    images = {
        name: local(getattr(params, name))
        for name in get_synthesizer(config.synthesizer.name).image_fields
        if getattr(params, name, None)
    }
    verifier = config.filter.verifier
    if verifier is not None:
        verifier = dataclasses.replace(verifier, checkpoint=local(verifier.checkpoint))
    m, r, t = config.metadata, config.retrieval, config.translation
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, output=local(config.run.output)),
        teacher=dataclasses.replace(config.teacher, checkpoint=local(config.teacher.checkpoint)),
        synthesizer=dataclasses.replace(
            config.synthesizer, params=dataclasses.replace(params, **images)
        ),
        filter=dataclasses.replace(config.filter, verifier=verifier),
        metadata=dataclasses.replace(m, source=local(m.source), artifact=local(m.artifact)),
        retrieval=r
        if r is None
        else dataclasses.replace(r, pool=local(r.pool), labeled=local(r.labeled)),
        translation=t
        if t is None
        else dataclasses.replace(t, source=local(t.source), target=local(t.target)),
    )
