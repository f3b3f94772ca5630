"""Fixtures of the security tests: one asyncio bridge loop, a client of the shared etcd, a
store (see tests/roles/conftest.py for why the loop is opened first and closed last)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio_asyncio

from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store


@pytest.fixture(autouse=True)
async def aio_loop() -> AsyncIterator[None]:
    """The test's trio-asyncio loop, outliving every client and daemon of the test."""
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def client(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[EtcdClient]:
    """A client of the shared (wiped) etcd, independent of the daemon's own."""
    async with open_client(etcd.endpoints) as c:
        yield c


@pytest.fixture
def store(client: EtcdClient) -> Store:
    """Store operations over :func:`client`."""
    return Store(client)
