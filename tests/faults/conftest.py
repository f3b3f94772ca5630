"""The fault suite's fixtures: a real 3-member etcd cluster on loopback and a TCP proxy in
front of each member's client port (to cut or blackhole one endpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from provisioning_kit import TcpProxy, open_proxy

from lpmosd.etcd_process import EtcdCluster


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster for the test (about 1 s to start)."""
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
async def proxies(etcd_cluster: EtcdCluster) -> AsyncIterator[list[TcpProxy]]:
    """One proxy per member, in member order; the daemon under test goes through them."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_proxy(m.client_port)) for m in etcd_cluster.members
        ]
