"""Fixtures for the etcd client tests: a trio-asyncio loop, clients, a cuttable TCP proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import trio
import trio_asyncio

from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess

from .helpers import ProxyFactory, TcpProxy

Loop = asyncio.AbstractEventLoop


@pytest.fixture
async def aio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """The test's trio-asyncio loop; clients opened in the test reuse it."""
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def client(
    etcd: EtcdProcess, aio_loop: asyncio.AbstractEventLoop
) -> AsyncIterator[EtcdClient]:
    """A client of the shared (wiped) etcd."""
    async with open_client(etcd.endpoints) as c:
        yield c


@pytest.fixture
async def client2(
    etcd: EtcdProcess, aio_loop: asyncio.AbstractEventLoop
) -> AsyncIterator[EtcdClient]:
    """A second, independent client of the shared etcd."""
    async with open_client(etcd.endpoints) as c:
        yield c


@pytest.fixture
async def proxy_factory() -> AsyncIterator[ProxyFactory]:
    """``await proxy_factory(target_port)`` starts a :class:`TcpProxy` for the test."""
    async with trio.open_nursery() as nursery:

        async def make(target_port: int) -> TcpProxy:
            proxy = TcpProxy(target_port)
            await nursery.start(proxy.serve)
            return proxy

        yield make
        nursery.cancel_scope.cancel()
