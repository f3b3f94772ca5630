"""Agent leases refreshed at most once per TTL/3, over a real etcd: kept alive while their
agents call, however often, and left to expire once they stop."""

from __future__ import annotations

import pytest
import trio

from lpmosd.errors import LeaseNotFoundError
from lpmosd.etcd import EtcdClient
from lpmosd.leasekeeper import LeaseKeeper


async def _gone(client: EtcdClient, lease_id: int) -> bool:
    return await client.lease_time_to_live(lease_id) is None


async def test_keeps_a_called_lease_alive_with_few_keepalives(client: EtcdClient) -> None:
    ttl = 3
    keeper = LeaseKeeper(ttl, client.keepalive_once)
    lease = await client.lease_grant(ttl)
    keeper.granted(lease.id, lease.ttl)
    calls = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        start = trio.current_time()
        # An agent calling 20 times a second for more than two TTLs.
        while trio.current_time() - start < 2.5 * ttl:
            keeper.heard(lease.id)
            calls += 1
            await trio.sleep(0.05)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert not await _gone(client, lease.id)
    # At most one keepalive per TTL/3 (plus the one a call may find due at the end).
    assert 1 <= keeper.sent <= elapsed / keeper.interval + 1
    assert keeper.skipped >= calls - keeper.sent - 1


async def test_a_dead_agents_lease_expires(client: EtcdClient) -> None:
    ttl = 3
    keeper = LeaseKeeper(ttl, client.keepalive_once)
    lease = await client.lease_grant(ttl)
    keeper.granted(lease.id, lease.ttl)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await trio.sleep(keeper.interval)
        keeper.heard(lease.id)  # the agent's last call: refreshed (it was due)
        while keeper.sent == 0:  # noqa: ASYNC110 - the refresh is sent by run()
            await trio.sleep(0.01)
        last = trio.current_time()
        # The agent is silent from now on; the keeper must let the lease go within a TTL.
        with trio.fail_after(ttl + 2):
            while not await _gone(client, lease.id):  # noqa: ASYNC110 - polling etcd
                await trio.sleep(0.1)
        assert trio.current_time() - last >= ttl - 1  # it was not dropped early either
        assert keeper.sent == 1
        nursery.cancel_scope.cancel()


async def test_heartbeat_refresh_reports_a_gone_lease(client: EtcdClient) -> None:
    keeper = LeaseKeeper(5, client.keepalive_once)
    lease = await client.lease_grant(5)
    keeper.granted(lease.id, lease.ttl)
    left = keeper.ttl_left(lease.id)
    assert left is not None and 4 <= left <= 5  # fresh: no refresh needed
    await client.lease_revoke(lease.id)
    keeper.forget(lease.id)
    assert keeper.ttl_left(lease.id) is None  # unknown: due
    with pytest.raises(LeaseNotFoundError):
        await keeper.refresh(lease.id)
