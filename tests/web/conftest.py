"""Fixtures of the role tests: one asyncio bridge loop, a client of the shared etcd, a store.

pytest-trio runs every fixture in one shared contextvars context, so the first etcd client
to open a trio-asyncio loop would lend it to every other client and in-process daemon of
the test — and close it at its own teardown, under their feet. ``aio_loop`` opens the one
loop first and closes it last.
"""

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
    """Store operations over :func:`client`, to set up and inspect tasks."""
    return Store(client)
