"""The one place where asyncio, trio-asyncio and grpclib meet Trio.

grpclib is asyncio-only, so the process opens one trio-asyncio loop and every gRPC call
crosses over here. Two shapes of call:

* unary calls run as one asyncio coroutine awaited from Trio (``aio_as_trio``);
* bidirectional streams (Watch, LeaseKeepAlive) each run one asyncio *pump* that owns
  the grpclib stream. Requests go in through an ``asyncio.Queue`` with ``put_nowait``;
  responses come out through a bounded Trio memory channel with ``send_nowait``. The
  pump never awaits Trio: letting asyncio await a Trio operation loses cancellation and
  hangs forever inside grpclib's buffer read (measured; see DESIGN.md §3).

Everything that leaves this module is Trio-native and raises only ``lpmosd.errors``
types: gRPC status codes and transport failures are mapped in :func:`map_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import betterproto2
import grpclib.client
import grpclib.config
import grpclib.const
import grpclib.exceptions
import trio
import trio_asyncio

from lpmosd._trio_util import open_nursery
from lpmosd.errors import (
    CompactedError,
    EtcdAuthError,
    EtcdError,
    EtcdNoSpaceError,
    EtcdRequestError,
    EtcdUnavailableError,
    FutureRevisionError,
    LeaseNotFoundError,
)

ReqT = TypeVar("ReqT", bound=betterproto2.Message)
RepT = TypeVar("RepT", bound=betterproto2.Message)

_Status = grpclib.const.Status


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL, parsed."""

    url: str
    host: str
    port: int
    secure: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse ``http://host:port`` or ``https://host:port``."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
            raise EtcdRequestError(f"bad etcd endpoint {url!r}: want http(s)://host:port")
        return cls(url, parts.hostname, parts.port, parts.scheme == "https")


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """TLS material for talking to etcd: CA bundle, optional client certificate and key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """An SSL context for gRPC over HTTP/2 (ALPN h2)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.set_alpn_protocols(["h2"])
        return ctx


class AmbiguousError(EtcdUnavailableError):
    """The connection failed after the request was sent: it may or may not have applied."""


class StreamOverflowError(EtcdUnavailableError):
    """A stream's consumer fell behind its buffer: reopen it (the member is fine)."""


def _is_endpoint_failure(exc: BaseException | None) -> bool:
    return isinstance(exc, EtcdUnavailableError) and not isinstance(exc, StreamOverflowError)


# --- error mapping -----------------------------------------------------------------------


def _is_compacted(message: str) -> bool:
    return "compacted" in message


# etcd reports several credential problems as INVALID_ARGUMENT or FAILED_PRECONDITION
# (rpctypes: ErrGRPCAuthFailed, ErrGRPCUserEmpty, ErrGRPCUserNotFound, ...): by message.
_AUTH_MESSAGES = (
    "authentication failed",
    "user name is empty",
    "user name not found",
    "invalid auth token",
    "permission denied",
    "authentication is not enabled",
    "revision of auth store is old",
    "role is not granted",
)
# The refusals that a fresh token may cure.
_TOKEN_MESSAGES = ("invalid auth token", "revision of auth store is old")


def map_error(exc: BaseException, *, sent: bool = False) -> EtcdError:
    """Map a grpclib/asyncio/OS failure to our error tree.

    ``sent`` says whether the request reached the wire: a transport failure after that is
    ambiguous for writes (:class:`AmbiguousError`).
    """
    if isinstance(exc, EtcdError):
        return exc
    if isinstance(exc, grpclib.exceptions.GRPCError):
        msg = exc.message or exc.status.name
        status = exc.status
        if status in (_Status.UNAUTHENTICATED, _Status.PERMISSION_DENIED) or any(
            m in msg for m in _AUTH_MESSAGES
        ):
            return EtcdAuthError(msg)
        if status is _Status.OUT_OF_RANGE and _is_compacted(msg):
            return CompactedError(msg, 0)
        if status is _Status.OUT_OF_RANGE and "future revision" in msg:
            return FutureRevisionError(msg)
        if status is _Status.NOT_FOUND and "lease" in msg:
            return LeaseNotFoundError(msg)
        if status is _Status.RESOURCE_EXHAUSTED and "space exceeded" in msg:
            return EtcdNoSpaceError(msg)
        if status in (_Status.UNAVAILABLE, _Status.DEADLINE_EXCEEDED, _Status.CANCELLED):
            cls = AmbiguousError if sent else EtcdUnavailableError
            return cls(f"etcd unavailable: {msg}")
        return EtcdRequestError(f"etcd refused the request ({status.name}): {msg}")
    if isinstance(
        exc,
        OSError
        | asyncio.TimeoutError
        | grpclib.exceptions.StreamTerminatedError
        | grpclib.exceptions.ProtocolError
        | EOFError,
    ):
        cls = AmbiguousError if sent else EtcdUnavailableError
        return cls(f"etcd connection failed: {type(exc).__name__}: {exc}")
    return EtcdError(f"unexpected etcd client failure: {type(exc).__name__}: {exc}")


def is_auth_expired(exc: EtcdError) -> bool:
    """True for the errors that a fresh auth token may cure."""
    text = str(exc)
    return isinstance(exc, EtcdAuthError) and (
        any(m in text for m in _TOKEN_MESSAGES)
        or ("token" in text.lower() and "expired" in text.lower())
    )


# --- transport ---------------------------------------------------------------------------


class _CoalescingWriter:
    """Wraps an asyncio transport: the writes of one event-loop turn go out as one.

    grpclib writes each HTTP/2 frame batch straight to the socket, two ``send()`` system
    calls per unary call (HEADERS, then DATA). Collected until the end of the loop turn,
    the frames of every call made in that turn share one system call.
    """

    __slots__ = ("_buffer", "_inner", "_loop", "_scheduled")

    def __init__(self, inner: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._buffer: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        if not self._inner.is_closing():
            self._inner.write(data)

    def close(self) -> None:
        self._flush()
        self._inner.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Channel(grpclib.client.Channel):
    """A grpclib channel whose connections coalesce their writes (see above), counting
    what they receive (``received``): a call that timed out on a channel that meanwhile
    received answers met a slow etcd, not a dead connection."""

    received = 0

    async def _create_connection(self) -> Any:
        protocol = await super()._create_connection()
        inner_received = protocol.data_received

        def data_received(data: bytes) -> None:
            self.received += 1
            inner_received(data)

        protocol.data_received = data_received  # type: ignore[method-assign]
        connection = protocol.connection
        inner = connection._transport
        if isinstance(inner, asyncio.WriteTransport):
            writer: Any = _CoalescingWriter(inner, asyncio.get_running_loop())
            connection._transport = writer
        return protocol


@dataclass(slots=True)
class _Sent:
    """Set by a unary call once its request is on the wire."""

    value: bool = False


class Transport:
    """grpclib channels to a set of etcd endpoints, usable from Trio.

    One channel per endpoint, created lazily; ``current`` is the endpoint in use. A failed
    call rotates to the next endpoint (``failover``) so the next call tries another member.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: TLSFiles | None = None,
        keepalive_interval: float | None = 10.0,
        keepalive_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise EtcdRequestError("no etcd endpoints given")
        self.endpoints = [Endpoint.parse(u) for u in endpoints]
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        self._channels: dict[int, grpclib.client.Channel] = {}
        self.current = 0
        self._config = grpclib.config.Configuration(
            _keepalive_time=keepalive_interval,
            _keepalive_timeout=keepalive_timeout,
            _keepalive_permit_without_calls=True,
            _http2_max_pings_without_data=0,
            # etcd drops connections that ping more often than every 5 s.
            _http2_min_sent_ping_interval_without_data=max(5.0, keepalive_interval or 5.0),
        )

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint calls go to now."""
        return self.endpoints[self.current]

    def _channel(self, index: int) -> grpclib.client.Channel:
        chan = self._channels.get(index)
        if chan is None:
            ep = self.endpoints[index]
            ctx: ssl.SSLContext | None = None
            if ep.secure or self._tls is not None:
                if self._ssl is None:
                    self._ssl = (self._tls or TLSFiles()).context()
                ctx = self._ssl
            chan = _Channel(ep.host, ep.port, ssl=ctx, config=self._config)
            self._channels[index] = chan
        return chan

    def failover(self, failed_index: int) -> None:
        """Mark the endpoint at ``failed_index`` as failed: reset it and move to the next."""
        chan = self._channels.pop(failed_index, None)
        if chan is not None:
            chan.close()
        if failed_index == self.current:
            self.current = (self.current + 1) % len(self.endpoints)

    def close(self) -> None:
        """Close every channel."""
        for chan in self._channels.values():
            chan.close()
        self._channels.clear()

    async def aclose(self) -> None:
        """Close every channel and let asyncio finish closing the sockets.

        A transport's ``close()`` only schedules the socket's closing on the asyncio loop
        (and TLS waits for the peer's close_notify): if the loop ends first — as it does
        when ``open_client`` opened it — the socket leaks. So abort the transports and
        give the loop a few turns, bounded and shielded.
        """
        transports: list[asyncio.BaseTransport] = []
        for chan in self._channels.values():
            connection = getattr(chan._protocol, "connection", None)
            transport = getattr(connection, "_transport", None)
            if isinstance(transport, _CoalescingWriter):
                transport = transport._inner
            if isinstance(transport, asyncio.BaseTransport):
                transports.append(transport)
        self.close()
        if not transports:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio_asyncio.aio_as_trio(_abort_transports)(transports)

    async def unary(
        self,
        route: str,
        request: ReqT,
        reply_type: type[RepT],
        *,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> RepT:
        """One unary call on the current endpoint; failures are mapped (and fail over)."""
        index = self.current
        chan = self._channel(index)
        received = getattr(chan, "received", 0)
        sent = _Sent()
        try:
            reply: RepT = await trio_asyncio.aio_as_trio(_unary_call)(
                chan, route, request, reply_type, timeout, metadata, sent
            )
            return reply
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException as exc:
            err = map_error(exc, sent=sent.value)
            # A deadline missed while the connection kept receiving (other answers, watch
            # events) is a slow etcd, not a dead link: closing the channel would fail every
            # call and stream on it (measured: under load one slow call tore down the
            # regional's session keepalive and watches with it, again and again).
            slow = isinstance(exc, TimeoutError) and getattr(chan, "received", 0) > received
            if isinstance(err, EtcdUnavailableError) and not slow:
                self.failover(index)
            raise err from None
        finally:
            self._close_if_retired(index, chan)

    def _close_if_retired(self, index: int, chan: grpclib.client.Channel) -> None:
        # Another call may have failed over (and closed) this channel while ours was
        # connecting through it: grpclib then reconnects a channel nobody will close.
        if self._channels.get(index) is not chan:
            chan.close()

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        route: str,
        request_type: type[ReqT],
        reply_type: type[RepT],
        *,
        metadata: Sequence[tuple[str, str]] | None = None,
        capacity: int = 1024,
    ) -> AsyncIterator[BidiStream[ReqT, RepT]]:
        """Open a bidirectional stream on the current endpoint, for the body's duration.

        If the stream breaks, or the body leaves with :class:`EtcdUnavailableError` (e.g. a
        watch that etcd cancelled for want of a leader), the endpoint is failed over so
        the caller's next stream goes to another member.
        """
        index = self.current
        stream: BidiStream[ReqT, RepT] = BidiStream(capacity)
        chan = self._channel(index)
        failed = False
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(
                    _run_pump, chan, route, request_type, reply_type, metadata, stream
                )
                try:
                    yield stream
                except EtcdUnavailableError as exc:
                    failed = _is_endpoint_failure(exc)
                    raise
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if failed or _is_endpoint_failure(stream.error):
                self.failover(index)
            self._close_if_retired(index, chan)


async def _abort_transports(transports: list[asyncio.BaseTransport]) -> None:
    for transport in transports:
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
    for _ in range(3):  # abort() closes the socket from a call_soon callback
        await asyncio.sleep(0)


async def _unary_call(
    chan: grpclib.client.Channel,
    route: str,
    request: betterproto2.Message,
    reply_type: type[RepT],
    timeout: float | None,
    metadata: Sequence[tuple[str, str]] | None,
    sent: _Sent,
) -> RepT:
    async with chan.request(
        route,
        grpclib.const.Cardinality.UNARY_UNARY,
        type(request),
        reply_type,
        timeout=timeout,
        metadata=metadata,
    ) as stream:
        await stream.send_request()
        sent.value = True
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    if reply is None:
        raise EOFError("empty unary reply")
    return reply


# --- bidirectional streams ---------------------------------------------------------------

_END = object()


@dataclass(eq=False)
class BidiStream(Generic[ReqT, RepT]):
    """The Trio side of one bidirectional gRPC stream.

    ``send`` never blocks (requests queue up for the pump); ``receive`` waits for the next
    reply and raises the mapped error once the stream has failed or ended.
    """

    capacity: int
    error: EtcdError | None = None
    _queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _send: trio.MemorySendChannel[RepT] = field(init=False)
    _recv: trio.MemoryReceiveChannel[RepT] = field(init=False)

    def __post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[RepT](self.capacity)

    def send(self, request: ReqT) -> None:
        """Queue a request for the stream."""
        if self.error is not None:
            raise self.error
        self._queue.put_nowait(request)

    async def receive(self) -> RepT:
        """The next reply; raises an EtcdError when the stream is over."""
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise self.error or EtcdUnavailableError("stream closed") from None

    # Called from the asyncio pump: synchronous Trio operations only.
    def _deliver(self, reply: RepT) -> bool:
        try:
            self._send.send_nowait(reply)
        except trio.WouldBlock:
            self._finish(StreamOverflowError("stream consumer fell behind; reopening"))
            return False
        except trio.ClosedResourceError:
            return False
        return True

    def _finish(self, error: EtcdError) -> None:
        if self.error is None:
            self.error = error
        self._send.close()

    def _close(self) -> None:
        """End the stream without an error of its own (we closed it)."""
        self._send.close()


async def _run_pump(
    chan: grpclib.client.Channel,
    route: str,
    request_type: type[ReqT],
    reply_type: type[RepT],
    metadata: Sequence[tuple[str, str]] | None,
    stream: BidiStream[ReqT, RepT],
) -> None:
    try:
        await trio_asyncio.aio_as_trio(_pump)(
            chan, route, request_type, reply_type, metadata, stream
        )
    finally:
        stream._close()


async def _pump(
    chan: grpclib.client.Channel,
    route: str,
    request_type: type[ReqT],
    reply_type: type[RepT],
    metadata: Sequence[tuple[str, str]] | None,
    stream: BidiStream[ReqT, RepT],
) -> None:
    """Owns one grpclib stream. Never awaits Trio (see the module docstring)."""
    sender: asyncio.Task[None] | None = None
    try:
        async with chan.request(
            route,
            grpclib.const.Cardinality.STREAM_STREAM,
            request_type,
            reply_type,
            metadata=metadata,
        ) as gstream:
            await gstream.send_request()
            sender = asyncio.ensure_future(_send_loop(gstream, stream._queue))
            while True:
                reply = await gstream.recv_message()
                if reply is None:
                    stream._finish(EtcdUnavailableError("stream ended by etcd"))
                    return
                if not stream._deliver(reply):
                    return
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        stream._finish(map_error(exc))
    finally:
        if sender is not None:
            sender.cancel()


async def _send_loop(gstream: grpclib.client.Stream[Any, Any], queue: asyncio.Queue[Any]) -> None:
    while True:
        item = await queue.get()
        if item is _END:
            await gstream.end()
            return
        await gstream.send_message(item)


# --- loop --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ensure_loop() -> AsyncIterator[None]:
    """Make sure a trio-asyncio loop is running; open one for the body if none is.

    Open it near the top of the process: tasks see the loop only when they are started
    from inside this context (a Trio task started in an outer nursery cannot call etcd).
    """
    if trio_asyncio.current_loop.get(None) is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop():
            yield
    except BaseExceptionGroup as group:
        # trio-asyncio's nurseries wrap whatever leaves the body (our errors, the caller's
        # own) in ExceptionGroups: hand the caller the error itself, as open_nursery does.
        chosen, several = _single_error(group)
        raise chosen from (group if several else None)


def _single_error(group: BaseExceptionGroup[BaseException]) -> tuple[BaseException, bool]:
    """The first non-Cancelled leaf of ``group``; and whether there were several."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return (real or leaves)[0], len(real) > 1
