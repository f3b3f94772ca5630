"""The artifacts directory: safe path resolution, validators and byte ranges of served files.

``GET /boot/files/{path}`` serves kernels, initrds and OS images (hundreds of MB) from
``[regional.boot] artifacts_dir``. Nothing here reads a whole file: files are streamed in
chunks (:func:`stream`), and checksums are computed chunk by chunk in a worker thread.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from lpmosd.errors import NotFoundError, ValidationError

#: Bytes read per chunk while streaming (large: fewer thread hops per byte).
CHUNK_BYTES: Final = 1024 * 1024
#: The checksum sidecar beside each file.
CHECKSUM_SUFFIX: Final = ".sha256"

#: One segment of an artifact path: a plain name that cannot be "." or "..".
_SEGMENT_RE: Final = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]{1,255}", re.ASCII)
_MAX_PATH: Final = 1024


def check_artifact_path(path: str) -> str:
    """``path`` if it is relative and made of plain names, else ValidationError(field="path")."""
    parts = path.split("/")
    if not path or len(path) > _MAX_PATH or not all(_SEGMENT_RE.fullmatch(p) for p in parts):
        raise ValidationError(
            "path must be a relative path of plain names (letters, digits, '.', '_', '-')",
            field="path",
        )
    return path


def resolve(root: Path, path: str) -> Path:
    """The regular file ``path`` names inside ``root``; NotFoundError for anything else.

    Checked twice: the name itself (no ``..``, no absolute path, no odd characters) and
    where it really leads (a symlink pointing out of ``root`` is refused too).
    """
    check_artifact_path(path)
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise NotFoundError(f"no artifact {path!r}", field="path")
    return target


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the validators and ranges of one file are computed from."""

    size: int
    mtime: float
    etag: str

    @property
    def last_modified(self) -> str:
        """The HTTP date of the last modification."""
        return email.utils.formatdate(self.mtime, usegmt=True)


def file_info(st: os.stat_result) -> FileInfo:
    """Validators from a stat: the ETag changes with the inode, size and mtime."""
    if not stat.S_ISREG(st.st_mode):
        raise NotFoundError("not a regular file", field="path")
    etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
    return FileInfo(size=st.st_size, mtime=st.st_mtime, etag=etag)


class RangeNotSatisfiable(Exception):
    """A Range that lies wholly outside the file (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single byte range ``[start, end)`` a ``Range`` header asks for, or None for the
    whole file (no header, a malformed one, or several ranges: RFC 9110 lets a server
    ignore those). RangeNotSatisfiable when the range starts beyond the end."""
    if header is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header, re.ASCII)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, end


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` / ``If-Range`` list names ``etag`` (weak comparison)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


async def stream(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    """Yield bytes ``[start, end)`` of ``path`` in chunks, reading in a worker thread.

    The file is opened once; a file replaced meanwhile keeps being served from the open
    inode, so a download never mixes two versions.
    """
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    try:
        offset = start
        while offset < end:
            n = min(CHUNK_BYTES, end - offset)
            chunk = await trio.to_thread.run_sync(os.pread, fd, n, offset)
            if not chunk:
                break  # truncated meanwhile: the client sees a short body and retries
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumCache:
    """SHA-256 sidecars computed on demand for files that ship without one, cached by the
    file's ETag (a changed file gets a fresh sum) and computed once even when asked for
    by many machines at the same time."""

    def __init__(self) -> None:
        self._sums: dict[tuple[Path, str], str] = {}
        self._locks: dict[Path, trio.Lock] = {}

    async def sidecar(self, path: Path, info: FileInfo) -> bytes:
        """The ``sha256sum`` line of ``path``: ``<hex>  <basename>\\n``."""
        lock = self._locks.setdefault(path, trio.Lock())
        async with lock:
            key = (path, info.etag)
            digest = self._sums.get(key)
            if digest is None:
                digest = await trio.to_thread.run_sync(sha256_file, path)
                self._sums = {k: v for k, v in self._sums.items() if k[0] != path}
                self._sums[key] = digest
        return f"{digest}  {path.name}\n".encode()
