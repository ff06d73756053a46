"""Class-folder image sets (``ROOT/<class>/<file>``) from a folder or an archive.

The root is any fsspec URL. A path that runs through a ``.tar``, ``.tar.gz`` or ``.tgz``
names a folder inside that archive: ``data/cifar10-jpeg.tar.gz/cifar10-jpeg/test``.
A class's index is the position of its folder name in sorted order.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputError
from pipeline.io.archives import tar_files
from pipeline.io.storage import filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
ARCHIVE = re.compile(r"^(.*?\.(?:tar\.gz|tgz|tar))(?:/(.*))?$")
MAX_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs


@dataclass
class ImageFolder:
    """The files of a class-folder image set, sorted by class then by name."""

    url: str
    classes: list[str]
    files: list[tuple[str, int]]  # (path in the source, class index)
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # archive contents
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def subset(self, per_class: int | None = None) -> ImageFolder:
        """The first ``per_class`` files of each class, by name (deterministic)."""
        if per_class is None:
            return self
        counts: dict[int, int] = {}
        chosen = []
        for path, label in self.files:
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                chosen.append((path, label))
        return ImageFolder(self.url, self.classes, chosen, self.blobs, self.storage_options)

    def read(self, path: str) -> bytes:
        if path in self.blobs:
            return self.blobs[path]
        fs, _ = filesystem(self.url, self.storage_options)
        with fs.open(path, "rb") as f:
            return f.read()

    def load(self, image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as uint8 (N, 3, H, W) and their labels (N,), resized if asked."""
        arrays = [decode(self.read(path), path, image_size) for path, _ in self.files]
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise InputError(
                f"{self.url}: images have different sizes {sorted(sizes)[:3]}; "
                "give an image size to resize them"
            )
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)
        return images, labels


def decode(data: bytes, name: str, image_size: int | None = None) -> np.ndarray:
    """Image bytes -> RGB uint8 (H, W, 3); InputError naming the file if unreadable."""
    if not data:
        raise InputError(f"{name}: empty image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise InputError(f"{name}: {image.width}x{image.height} is too large")
            image = to_rgb(image)
            if image_size and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as error:  # PIL refuses it before we see its size
        raise InputError(f"{name}: too large ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"{name}: not a readable image ({error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit greyscale is scaled down (PIL's own conversion clips
    every value above 255 to white); every other mode (CMYK, palette, L, LA, RGBA) is
    PIL's conversion, which drops alpha."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        bits = 16 if image.mode.startswith("I;16") or values.max(initial=0) < 65536 else 32
        grey = np.clip(values >> (bits - 8), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def open_image_folder(
    url: str, storage_options: dict[str, Any] | None = None, min_classes: int = 2
) -> ImageFolder:
    """List a class-folder image set at ``url`` (a folder, or a folder inside an archive)
    holding at least ``min_classes`` classes."""
    entries, blobs = _list(url, storage_options)
    return _index(url, entries, blobs, storage_options, min_classes)


def open_image_files(url: str, storage_options: dict[str, Any] | None = None) -> ImageFolder:
    """Every image under ``url`` (a folder at any depth, a folder inside an archive, or a
    single image file), without classes: each file's label is -1."""
    if url.lower().endswith(IMAGE_SUFFIXES) and not ARCHIVE.match(url):
        fs, path = filesystem(url, storage_options)
        if not fs.isfile(path):
            raise InputError(f"{url}: no such image file")
        return ImageFolder(url, [], [(path, -1)], {}, dict(storage_options or {}))
    entries, blobs = _list(url, storage_options)
    if not entries:
        raise InputError(f"{url}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = [(full, -1) for full, _ in sorted(entries, key=lambda e: e[1])]
    return ImageFolder(url, [], files, blobs, dict(storage_options or {}))


def _list(
    url: str, storage_options: dict[str, Any] | None
) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """``(full path, path relative to the root)`` of every image under ``url``, and the
    contents of those read from an archive."""
    match = ARCHIVE.match(url)
    if match:
        return _from_archive(match.group(1), (match.group(2) or "").strip("/"), storage_options)
    fs, root = filesystem(url, storage_options)
    if not fs.isdir(root):
        raise InputError(f"{url}: no such folder")
    paths = [p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES)]
    return [(p, p[len(root.rstrip("/")) + 1 :]) for p in paths], {}


def _from_archive(
    archive: str, inner: str, options: dict[str, Any] | None
) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    fs, path = filesystem(archive, options)
    if not fs.exists(path):
        raise InputError(f"{archive}: no such file")
    prefix = f"{inner}/" if inner else ""
    blobs: dict[str, bytes] = {}
    with fs.open(path, "rb") as raw:
        for name, data in tar_files(raw, archive):
            if name.startswith(prefix) and name.lower().endswith(IMAGE_SUFFIXES):
                blobs[name] = data
    return [(name, name[len(prefix) :]) for name in blobs], blobs


def _index(
    url: str,
    entries: list[tuple[str, str]],
    blobs: dict[str, bytes],
    options: dict[str, Any] | None,
    min_classes: int = 2,
) -> ImageFolder:
    """Build the class list from ``(full path, path relative to the root)`` pairs."""
    by_class: dict[str, list[str]] = {}
    for full, relative in entries:
        parts = relative.split("/")
        if len(parts) == 2:
            by_class.setdefault(parts[0], []).append(full)
    if len(by_class) < min_classes:
        raise InputError(
            f"{url}: found {len(by_class)} class folder(s) holding images; expected "
            f"ROOT/<class>/<image> with at least {min_classes} class(es)"
        )
    classes = sorted(by_class)
    files = [(path, index) for index, name in enumerate(classes) for path in sorted(by_class[name])]
    return ImageFolder(url, classes, files, blobs, dict(options or {}))


def contact_sheet(
    rows: list[list[np.ndarray]], size: int, columns: int, scale_to: int = 256
) -> bytes:
    """PNG bytes of a grid: one row per list of (size, size, 3) uint8 images, ``columns``
    wide, white padding, enlarged (nearest) so that an image is about ``scale_to`` px."""
    pad = 2
    sheet = np.full(
        (len(rows) * (size + pad) + pad, columns * (size + pad) + pad, 3), 255, np.uint8
    )
    for row, images in enumerate(rows):
        for column, image in enumerate(images[:columns]):
            y, x = pad + row * (size + pad), pad + column * (size + pad)
            sheet[y : y + size, x : x + size] = image
    scale = max(1, scale_to // max(size, 1))
    picture = Image.fromarray(sheet).resize(
        (sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
