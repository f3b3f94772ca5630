"""A lean HTTP/1.1 server for the regional: hot agent routes answered directly, the rest
handed to the Quart app over ASGI.

Measured on the 2-core machine (``lpmosd bench fleet --profile``): hypercorn + h11 took
30 % of the regional's CPU and Quart 21 %, for requests whose own work (auth, JSON, the
batched etcd write) is a fraction of that. This server parses requests itself (request
line and headers at most :data:`MAX_HEADER_BYTES`; ``Content-Length`` or chunked bodies),
keeps connections alive, and:

- hands a request the ``fast`` router claims (``POST`` to a heartbeat, progress or logs
  URL: :mod:`lpmosd.web.agent_fast`) to it, with a body reader that enforces the body limit;
- serves every other request through the app's ASGI interface (routing, auth, errors, the
  OpenAPI contract, boot files with Range, streamed responses), as hypercorn would.

Plain HTTP only: with a TLS certificate configured the daemon serves with hypercorn.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import trio

from lpmosd.errors import PayloadTooLargeError
from lpmosd.web.common import error_body
from lpmosd.web.server import MAX_HEADER_BYTES

__all__ = ["BodyReader", "FastReply", "FastRouter", "serve_lean"]

log = logging.getLogger("lpmosd.http")

ASGIApp = Callable[..., Awaitable[None]]
_READ = 65536
#: Chunk-size lines and trailers of a chunked body: at most this long each.
_MAX_CHUNK_LINE = 1024


class BadRequest(Exception):
    """The request cannot be parsed: answered 400 (or ``status``) and the connection closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class FastReply:
    """A fast route's answer."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Close the connection after answering (413: the rest of the body is not read).
    close: bool = False


class FastRouter(Protocol):
    """What the lean server asks of the hot-route handler."""

    def match(self, method: bytes, path: bytes) -> Any:
        """A route token when this request is served fast, else None."""

    async def handle(
        self, route: Any, headers: dict[bytes, bytes], client: str, body: BodyReader
    ) -> FastReply:
        """Answer the request."""


class _Conn:
    """One client connection: its stream and what has been read and not used yet."""

    __slots__ = ("buf", "eof", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        """Read more into ``buf``; False at end of stream."""
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def line(self, limit: int) -> bytes:
        """One CRLF-terminated line (without it), at most ``limit`` bytes."""
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > limit:
                raise BadRequest("chunk line too long")
            if not await self.fill():
                raise BadRequest("connection closed inside a chunked body")
        out = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return out


class BodyReader:
    """A request body, read from the connection on demand: ``Content-Length`` or chunked."""

    __slots__ = ("_chunk_left", "_chunked", "_conn", "_left", "done")

    def __init__(self, conn: _Conn, length: int | None, chunked: bool) -> None:
        self._conn = conn
        self._left = length or 0
        self._chunked = chunked
        self._chunk_left = 0
        self.done = not chunked and not self._left

    async def chunk(self) -> bytes:
        """The next piece of the body (b"" once it is all read)."""
        if self.done:
            return b""
        conn = self._conn
        if self._chunked:
            if self._chunk_left == 0:
                size_line = await conn.line(_MAX_CHUNK_LINE)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadRequest("bad chunk size") from None
                if size < 0:
                    raise BadRequest("bad chunk size")
                if size == 0:
                    while await conn.line(_MAX_CHUNK_LINE):  # trailers, until an empty line
                        pass
                    self.done = True
                    return b""
                self._chunk_left = size
            if not conn.buf and not await conn.fill():
                raise BadRequest("connection closed inside a body")
            take = min(self._chunk_left, len(conn.buf))
            out = bytes(conn.buf[:take])
            del conn.buf[:take]
            self._chunk_left -= take
            if self._chunk_left == 0 and await conn.line(_MAX_CHUNK_LINE) != b"":
                raise BadRequest("chunk not followed by CRLF")
            return out
        if not conn.buf and not await conn.fill():
            raise BadRequest("connection closed inside a body")
        take = min(self._left, len(conn.buf))
        out = bytes(conn.buf[:take])
        del conn.buf[:take]
        self._left -= take
        self.done = self._left == 0
        return out

    async def read(self, max_bytes: int) -> bytes:
        """The whole body; :class:`PayloadTooLargeError` beyond ``max_bytes`` (the rest is
        then left unread: the connection is closed after the answer)."""
        if not self._chunked and self._left > max_bytes:
            raise PayloadTooLargeError(f"body over {max_bytes} bytes", field="body")
        parts: list[bytes] = []
        size = 0
        while piece := await self.chunk():
            size += len(piece)
            if size > max_bytes:
                raise PayloadTooLargeError(f"body over {max_bytes} bytes", field="body")
            parts.append(piece)
        return b"".join(parts)

    async def drain(self, limit: int) -> bool:
        """Read and drop what is left of the body, at most ``limit`` bytes: True when the
        connection can carry another request."""
        if not self._chunked and self._left > limit:
            return False
        size = 0
        try:
            while piece := await self.chunk():
                size += len(piece)
                if size > limit:
                    return False
        except BadRequest:
            return False
        return True


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _head(status: int, headers: list[tuple[bytes, bytes]], close: bool) -> bytes:
    out = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
    out.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
    out.append(b"date: " + _date() + b"\r\n")
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _simple(status: int, body: bytes, close: bool, extra: list[tuple[bytes, bytes]]) -> bytes:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *extra,
    ]
    return _head(status, headers, close) + body


@dataclass(slots=True)
class _Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    first: dict[bytes, bytes]
    keep_alive: bool
    length: int | None
    chunked: bool


def _parse_head(head: bytes) -> _Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("unsupported HTTP version", 505)
    if not method.isalpha() or not method.isupper():
        raise BadRequest("malformed method")
    headers: list[tuple[bytes, bytes]] = []
    first: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise BadRequest("malformed header")
        name = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        first.setdefault(name, value)
    conn_tokens = {t.strip() for t in first.get(b"connection", b"").lower().split(b",")}
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in conn_tokens
    else:
        keep_alive = b"keep-alive" in conn_tokens
    length: int | None = None
    chunked = False
    te = first.get(b"transfer-encoding")
    if te is not None:
        if te.lower() != b"chunked" or b"content-length" in first:
            raise BadRequest("unsupported transfer-encoding")
        chunked = True
    else:
        lengths = {v for k, v in headers if k == b"content-length"}
        if len(lengths) > 1:
            raise BadRequest("conflicting content-length")
        if lengths:
            raw = lengths.pop()
            if not raw.isdigit() or len(raw) > 18:
                raise BadRequest("malformed content-length")
            length = int(raw)
    return _Request(method, target, version, headers, first, keep_alive, length, chunked)


class LeanServer:
    """Serves one ASGI app (and an optional fast router) on HTTP/1.1 connections."""

    def __init__(self, app: ASGIApp, fast: FastRouter | None, *, max_body: int) -> None:
        self.app = app
        self.fast = fast
        self.max_body = max_body
        self.host = ""
        self.port = 0

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection until the client or an error closes it."""
        conn = _Conn(stream)
        try:
            peer = stream.socket.getpeername()
            client = (str(peer[0]), int(peer[1]))
        except OSError:
            client = ("unknown", 0)
        try:
            while await self._one(conn, client):
                pass
        except BadRequest as exc:
            await self._send_quietly(conn, _simple(exc.status, error_body(str(exc)), True, []))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    @staticmethod
    async def _send_quietly(conn: _Conn, data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await conn.stream.send_all(data)

    async def _one(self, conn: _Conn, client: tuple[str, int]) -> bool:
        """Serve one request; False when the connection is done."""
        while (end := conn.buf.find(b"\r\n\r\n")) < 0:
            if len(conn.buf) > MAX_HEADER_BYTES:
                raise BadRequest(f"request line and headers over {MAX_HEADER_BYTES} bytes", 431)
            if not await conn.fill():
                if conn.buf.strip():
                    raise BadRequest("connection closed inside a request")
                return False
        if end > MAX_HEADER_BYTES:
            raise BadRequest(f"request line and headers over {MAX_HEADER_BYTES} bytes", 431)
        head = bytes(conn.buf[:end])
        del conn.buf[: end + 4]
        try:
            head.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("non-ASCII request head") from None
        req = _parse_head(head)
        body = BodyReader(conn, req.length, req.chunked)
        if not body.done and req.first.get(b"expect", b"").lower() == b"100-continue":
            # curl waits a second for this before sending a body over 1 KiB.
            await conn.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        path, _, query = req.target.partition(b"?")
        fast = self.fast
        route = fast.match(req.method, path) if fast is not None else None
        if route is not None and fast is not None:
            reply = await fast.handle(route, req.first, client[0], body)
            close = reply.close or not req.keep_alive
            if not close and not body.done:
                close = not await body.drain(self.max_body)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(reply.body)),
                *reply.headers,
            ]
            await conn.stream.send_all(_head(reply.status, headers, close) + reply.body)
            return not close
        return await self._asgi(conn, client, req, path, query, body)

    async def _asgi(
        self,
        conn: _Conn,
        client: tuple[str, int],
        req: _Request,
        path: bytes,
        query: bytes,
        body: BodyReader,
    ) -> bool:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.version[5:].decode(),
            "method": req.method.decode(),
            "scheme": "http",
            "path": unquote_to_bytes(path).decode("utf-8", "replace"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": client,
            "server": (self.host, self.port),
            "extensions": {},
        }
        response_done = trio.Event()
        state = _ResponseState(req.method == b"HEAD", req.keep_alive)

        async def receive() -> dict[str, Any]:
            if not body.done:
                try:
                    data = await body.chunk()
                except BadRequest:
                    state.broken = True
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": data, "more_body": not body.done}
            if not state.sent_body_end:
                state.sent_body_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await response_done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if state.broken:
                return
            try:
                await state.send(conn, message)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                # The client went away: tell the app (it stops, as under hypercorn).
                state.broken = True
            if state.finished or state.broken:
                response_done.set()

        try:
            await self.app(scope, receive, send)
        finally:
            response_done.set()
        if state.broken:
            return False
        if not state.started:
            await conn.stream.send_all(_simple(500, error_body("internal error"), True, []))
            return False
        if not state.finished:
            return False  # the app stopped mid-body: the client sees a short answer
        if state.close:
            return False
        if not body.done:
            return await body.drain(self.max_body)
        return True


class _ResponseState:
    """An ASGI response going out: Content-Length when the app gives it, else chunked."""

    __slots__ = (
        "_start",
        "broken",
        "chunked",
        "close",
        "finished",
        "head_only",
        "keep_alive",
        "sent_body_end",
        "started",
    )

    def __init__(self, head_only: bool, keep_alive: bool) -> None:
        self.head_only = head_only
        self.keep_alive = keep_alive
        self.started = False
        self.finished = False
        self.chunked = False
        self.close = not keep_alive
        self.broken = False
        self.sent_body_end = False
        self._start: dict[str, Any] | None = None

    async def send(self, conn: _Conn, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            return
        if kind != "http.response.body" or self._start is None or self.finished:
            return
        data = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        out = b""
        if not self.started:
            self.started = True
            status = int(self._start["status"])
            headers = [(bytes(k).lower(), bytes(v)) for k, v in self._start.get("headers", [])]
            names = {k for k, _ in headers}
            if b"connection" in names:
                if any(k == b"connection" and v.lower() == b"close" for k, v in headers):
                    self.close = True
                headers = [(k, v) for k, v in headers if k != b"connection"]
            if b"content-length" not in names and status >= 200 and status not in (204, 304):
                if not more:
                    headers.append((b"content-length", b"%d" % len(data)))
                elif not self.head_only:
                    self.chunked = True
                    headers.append((b"transfer-encoding", b"chunked"))
            out = _head(status, headers, self.close)
        if not self.head_only and data:
            out += b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        if not more:
            self.finished = True
            if self.chunked and not self.head_only:
                out += b"0\r\n\r\n"
        if out:
            await conn.stream.send_all(out)


async def serve_lean(
    app: ASGIApp,
    fast: FastRouter | None,
    *,
    host: str,
    port: int,
    max_body: int,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the URL it listens on (the real port when 0)."""
    server = LeanServer(app, fast, max_body=max_body)
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
    sockname = listeners[0].socket.getsockname()
    server.host, server.port = str(sockname[0]), int(sockname[1])
    bind_host = f"[{server.host}]" if ":" in server.host else server.host
    async with trio.open_nursery() as nursery:
        await nursery.start(_lifespan, app)
        task_status.started(f"http://{bind_host}:{server.port}")
        for listener in listeners:
            nursery.start_soon(_accept, listener, server, nursery)


async def _accept(listener: trio.SocketListener, server: LeanServer, nursery: trio.Nursery) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors and the like: back off instead of spinning.
                log.warning("accept failed", extra={"error": str(exc)})
                await trio.sleep(0.1)
                continue
            nursery.start_soon(server.connection, stream)


async def _lifespan(app: ASGIApp, *, task_status: trio.TaskStatus[None]) -> None:
    """Run the app's ASGI lifespan for the server's life: started once the app's startup
    (Quart's before_serving hooks, the app's nursery) is done."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "lifespan.startup"}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"app startup failed: {message.get('message')}")
        if message["type"] == "lifespan.startup.complete":
            task_status.started()

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
