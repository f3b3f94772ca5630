"""Helpers for the etcd client tests: asyncio task inspection, error checks, a TCP proxy.

The proxy stands between a client and a real etcd so that a test can take the client's
connection away (``cut``) while etcd itself keeps running and other clients keep writing:
a network partition as the watcher or lease holder sees it, made deterministic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from collections.abc import Set as AbstractSet
from typing import Any

import trio
from provisioning_kit import TcpProxy as TcpProxy  # re-exported for the etcd tests

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


ProxyFactory = Callable[[int], Coroutine[Any, Any, TcpProxy]]
