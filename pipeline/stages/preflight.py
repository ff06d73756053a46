"""What a run checks before it writes anything: the one place both ``dreamshard run``
and ``run --dry-run`` go through."""

from __future__ import annotations

from pipeline.config import Config, check_inversion
from pipeline.io.storage import check_writable
from pipeline.models.teachers import Teacher, load_teacher, load_verifier
from pipeline.stages.guidance import guidance_images
from pipeline.stages.statistics import feature_layers


def preflight(config: Config) -> Teacher:
    """The loaded teacher, once everything a user can get wrong is checked: the method's
    needs, an output that cannot be written (probed with a temporary file in an existing
    folder, or a bucket listing), the teacher and verifier checkpoints, layer names and
    the image files the synthesizer names. Raises :class:`InputError`."""
    options = config.run.storage_options
    if config.translation is None:
        check_inversion(config)
    check_writable(config.run.output, options)
    teacher = load_teacher(config.teacher, options)
    if config.filter.verifier is not None:  # the workers load it: a bad one fails here first
        load_verifier(config.filter.verifier, options)
    if config.translation is None:
        feature_layers(config, teacher.model)  # unknown layer names
        guidance_images(config)  # image files the synthesizer config names
    return teacher
