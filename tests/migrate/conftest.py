"""Fixtures of the migration tests: one trio-asyncio loop and a client of the shared etcd.

The loop is opened first and closed last (see tests/roles/conftest.py for why).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio_asyncio

from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The test's trio-asyncio loop, outliving every client of the test."""
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def client(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[EtcdClient]:
    """A client of the shared (wiped) etcd."""
    async with open_client(etcd.endpoints) as c:
        yield c
