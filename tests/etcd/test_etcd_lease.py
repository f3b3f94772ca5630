"""Leases against a real etcd: calls, keepalive, and losing a held lease on time."""

from __future__ import annotations

import pytest
import trio

from lpmosd.errors import EtcdError, LeaseLost, LeaseNotFoundError
from lpmosd.etcd import EtcdClient, HeldLease, open_client, open_lease
from lpmosd.etcd_process import EtcdProcess

from .helpers import ProxyFactory, assert_our_error


async def test_grant_ttl_leases_revoke(client: EtcdClient) -> None:
    a = await client.lease_grant(30)
    b = await client.lease_grant(60)
    assert a.id != b.id and a.ttl == 30 and b.ttl == 60
    assert set(await client.leases()) >= {a.id, b.id}
    info = await client.lease_time_to_live(a.id)
    assert info is not None and info.granted_ttl == 30 and 28 <= info.ttl <= 30
    await client.put("lk", "v", lease=a.id)
    info = await client.lease_time_to_live(a.id, keys=True)
    assert info is not None and info.keys == [b"lk"]

    assert await client.lease_revoke(a.id) is True
    assert await client.lease_revoke(a.id) is False  # already gone
    assert await client.lease_time_to_live(a.id) is None
    assert await client.get("lk") is None
    assert a.id not in await client.leases()

    c = await client.lease_grant(30, lease_id=0x1234ABCD)  # a chosen id
    assert c.id == 0x1234ABCD
    with pytest.raises(EtcdError) as info2:
        await client.lease_grant(30, lease_id=0x1234ABCD)  # that id is taken
    assert_our_error(info2.value)


async def test_keepalive_once_and_lost_lease(client: EtcdClient) -> None:
    lease = await client.lease_grant(10)
    assert await client.keepalive_once(lease.id) == 10
    await client.lease_revoke(lease.id)
    with pytest.raises(LeaseNotFoundError) as info:
        await client.keepalive_once(lease.id)
    assert_our_error(info.value)


async def test_keepalive_50_leases_at_once_on_one_stream(client: EtcdClient) -> None:
    leases = [await client.lease_grant(20) for _ in range(50)]
    ttls: dict[int, int] = {}

    async def refresh(lease_id: int) -> None:
        ttls[lease_id] = await client.keepalive_once(lease_id)

    hub = client._keepalive
    assert hub is not None
    stream_before = hub._stream
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for lease in leases:
                nursery.start_soon(refresh, lease.id)
            # and the same lease several times at once
            for _ in range(5):
                nursery.start_soon(refresh, leases[0].id)
    assert ttls == {lease.id: 20 for lease in leases}
    assert hub._stream is stream_before  # one shared stream, not one per call
    assert hub._waiters == {}


async def test_one_leases_timeout_does_not_reset_the_shared_stream(client: EtcdClient) -> None:
    """A keepalive that runs out of time while the stream is healthy (here: no time at
    all) fails alone; the stream every other lease uses stays (review finding, issue 15)."""
    a = await client.lease_grant(20)
    b = await client.lease_grant(20)
    hub = client._keepalive
    assert hub is not None
    assert await client.keepalive_once(b.id) == 20
    stream_before = hub._stream
    assert stream_before is not None
    with pytest.raises(EtcdError):
        await client.keepalive_once(a.id, timeout=1e-9)
    assert hub._stream is stream_before
    assert await client.keepalive_once(b.id) == 20
    assert hub._stream is stream_before


async def test_open_lease_keeps_lease_alive(client: EtcdClient) -> None:
    """A 2 s lease held for 5 s stays alive; leaving the block revokes it."""
    async with open_lease(client, 2) as lease:
        await client.put("held", "v", lease=lease.id)
        start = trio.current_time()
        while trio.current_time() - start < 5:
            await trio.sleep(0.5)
            assert await client.get("held") is not None
            assert lease.remaining() > 0.5
        info = await client.lease_time_to_live(lease.id)
        assert info is not None and info.ttl >= 1
    assert lease.lost_reason is None
    assert await client.lease_time_to_live(lease.id) is None
    assert await client.get("held") is None


async def test_open_lease_body_error_propagates_and_revokes(client: EtcdClient) -> None:
    with pytest.raises(KeyError, match="from the body"):
        async with open_lease(client, 5) as lease:
            await client.put("held", "v", lease=lease.id)
            raise KeyError("from the body")
    assert await client.lease_time_to_live(lease.id) is None
    assert await client.get("held") is None


async def _hold_until_lost(client: EtcdClient, ttl: int, cut: trio.Event) -> tuple[float, bool]:
    """Hold a lease and fire ``cut``; return (seconds until LeaseLost, was the body cancelled)."""
    cancelled = False
    t_cut = 0.0
    lease: HeldLease | None = None
    with pytest.raises(LeaseLost) as info:
        async with open_lease(client, ttl) as lease:
            await client.keepalive_once(lease.id)
            try:
                t_cut = trio.current_time()
                cut.set()
                await trio.sleep(ttl + 30)
            except trio.Cancelled:
                cancelled = True
                raise
    assert lease is not None
    assert_our_error(info.value)
    assert info.value.lease_id == lease.id
    # etcd did not answer: a regional that led may serve its agents alone meanwhile
    assert info.value.unreachable
    return trio.current_time() - t_cut, cancelled


async def test_lease_lost_when_etcd_hangs(private_etcd: EtcdProcess) -> None:
    """etcd frozen (SIGSTOP): the body is cancelled and LeaseLost raised within TTL + 1 s."""
    ttl = 2
    async with open_client(private_etcd.endpoints) as c, trio.open_nursery() as nursery:
        cut = trio.Event()

        async def pause_on_cut() -> None:
            await cut.wait()
            private_etcd.pause()  # synchronous: no time passes before the pause

        nursery.start_soon(pause_on_cut)
        try:
            elapsed, cancelled = await _hold_until_lost(c, ttl, cut)
        finally:
            private_etcd.resume()
    assert cancelled
    assert elapsed <= ttl + 1, f"LeaseLost after {elapsed:.2f}s"


async def test_lease_lost_when_partitioned(
    private_etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """Our traffic is frozen (etcd runs on): LeaseLost within TTL + 1 s; etcd expires it too."""
    ttl = 2
    proxy = await proxy_factory(private_etcd.client_port)
    async with (
        open_client([proxy.endpoint]) as c,
        open_client(private_etcd.endpoints) as observer,
        trio.open_nursery() as nursery,
    ):
        cut = trio.Event()

        async def freeze_on_cut() -> None:
            await cut.wait()
            proxy.freeze()

        nursery.start_soon(freeze_on_cut)
        elapsed, cancelled = await _hold_until_lost(c, ttl, cut)
        assert cancelled
        assert elapsed <= ttl + 1, f"LeaseLost after {elapsed:.2f}s"
        # etcd, which heard nothing either, lets the lease expire shortly after
        leases = await observer.leases()
        with trio.fail_after(ttl + 2):
            while leases:
                await trio.sleep(0.1)
                leases = await observer.leases()
        proxy.heal()


async def test_lease_revoked_from_outside(client: EtcdClient, client2: EtcdClient) -> None:
    ttl = 3
    cancelled = False
    t0 = 0.0
    with pytest.raises(LeaseLost) as info:
        async with open_lease(client, ttl) as lease:
            try:
                t0 = trio.current_time()
                await client2.lease_revoke(lease.id)
                await trio.sleep(30)
            except trio.Cancelled:
                cancelled = True
                raise
    assert_our_error(info.value)
    assert cancelled
    assert "revoked" in info.value.reason
    assert not info.value.unreachable, "etcd answered: it is reachable"
    assert trio.current_time() - t0 <= ttl / 3 + 1  # noticed at the next keepalive


async def test_lease_keepalive_survives_etcd_restart(private_etcd: EtcdProcess) -> None:
    """A short outage (under the TTL) does not lose the lease: the stream reconnects."""
    async with open_client(private_etcd.endpoints) as c, open_lease(c, 5) as lease:
        await c.put("survivor", "v", lease=lease.id)
        await private_etcd.arestart(downtime=0.5)
        before = trio.current_time()
        with trio.fail_after(4):
            while lease.valid_until < before:  # noqa: ASYNC110 (a keepalive acked after restart)
                await trio.sleep(0.05)
        assert await c.get("survivor") is not None
    assert lease.lost_reason is None
