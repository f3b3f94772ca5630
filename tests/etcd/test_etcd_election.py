"""Leader election on leases and fenced writes, against a real etcd."""

from __future__ import annotations

import pytest
import trio

from lpmosd._trio_util import open_nursery
from lpmosd.errors import LeaseLost, NotLeaderError
from lpmosd.etcd import (
    Compare,
    EtcdClient,
    Fence,
    get,
    leader_of,
    nominate,
    put,
    wait_for_leadership,
)

PREFIX = "/test/election/"


async def test_lowest_create_revision_leads_and_the_next_takes_over(client: EtcdClient) -> None:
    leases = [(await client.lease_grant(30)).id for _ in range(3)]
    keys = [await nominate(client, PREFIX, lease, f"c{i}") for i, lease in enumerate(leases)]
    assert [r for _, r in keys] == sorted(r for _, r in keys)
    listing = await client.get_prefix(PREFIX)
    leader = leader_of(listing.kvs)
    assert leader is not None and leader.key.decode() == keys[0][0]

    # The first leads at once; the others wait for the candidate just ahead of them.
    with trio.fail_after(5):
        await wait_for_leadership(client, PREFIX, *keys[0], leases[0])
    led: list[int] = []

    async def campaign(i: int) -> None:
        await wait_for_leadership(client, PREFIX, *keys[i], leases[i])
        led.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(campaign, 1)
        nursery.start_soon(campaign, 2)
        await trio.sleep(0.3)
        assert led == []
        # The third's predecessor is the second: its leaving alone elects nobody new.
        await client.lease_revoke(leases[0])
        with trio.fail_after(5):
            while not led:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert led == [1]
        await client.lease_revoke(leases[1])
    assert led == [1, 2]
    await client.lease_revoke(leases[2])


async def test_a_vanished_own_key_is_lease_lost(client: EtcdClient) -> None:
    first = (await client.lease_grant(30)).id
    second = (await client.lease_grant(30)).id
    await nominate(client, PREFIX, first, "a")
    key, rev = await nominate(client, PREFIX, second, "b")
    with pytest.raises(LeaseLost):
        async with open_nursery() as nursery:
            nursery.start_soon(wait_for_leadership, client, PREFIX, key, rev, second)
            await trio.sleep(0.2)
            await client.lease_revoke(second)
            await client.lease_revoke(first)
    await client.delete(PREFIX, prefix=True)


async def test_fenced_writes_need_the_term(client: EtcdClient) -> None:
    fence = Fence("test")
    # No term held: refused locally, nothing sent.
    with pytest.raises(NotLeaderError, match="standby"):
        await client.txn([], [put("/test/x", "1")], fence=fence)
    # Reads need no term.
    r = await client.txn([], [get("/test/x")], fence=fence)
    assert r.succeeded

    lease = (await client.lease_grant(30)).id
    key, rev = await nominate(client, PREFIX, lease, "me")
    fence.hold(key.encode(), rev)
    r = await client.txn([], [put("/test/x", "1")], fence=fence)
    assert r.succeeded
    # A failing compare of the caller's own is reported as usual (the term still holds).
    r = await client.txn(
        [Compare.value_is("/test/x", "==", "2")],
        [put("/test/x", "3")],
        [get("/test/x")],
        fence=fence,
    )
    assert not r.succeeded and len(r.responses) == 1

    # The lease goes (a paused leader): the process still believes it leads, etcd refuses.
    await client.lease_revoke(lease)
    before = (await client.get_prefix("/test/")).revision
    with pytest.raises(NotLeaderError, match="lost the leadership"):
        await client.txn([], [put("/test/x", "2")], fence=fence)
    with pytest.raises(NotLeaderError):
        await client.atomic_update("/test/x", lambda kv: b"3", fence=fence)
    after = await client.get_prefix("/test/")
    assert after.revision == before, "a fenced-out writer wrote something"
    kv = await client.get("/test/x")
    assert kv is not None and kv.value == b"1"

    # A new candidate key under the same name is another term: still refused.
    lease2 = (await client.lease_grant(30)).id
    await client.put(key, "impostor", lease=lease2)
    with pytest.raises(NotLeaderError):
        await client.txn([], [put("/test/x", "2")], fence=fence)
    await client.lease_revoke(lease2)
    await client.delete("/test/", prefix=True)
