"""Helpers for the etcd client tests: asyncio task inspection, error checks, a TCP proxy.

The proxy stands between a client and a real etcd so that a test can take the client's
connection away (``cut``) while etcd itself keeps running and other clients keep writing:
a network partition as the watcher or lease holder sees it, made deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Coroutine
from collections.abc import Set as AbstractSet
from typing import Any

import trio

from lpmosd.errors import EtcdError


def pending_asyncio_tasks(loop: asyncio.AbstractEventLoop) -> set[asyncio.Task[Any]]:
    """Asyncio tasks still alive on ``loop`` (the bridge must leave none behind)."""
    return {t for t in asyncio.all_tasks(loop) if not t.done()}


async def settle_asyncio(
    loop: asyncio.AbstractEventLoop,
    baseline: AbstractSet[Any] = frozenset(),
    timeout: float = 2.0,
) -> set[Any]:
    """Give cancelled asyncio tasks a moment to finish; return those alive beyond ``baseline``."""
    with trio.move_on_after(timeout):
        while pending_asyncio_tasks(loop) - baseline:  # noqa: ASYNC110 (polling asyncio's state)
            await trio.sleep(0.005)
    return pending_asyncio_tasks(loop) - baseline


def assert_our_error(exc: BaseException) -> None:
    """``exc`` is one of lpmosd's errors: no group, no asyncio or grpclib type, in the chain."""
    assert isinstance(exc, EtcdError), f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    assert not isinstance(exc, BaseExceptionGroup)
    assert type(exc).__module__.startswith("lpmosd."), type(exc)


class TcpProxy:
    """A loopback TCP forwarder to ``target_port`` that a test can cut and heal.

    ``cut()`` aborts every forwarded connection and refuses new ones (accept, then close at
    once) until ``heal()``. ``freeze()`` keeps connections open but stops moving bytes,
    like a hung peer, until ``heal()``.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._blocked = False
        self._frozen = trio.Event()
        self._frozen.set()  # set == flowing
        self._scopes: set[trio.CancelScope] = set()
        self._responses = trio.Event()
        self._responses.set()  # set == flowing

    @property
    def endpoint(self) -> str:
        """The proxy's client URL."""
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`heal`."""
        self._blocked = True
        for scope in list(self._scopes):
            scope.cancel()

    def freeze(self) -> None:
        """Stop forwarding bytes (connections stay open) until :meth:`heal`."""
        self._frozen = trio.Event()

    def hold_responses(self) -> None:
        """Forward requests to etcd but hold its answers back until :meth:`heal` or :meth:`cut`.

        With a cut after that, the client's request was applied but its answer is lost:
        the ambiguous outcome of a write.
        """
        self._responses = trio.Event()

    def heal(self) -> None:
        """Accept and forward again."""
        self._blocked = False
        self._frozen.set()
        self._responses.set()

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream, answers: bool) -> None:
        while True:
            data = await src.receive_some(65536)
            await self._frozen.wait()
            if answers:
                await self._responses.wait()
            if not data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await dst.send_eof()
                return
            await dst.send_all(data)

    async def _handle(self, conn: trio.SocketStream) -> None:
        async with conn:
            if self._blocked:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, conn, upstream, False)
                        nursery.start_soon(self._pipe, upstream, conn, True)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                finally:
                    self._scopes.discard(scope)
            # Abort (RST) rather than a clean close, like a lost connection.
            with contextlib.suppress(OSError):
                conn.socket.setsockopt(
                    trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
                )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            task_status.started()


ProxyFactory = Callable[[int], Coroutine[Any, Any, TcpProxy]]
