"""Images a synthesizer's config names by URL (IMAGINE's shape and style images),
loaded once per actor and handed to the synthesizer as guidance.

A method lists such config fields in ``Synthesizer.image_fields``; each set field is
read from its fsspec URL, converted to RGB and resized to the teacher's size, and
becomes ``guidance[field]``, a (3, S, S) tensor in [0, 1]. A missing or undecodable
file is an :class:`InputError` naming the field and the URL; the run checks them
before it writes anything.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.io.images import decode
from pipeline.io.storage import read_bytes
from synthesizers import get_synthesizer


def guidance_images(config: Config) -> dict[str, torch.Tensor]:
    """``{field: (3, S, S) float image in [0, 1]}`` for every image field that is set."""
    method = get_synthesizer(config.synthesizer.name)
    options: dict[str, Any] = config.run.storage_options
    images = {}
    for field in method.image_fields:
        url = getattr(config.synthesizer.params, field, None)
        if not url:
            continue
        where = f"synthesizer.{field} {url}"
        try:
            data = read_bytes(url, options)
        except (FileNotFoundError, IsADirectoryError) as error:
            raise InputError(f"{where}: no such file") from error
        except OSError as error:
            raise InputError(f"{where}: cannot be read ({error})") from error
        pixels = decode(data, where, config.teacher.image_size)  # RGB uint8 (S, S, 3)
        images[field] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
    return images
