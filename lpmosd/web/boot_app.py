"""The boot routes of the regional (on its agent port): a thin HTTP layer over
:class:`lpmosd.boot.service.BootService` and :mod:`lpmosd.boot.artifacts`.

- ``GET /boot.ipxe``: the entry script DHCP/TFTP chain-loads.
- ``GET /boot/{mac}.ipxe``: the per-MAC decision script (always a script, never a 404:
  a 404 strands a machine in its firmware).
- ``GET /boot/{mac}/credentials.cpio``: the per-boot credential initrd.
- ``GET|HEAD /boot/files/{path}``: kernels, initrds and images from ``artifacts_dir``,
  streamed, with Range, ETag/Last-Modified and a ``.sha256`` beside each file.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from quart import Response, request
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.boot.artifacts import (
    CHECKSUM_SUFFIX,
    RangeNotSatisfiable,
    etag_matches,
    file_info,
    parse_range,
    resolve,
    stream,
)
from lpmosd.boot.scripts import check_base_url, entry_script
from lpmosd.boot.service import BootService, firmware_fact
from lpmosd.errors import NotFoundError, ValidationError
from lpmosd.web.common import error_response

_IPXE_TYPE = "text/plain; charset=utf-8"
_NO_STORE = {"Cache-Control": "no-store"}


def _base_url(boot: BootService) -> str:
    """The regional's URL as the booting machine reached it (or as configured)."""
    if boot.config.boot.public_url:
        return boot.config.boot.public_url
    try:
        return check_base_url(f"{request.scheme}://{request.host}")
    except ValidationError:
        raise ValidationError("the Host header is not a plain host[:port]", field="host") from None


def _script(text: str) -> Response:
    return Response(text, status=200, content_type=_IPXE_TYPE, headers=_NO_STORE)


def _mac(raw: str) -> str:
    return schema.normalize_mac(raw)


def install_boot_routes(app: QuartTrio, boot: BootService) -> None:
    """Add the boot routes to the regional's app."""

    @app.get("/boot.ipxe")
    async def entry() -> Response:
        return _script(entry_script(_base_url(boot)))

    @app.get("/boot/<mac>.ipxe")
    async def per_mac(mac: str) -> Response:
        facts = {
            name: firmware_fact(request.args.get(name))
            for name in ("uuid", "serial", "platform", "buildarch")
        }
        text, _ = boot.script_for(_mac(mac), _base_url(boot), facts)
        return _script(text)

    @app.get("/boot/<mac>/credentials.cpio")
    async def credentials(mac: str) -> Response:
        archive = await boot.credentials(_mac(mac))
        return Response(
            archive, status=200, content_type="application/octet-stream", headers=_NO_STORE
        )

    @app.route("/boot/files/<path:path>", methods=["GET", "HEAD"])
    async def files(path: str) -> Response:
        root = boot.artifacts_dir
        if root is None:
            raise NotFoundError("no artifacts_dir is configured ([regional.boot])", field="path")
        try:
            target = await trio.to_thread.run_sync(resolve, root, path)
        except NotFoundError:
            if not path.endswith(CHECKSUM_SUFFIX):
                raise
            return await _checksum(root, path.removesuffix(CHECKSUM_SUFFIX))
        return await _file(str(target))

    async def _checksum(root: Path, path: str) -> Response:
        target = await trio.to_thread.run_sync(resolve, root, path)
        info = file_info(await trio.to_thread.run_sync(os.stat, target))
        body = await boot.checksums.sidecar(target, info)
        return Response(body, status=200, content_type="text/plain; charset=utf-8")

    async def _file(target: str) -> Response:
        info = file_info(await trio.to_thread.run_sync(os.stat, target))
        headers = {
            "ETag": info.etag,
            "Last-Modified": info.last_modified,
            "Accept-Ranges": "bytes",
        }
        if etag_matches(request.headers.get("If-None-Match"), info.etag):
            return Response(b"", status=304, headers=headers)
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and not (
            etag_matches(if_range, info.etag) or if_range.strip() == info.last_modified
        ):
            range_header = None  # the file changed: send it whole
        try:
            span = parse_range(range_header, info.size)
        except RangeNotSatisfiable:
            response = error_response(416, "range not satisfiable", field="range")
            response.headers["Content-Range"] = f"bytes */{info.size}"
            return response
        start, end = span if span is not None else (0, info.size)
        status = 206 if span is not None else 200
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
        content_type = (
            "text/plain; charset=utf-8"
            if target.endswith(CHECKSUM_SUFFIX)
            else "application/octet-stream"
        )
        if request.method == "HEAD":
            response = Response(b"", status=status, headers=headers, content_type=content_type)
        else:
            response = Response(
                stream(Path(target), start, end),
                status=status,
                headers=headers,
                content_type=content_type,
            )
            # A 250 MB image over a slow link takes minutes: no response deadline.
            response.timeout = None
        response.headers["Content-Length"] = str(end - start)
        return response
