"""Streaming the OS image from the regional onto the new root.

The image (``.tar.zst``) goes straight from the HTTP response into ``tar --zstd -x``: no
copy on a disk or in memory. Its sha256 is computed on the way and compared with the
regional's ``.sha256`` file at the end; a mismatch fails the step. After a network error
the download resumes where it stopped with ``Range: bytes=N-`` (a server that ignores
Range answers 200: the bytes already written are skipped). Progress is bytes done / total.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import subprocess
from pathlib import Path
from typing import Final

import httpx
import trio

from lpmosd.agent.actions.context import ActionContext, ActionError

__all__ = ["fetch_sha256", "stream_image"]

log = logging.getLogger("lpmosd.agent")

#: Consecutive failed attempts (no byte gained) before the step gives up.
MAX_ATTEMPTS: Final = 8
_CHUNK: Final = 256 * 1024
_CONTENT_RANGE_RE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_HEX_RE: Final = re.compile(r"^[0-9a-f]{64}$")


def _client(ctx: ActionContext) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ctx.ca_file)) if ctx.ca_file is not None else True
    )
    return httpx.AsyncClient(
        base_url=ctx.regional_url.rstrip("/"),
        verify=verify,
        timeout=httpx.Timeout(30.0),
        headers={"User-Agent": "lpmosd-agent"},
    )


def files_url(path: str) -> str:
    """The regional's URL path of an artifact."""
    return "/boot/files/" + path.lstrip("/")


async def fetch_sha256(ctx: ActionContext, http: httpx.AsyncClient, image: str) -> str:
    """The expected digest from ``<image>.sha256`` (sha256sum format)."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            resp = await http.get(files_url(image + ".sha256"))
        except httpx.TransportError as exc:
            await ctx.say(f"base_system: {image}.sha256: {exc}; retrying")
            await trio.sleep(min(2**attempt, 15))
            continue
        if resp.status_code != 200:
            raise ActionError(f"{image}.sha256: HTTP {resp.status_code} from the regional")
        digest = resp.text.split()[0].lower() if resp.text.split() else ""
        if not _HEX_RE.match(digest):
            raise ActionError(f"{image}.sha256: not a sha256 digest")
        return digest
    raise ActionError(f"{image}.sha256: the regional did not answer")


async def stream_image(ctx: ActionContext, image: str, into: Path) -> int:
    """Download ``image`` and extract it into ``into``; returns the bytes received."""
    async with _client(ctx) as http:
        expected = await fetch_sha256(ctx, http, image)
        proc = await trio.lowlevel.open_process(
            [
                "tar",
                "--zstd",
                "-x",
                "-p",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-C",
                str(into),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdin is not None and proc.stdout is not None
        output = bytearray()

        async def collect() -> None:
            assert proc.stdout is not None
            while chunk := await proc.stdout.receive_some(65536):
                output.extend(chunk[: max(0, 65536 - len(output))])

        hasher = hashlib.sha256()
        done = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            try:
                done = await _download(ctx, http, image, hasher, proc.stdin)
            finally:
                await proc.stdin.aclose()
            code = await proc.wait()
        tar_out = output.decode("utf-8", errors="replace").splitlines()
        if tar_out:
            await ctx.say(*tar_out[-50:])
        digest = hasher.hexdigest()
        if digest != expected:
            raise ActionError(f"{image}: sha256 {digest} does not match {expected}")
        if code != 0:
            raise ActionError(f"tar exited with {code} extracting {image}")
        await ctx.say(f"base_system: {image}: {done} bytes, sha256 {digest} verified")
        return done


async def _download(
    ctx: ActionContext,
    http: httpx.AsyncClient,
    image: str,
    hasher: hashlib._Hash,
    sink: trio.abc.SendStream,
) -> int:
    done = 0
    total: int | None = None
    failures = 0
    while True:
        headers = {"Range": f"bytes={done}-"} if done else {}
        gained = 0
        try:
            async with http.stream("GET", files_url(image), headers=headers) as resp:
                skip = 0
                if resp.status_code == 206:
                    m = _CONTENT_RANGE_RE.match(resp.headers.get("content-range", ""))
                    if m is None or int(m.group(1)) != done:
                        raise ActionError(f"{image}: bad Content-Range in a resumed download")
                    if m.group(3) != "*":
                        total = int(m.group(3))
                elif resp.status_code == 200:
                    skip = done  # the server ignored Range: drop what we already have
                    length = resp.headers.get("content-length")
                    total = int(length) if length and length.isdigit() else total
                else:
                    raise ActionError(f"{image}: HTTP {resp.status_code} from the regional")
                async for chunk in resp.aiter_bytes(_CHUNK):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    hasher.update(chunk)
                    try:
                        await sink.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise ActionError(f"tar stopped reading {image}") from None
                    done += len(chunk)
                    gained += len(chunk)
                    if total:
                        await ctx.progress(
                            done * 100 // total, f"{done >> 20} of {total >> 20} MiB"
                        )
            if total is not None and done < total:
                raise httpx.ReadError(f"connection closed at {done} of {total} bytes")
            return done
        except httpx.TransportError as exc:
            failures = 0 if gained else failures + 1
            if failures >= MAX_ATTEMPTS:
                raise ActionError(f"{image}: download failed at byte {done}: {exc}") from None
            await ctx.say(f"base_system: {image}: {exc}; resuming at byte {done}")
            log.warning("image download interrupted", extra={"done": done, "error": str(exc)})
            await trio.sleep(min(2**failures, 15) if failures else 0.5)
