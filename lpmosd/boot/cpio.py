"""A minimal newc ("070701") cpio writer: the per-boot credential initrd.

The Linux kernel unpacks every initrd it is given over the same initramfs, so a second,
tiny archive adds files to the installer without touching its image or the kernel command
line. Uncompressed newc is what the kernel always accepts.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

_MAGIC: Final = b"070701"
_TRAILER: Final = "TRAILER!!!"


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: a directory (``data`` None) or a regular file."""

    path: str
    mode: int
    data: bytes | None = None


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, name: str, mode: int, data: bytes, mtime: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(mode) else 1,  # nlink
        mtime,
        len(data),
        0,  # devmajor
        0,  # devminor
        0,  # rdevmajor
        0,  # rdevminor
        len(encoded),
        0,  # check (unused by newc)
    )
    header = _MAGIC + b"".join(b"%08x" % f for f in fields)
    head = header + encoded
    return head + _pad4(len(head)) + data + _pad4(len(data))


def write_newc(entries: Iterable[Entry], *, mtime: int = 0) -> bytes:
    """The archive of ``entries`` (paths relative, no leading ``/``), with its trailer."""
    out: list[bytes] = []
    for ino, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or ".." in entry.path.split("/"):
            raise ValueError(f"cpio member path must be relative and plain: {entry.path!r}")
        kind = stat.S_IFDIR if entry.data is None else stat.S_IFREG
        out.append(_member(ino, entry.path, kind | entry.mode, entry.data or b"", mtime))
    out.append(_member(0, _TRAILER, 0, b"", 0))
    return b"".join(out)


#: Where the installer finds its enrolment secret (see BOOT-CONTRACT / the README).
SECRET_PATH: Final = "etc/lpmosd/enrollment-secret"


def credential_archive(secret: str) -> bytes:
    """The credential initrd: ``/etc/lpmosd/enrollment-secret`` (0600, no newline)."""
    return write_newc(
        [
            Entry("etc", 0o755),
            Entry("etc/lpmosd", 0o700),
            Entry(SECRET_PATH, 0o600, secret.encode()),
        ]
    )
