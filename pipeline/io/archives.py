"""Tar members are checked before anything is read from them, in every reader.

dreamshard never extracts an archive to disk, but a member's name becomes a key, a class
folder or a path in a manifest, and a link or a device has no bytes of its own: so only
plain files (and folders) with relative paths that stay inside the archive are accepted.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

from pipeline.errors import InputError


class UnsafeArchive(InputError):
    """A tar member with an absolute path, a ``..`` component, or that is not a plain
    file or folder (a symbolic or hard link, a device, a FIFO)."""


def check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Raise :class:`UnsafeArchive` naming ``archive`` and the member unless it is safe."""
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchive(
            f"{archive}: unsafe tar member {name!r} (an absolute path or '..'); "
            "the archive is refused"
        )
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or special file"
        raise UnsafeArchive(
            f"{archive}: unsafe tar member {name!r} ({kind}; only plain files are read); "
            "the archive is refused"
        )


def tar_files(stream: IO[bytes], archive: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every plain file of the tar read from ``stream``, in order,
    each member checked first; names lose a leading ``./``. Every tar reader uses this."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            check_member(member, archive)
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            yield member.name.removeprefix("./"), handle.read() if handle is not None else b""
