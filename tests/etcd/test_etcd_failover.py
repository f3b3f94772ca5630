"""Several endpoints and reconnection: a dead member is skipped, a restarted one reused."""

from __future__ import annotations

import socket

import pytest
import trio

from lpmosd.errors import EtcdRequestError, EtcdUnavailableError
from lpmosd.etcd import open_client, watch
from lpmosd.etcd_process import EtcdProcess

from .helpers import ProxyFactory, assert_our_error


def closed_port_endpoint() -> str:
    """An endpoint where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("order", ["dead_first", "live_first"])
async def test_dead_endpoint_is_skipped(etcd: EtcdProcess, order: str) -> None:
    dead = closed_port_endpoint()
    endpoints = [dead, etcd.endpoint] if order == "dead_first" else [etcd.endpoint, dead]
    with trio.fail_after(5):
        async with open_client(endpoints) as c:
            assert c.current_endpoint == etcd.endpoint
            await c.put("f", "1")
            kv = await c.get("f")
            assert kv is not None and kv.value == b"1"
            async with watch(c, "f") as stream:
                r = await c.put("f", "2")
                batch = await stream.__anext__()
                if not batch.events:
                    batch = await stream.__anext__()
            assert batch.events[0].kv.mod_revision == r.revision
            async with trio.open_nursery() as nursery:  # leases on the shared stream too
                lease = await c.lease_grant(10)
                nursery.start_soon(c.keepalive_once, lease.id)


async def test_no_endpoint_answers(aio_loop: object) -> None:
    with trio.fail_after(5), pytest.raises(EtcdUnavailableError) as info:
        async with open_client([closed_port_endpoint(), closed_port_endpoint()]):
            pass
    assert_our_error(info.value)


async def test_bad_endpoint_url() -> None:
    for url in ("ftp://127.0.0.1:2379", "http://127.0.0.1", "http://:2379"):
        with pytest.raises(EtcdRequestError) as info:
            async with open_client([url]):
                pass
        assert_our_error(info.value)
    with pytest.raises(EtcdRequestError):
        async with open_client([]):
            pass


async def test_failover_when_member_is_cut_mid_run(
    etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """Two endpoints (a proxy and the real one); cutting the proxy moves every user over."""
    proxy = await proxy_factory(etcd.client_port)
    async with open_client([proxy.endpoint, etcd.endpoint]) as c:
        assert c.current_endpoint == proxy.endpoint
        await c.put("m/0", "before")
        async with watch(c, "m/") as stream:
            proxy.cut()
            # reads retry on the next endpoint at once
            assert await c.get("m/0") is not None
            assert c.current_endpoint == etcd.endpoint
            r = await c.put("m/1", "after")
            with trio.fail_after(5):
                async for batch in stream:
                    if any(e.kv.mod_revision == r.revision for e in batch.events):
                        break
        lease = await c.lease_grant(5)
        with trio.fail_after(5):
            assert await c.keepalive_once(lease.id) == 5


async def test_reconnect_after_restart(private_etcd: EtcdProcess) -> None:
    async with open_client(private_etcd.endpoints) as c:
        await c.put("r", "1")
        await private_etcd.arestart(downtime=0.2)
        kv = await c.get("r")
        assert kv is not None and kv.value == b"1"
        await c.put("r", "2")

        # while etcd is down, calls fail fast with our error, then work again
        await private_etcd.astop()
        with trio.fail_after(5):
            with pytest.raises(EtcdUnavailableError) as info:
                await c.get("r")
            assert_our_error(info.value)
            with pytest.raises(EtcdUnavailableError) as info:
                await c.put("r", "3")
            assert_our_error(info.value)
        await private_etcd.astart()
        kv = await c.get("r")
        assert kv is not None and kv.value == b"2"


async def test_put_after_kill_is_not_blindly_retried(private_etcd: EtcdProcess) -> None:
    """After a crash and restart, a put goes through exactly once."""
    async with open_client(private_etcd.endpoints) as c:
        r1 = await c.put("once", "1")
        await private_etcd.akill()
        await private_etcd.astart()
        r2 = await c.put("once", "2")
        kv = await c.get("once")
        assert kv is not None
        assert kv.version == 2 and r2.revision == r1.revision + 1


async def test_streams_fail_over_on_their_own(
    etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """A watch and the keepalive stream move to the next endpoint without help from a
    unary call failing first."""
    proxy = await proxy_factory(etcd.client_port)
    async with (
        open_client([proxy.endpoint, etcd.endpoint]) as c,
        open_client([etcd.endpoint]) as writer,
    ):
        lease = await c.lease_grant(5)
        assert await c.keepalive_once(lease.id) == 5
        async with watch(c, "s/") as stream:
            proxy.cut()
            r = await writer.put("s/1", "after the cut")
            with trio.fail_after(5):
                async for batch in stream:
                    if any(e.kv.mod_revision == r.revision for e in batch.events):
                        break
            with trio.fail_after(5):
                assert await c.keepalive_once(lease.id) == 5
        assert c.current_endpoint == etcd.endpoint


async def test_closing_streams_keeps_the_connection(
    etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """Opening and closing watches next to busy unary calls disturbs none of them."""
    proxy = await proxy_factory(etcd.client_port)
    errors: list[BaseException] = []
    async with open_client([proxy.endpoint]) as c:
        stop = trio.Event()

        async def putter(i: int) -> None:
            while not stop.is_set():
                try:
                    await c.put(f"p/{i}", "x")
                except Exception as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(putter, i)
            for _ in range(100):
                async with watch(c, "w/") as stream:
                    await stream.__anext__()
            stop.set()
    assert errors == []
    assert proxy.connections == 1
