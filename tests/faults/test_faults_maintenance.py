"""Maintenance faults of a real 3-member etcd cluster with installs in flight: an operator
defragments every member under load, and the database hits its quota (NOSPACE) and is
recovered with ``compact``, ``defrag``, ``disarm`` while agents keep reporting."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio
from fault_table import record
from provisioning_kit import TcpProxy, make_config, open_daemon, wait_for

from lpmosd.config import EtcdConfig
from lpmosd.errors import EtcdNoSpaceError
from lpmosd.etcd import open_client
from lpmosd.etcd_cli import defragment_members
from lpmosd.etcd_process import EtcdCluster
from lpmosd.store import Store

from .kit import Fleet
from .test_faults import acked_more, config_for, regional, view_matches_etcd

QUOTA = 8 << 20


async def db_bytes(endpoints: list[str]) -> list[int]:
    """Each member's database file size."""
    sizes = []
    for url in endpoints:
        async with open_client([url]) as member:
            sizes.append((await member.status()).db_size)
    return sizes


async def test_defragment_every_member_under_load(
    etcd_cluster: EtcdCluster, proxies: list[TcpProxy]
) -> None:
    async with (
        open_client(etcd_cluster.endpoints) as client,
        open_daemon(config_for(proxies)) as daemon,
    ):
        rg = regional(daemon)
        fleet = Fleet(daemon.urls["regional"], Store(client))
        await fleet.enrol()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run, stop)
            await acked_more(fleet, 60)
            # History worth defragmenting: a large key rewritten, deleted and compacted.
            for _ in range(20):
                await client.put("/filler", b"x" * (256 << 10))
            await client.delete("/filler")
            await client.compact((await client.status()).revision)
            before = await db_bytes(etcd_cluster.endpoints)
            started = trio.current_time()
            cfg = EtcdConfig(endpoints=tuple(etcd_cluster.endpoints))
            await defragment_members(cfg, timeout=5.0, defrag_timeout=60.0)
            took = trio.current_time() - started
            after = await db_bytes(etcd_cluster.endpoints)
            await acked_more(fleet, 30)
            stop.set()
        verdict = await fleet.verify(client)
        gap = fleet.longest_gap(started)
        print(f"\ndefrag: {before} -> {after} bytes in {took:.2f}s; {verdict}; gap {gap:.2f}s")
        shrunk = sum(before) / max(1, sum(after))
        assert rg.session.restarts == 0
        assert rg.machines is not None
        await view_matches_etcd(rg.machines, client)
        assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        "defragment every member, one at a time, under load",
        f"databases {sum(before) >> 20} MiB -> {sum(after) >> 20} MiB ({shrunk:.0f}x) in "
        f"{took:.1f} s; installs went on (longest write gap {gap:.1f} s); session kept; "
        f"{verdict.acked} acknowledged steps, 0 lost, 0 duplicated",
    )


@pytest.fixture
def small_cluster() -> Iterator[EtcdCluster]:
    """A cluster with a small quota (8 MiB), to fill it."""
    with EtcdCluster(3, extra_args=[f"--quota-backend-bytes={QUOTA}"]) as cluster:
        yield cluster


async def test_nospace_and_recovery_under_load(small_cluster: EtcdCluster) -> None:
    cluster = small_cluster
    config = make_config(cluster.endpoints, session_ttl=10, request_timeout=3.0)
    async with open_client(cluster.endpoints) as client, open_daemon(config) as daemon:
        rg = regional(daemon)
        fleet = Fleet(daemon.urls["regional"], Store(client))
        await fleet.enrol()
        stop = trio.Event()
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            nursery.start_soon(fleet.run, stop)
            await acked_more(fleet, 30)
            # History fills the database: one key rewritten until etcd refuses.
            with pytest.raises(EtcdNoSpaceError):
                for _ in range(400):
                    await client.put("/filler", b"x" * (256 << 10))
            full_at = trio.current_time()
            readyz = daemon.urls["regional"] + "/readyz"

            async def ready_is(code: int) -> bool:
                return (await http.get(readyz)).status_code == code

            await wait_for(lambda: ready_is(503), what="readyz 503 during NOSPACE")
            # The operator's recovery (README): compact, defragment, disarm.
            await client.delete("/filler")
            await client.compact((await client.status()).revision)
            cfg = EtcdConfig(endpoints=tuple(cluster.endpoints))
            await defragment_members(cfg, timeout=5.0, defrag_timeout=60.0)
            for member_id, alarm in await client.alarms():
                await client.disarm(member_id, alarm)
            recovered_at = trio.current_time()
            await acked_more(fleet, 30)
            await wait_for(lambda: ready_is(200), what="readyz 200 again")
            stop.set()
        verdict = await fleet.verify(client)
        resumed = fleet.resumed_after(recovered_at)
        during = sum(1 for t in fleet.acks if full_at + 0.5 < t < recovered_at)
        print(f"\nNOSPACE: {verdict}; acks during the alarm {during}; resumed after {resumed}")
        assert verdict.lost == 0 and verdict.duplicated == 0, verdict
        assert rg.session.restarts == 0
    record(
        "NOSPACE under load, then compact + defrag + disarm",
        f"writes refused with 503 (readyz 503, {during} acknowledged) for "
        f"{recovered_at - full_at:.1f} s; resumed "
        f"{resumed:.2f} s after disarm by themselves; {verdict.acked} acknowledged steps, "
        "0 lost, 0 duplicated",
    )
