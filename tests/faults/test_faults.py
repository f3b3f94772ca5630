"""Faults of a real 3-member etcd cluster while installs are in flight.

The daemon (control plane and regional, in this process) reaches the members through
one TCP proxy each (:mod:`tests.faults.conftest`), so a test can cut or blackhole one
endpoint; simulated agents (:mod:`tests.faults.kit`) report through the regional's API.
Faults are triggered at known points (after so many acknowledged writes), never after a
sleep; how long writes stopped is measured and printed, not asserted. Each test adds its
row to the fault x outcome table printed at the end of the run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
from fault_table import record
from provisioning_kit import TcpProxy, make_config, open_daemon, wait_for

from lpmosd import hooks, schema
from lpmosd.config import ROLE_REGIONAL, Config, EtcdAuth
from lpmosd.daemon import Daemon
from lpmosd.errors import EtcdError
from lpmosd.etcd import Auth, EtcdClient, open_client
from lpmosd.etcd_process import EtcdCluster, EtcdProcess
from lpmosd.roles.regional import Regional
from lpmosd.store import Store
from lpmosd.view import Change, PrefixView

from .kit import IDC, Fleet
from .netns import NetnsCluster

ROOT_PASSWORD = "fault-suite-root"


def config_for(proxies: list[TcpProxy], first: int = 0) -> Config:
    """The daemon's config: every member's proxy, member ``first`` first (where the
    client connects)."""
    order = [proxies[first], *(p for i, p in enumerate(proxies) if i != first)]
    return make_config([p.endpoint for p in order], session_ttl=10, request_timeout=3.0)


def regional(daemon: Daemon) -> Regional:
    assert daemon.regional is not None
    return daemon.regional


async def acked_more(fleet: Fleet, count: int, *, timeout: float = 30) -> None:
    """Until ``count`` more writes were acknowledged than now."""
    target = len(fleet.acks) + count
    await wait_for(lambda: len(fleet.acks) >= target, timeout=timeout, what=f"{count} acks")


async def view_matches_etcd(view: PrefixView, client: EtcdClient) -> None:
    """The view holds exactly what a Range of its prefix returns (once it caught up).

    Caught up: it has the newest write under its prefix. Its revision moves only with
    events under the prefix, so it can stay below the Range's (header) revision for good:
    the servers view hears nothing while writes keep a server's status.
    """
    listing = await client.get_prefix(view.prefix)
    newest = max((kv.mod_revision for kv in listing.kvs), default=0)
    await wait_for(lambda: view.revision >= newest, what="the view to catch up")
    want = {kv.key.decode(): (kv.value, kv.mod_revision) for kv in listing.kvs}
    have = {key: (kv.value, kv.mod_revision) for key, kv in view.items.items()}
    assert have == want


def member_index(cluster: EtcdCluster, member: EtcdProcess) -> int:
    return cluster.members.index(member)


async def test_kill_9_the_leader_member(etcd_cluster: EtcdCluster, proxies: list[TcpProxy]) -> None:
    leader = etcd_cluster.leader()
    # The daemon talks to the leader itself: its in-flight writes die with it.
    config = config_for(proxies, first=member_index(etcd_cluster, leader))
    async with open_client(etcd_cluster.endpoints) as client, open_daemon(config) as daemon:
        fleet = Fleet(daemon.urls["regional"], Store(client))
        await fleet.enrol()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run, stop)
            await acked_more(fleet, 60)
            killed_at = trio.current_time()
            await trio.to_thread.run_sync(leader.kill)
            await acked_more(fleet, 120)
            stop.set()
        verdict = await fleet.verify(client)
        resumed = fleet.resumed_after(killed_at)
        gap = fleet.longest_gap(killed_at)
        rg = regional(daemon)
        print(
            f"\nkill -9 leader: {verdict}; first ack {resumed:.2f}s after, longest gap {gap:.2f}s"
        )
        assert verdict.lost == 0, verdict
        assert verdict.duplicated == 0, verdict
        assert rg.session.restarts == 0, "the session lease survives a leader's death"
    record(
        "kill -9 the etcd leader (the daemon's own member)",
        f"{verdict.acked} acknowledged steps: 0 lost, 0 duplicated; writes stopped for "
        f"{gap:.2f} s at most (longest gap between acknowledged writes); session kept",
    )


@pytest.mark.parametrize(
    "rounds",
    [pytest.param(1, id="1-round"), pytest.param(5, id="5-rounds", marks=pytest.mark.slow)],
)
async def test_members_restarted_in_a_loop_under_watch(
    etcd_cluster: EtcdCluster, proxies: list[TcpProxy], rounds: int
) -> None:
    async with (
        open_client(etcd_cluster.endpoints) as client,
        open_daemon(config_for(proxies)) as daemon,
    ):
        fleet = Fleet(daemon.urls["regional"], Store(client))
        await fleet.enrol()
        stop = trio.Event()
        restarts = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run, stop)
            for _ in range(rounds):
                for member in etcd_cluster.members:
                    await acked_more(fleet, 15)
                    await trio.to_thread.run_sync(member.restart)
                    restarts += 1
            await acked_more(fleet, 15)
            stop.set()
        verdict = await fleet.verify(client)
        rg = regional(daemon)
        assert rg.machines is not None and rg.servers is not None
        await view_matches_etcd(rg.machines, client)
        await view_matches_etcd(rg.servers, client)
        assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        f"restart each member in turn, {restarts} restarts, under watch",
        f"regional's views equal a Range at the end; {verdict.acked} acknowledged steps, "
        "0 lost, 0 duplicated",
    )


async def test_watcher_cut_off_while_keys_are_deleted_and_compacted(
    etcd_cluster: EtcdCluster, proxies: list[TcpProxy]
) -> None:
    prefix = schema.machines_prefix(IDC)
    async with (
        open_client(etcd_cluster.endpoints) as client,
        open_client([proxies[0].endpoint]) as watcher_client,
    ):
        for i in range(40):
            await client.put(f"{prefix}sn-{i:03d}/lease", f"lease-{i}")
        view = PrefixView(watcher_client, prefix)
        deleted: list[str] = []

        def on_change(change: Change) -> None:
            if change.kv is None:
                deleted.append(change.key)

        view.listeners.append(on_change)
        async with trio.open_nursery() as nursery:
            await nursery.start(view.run)
            proxies[0].cut()
            gone = [f"{prefix}sn-{i:03d}/lease" for i in range(0, 40, 2)]
            for key in gone:
                await client.delete(key)
            r = await client.put(f"{prefix}sn-999/lease", "after")
            await client.compact(r.revision)
            proxies[0].heal()
            await wait_for(lambda: len(deleted) >= len(gone), what="every delete")
            await view_matches_etcd(view, client)
            nursery.cancel_scope.cancel()
        assert sorted(deleted) == sorted(gone)
        assert view.relists >= 1, "the history was compacted: only a relist can tell"
    record(
        "watcher cut off while 20 keys are deleted and history compacted",
        "every delete surfaced (from the relist diff); view equals a Range",
    )


@pytest.mark.parametrize(
    "seconds", [pytest.param(6, id="6s"), pytest.param(60, id="60s", marks=pytest.mark.slow)]
)
async def test_one_endpoint_blackholed(
    etcd_cluster: EtcdCluster, proxies: list[TcpProxy], seconds: int
) -> None:
    async with (
        open_client(etcd_cluster.endpoints) as client,
        open_daemon(config_for(proxies)) as daemon,
    ):
        rg = regional(daemon)
        # About 5 steps a second per agent: a minute of it stays under the log cap.
        fleet = Fleet(
            daemon.urls["regional"], Store(client), interval=0.02 if seconds < 30 else 0.2
        )
        await fleet.enrol()
        leases = {a.sn: rg.agents.lease_id(a.sn) for a in fleet.agents}
        session_lease = rg.session.lease
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.run, stop)
            await acked_more(fleet, 30)
            frozen_at = trio.current_time()
            proxies[0].freeze()
            await trio.sleep(seconds)  # the fault's duration, not a wait for an outcome
            proxies[0].heal()
            await acked_more(fleet, 30)
            stop.set()
        verdict = await fleet.verify(client)
        gap = fleet.longest_gap(frozen_at)
        moved_to = rg.client.current_endpoint
        print(f"\nblackhole {seconds}s: {verdict}; longest write gap {gap:.2f}s; now on {moved_to}")
        assert moved_to != proxies[0].endpoint, "requests moved to another member"
        assert rg.session.restarts == 0 and rg.session.lease is session_lease, "session kept"
        for sn, lease in leases.items():
            info = await client.lease_time_to_live(lease or 0)
            assert info is not None and info.ttl > 0, f"agent lease of {sn} lost"
        assert rg.machines is not None
        await view_matches_etcd(rg.machines, client)
        assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        f"one endpoint blackholed {seconds} s",
        f"requests and streams moved to another member; session and {len(leases)} agent "
        f"leases kept; longest write gap {gap:.1f} s; 0 lost, 0 duplicated",
    )


async def test_expired_auth_token(tmp_path: Path) -> None:
    """Auth on, simple tokens expiring after one idle second: the daemon idles past it
    between two bursts of installs; every role re-authenticates and carries on."""
    with EtcdCluster(3, extra_args=["--auth-token=simple", "--auth-token-ttl=1"]) as cluster:
        ctl = cluster.members[0].etcdctl
        ctl("user", "add", f"root:{ROOT_PASSWORD}")
        ctl("auth", "enable")
        secret = tmp_path / "etcd-password"
        secret.write_text(ROOT_PASSWORD + "\n")
        config = make_config(cluster.endpoints, session_ttl=10, request_timeout=3.0)
        auth = EtcdAuth(username="root", password_file=secret)
        config = replace(config, etcd=replace(config.etcd, auth=auth))
        async with (
            open_client(cluster.endpoints, auth=Auth("root", ROOT_PASSWORD)) as client,
            open_daemon(config) as daemon,
        ):
            rg = regional(daemon)
            fleet = Fleet(daemon.urls["regional"], Store(client))
            await fleet.enrol()
            generation = rg.client.token_generation
            for burst in range(2):
                if burst:
                    generation = rg.client.token_generation
                    await trio.sleep(2.5)  # idle: every token of the daemon expires
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fleet.run, stop)
                    await acked_more(fleet, 40)
                    stop.set()
            refreshed = rg.client.token_generation - generation
            verdict = await fleet.verify(client)
            assert refreshed >= 1, "the expired token was replaced"
            assert rg.session.restarts == 0, "the session survived the expiry"
            assert rg.machines is not None
            await view_matches_etcd(rg.machines, client)
            assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        "auth token expired (simple token, 1 s TTL, daemon idle 2.5 s)",
        f"re-authenticated ({refreshed}x), session kept, watch resumed; {verdict.acked} "
        "acknowledged steps, 0 lost, 0 duplicated",
    )


async def test_paused_leader_wakes_after_losing_leadership(
    etcd_cluster: EtcdCluster, proxies: list[TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The active regional pauses between deciding to write and sending the Txn; meanwhile
    its lease expires and the standby takes over. Woken, it sends: etcd refuses."""
    roles = frozenset({ROLE_REGIONAL})
    first_config = replace(config_for(proxies), roles=roles, control_plane=None)
    second_config = replace(
        first_config, etcd=replace(first_config.etcd, endpoints=tuple(etcd_cluster.endpoints))
    )
    async with open_client(etcd_cluster.endpoints) as client, open_daemon(first_config) as da:
        first = regional(da)
        await wait_for(lambda: first.session.active, what="first regional active")
        async with open_daemon(second_config) as db:
            second = regional(db)
            await wait_for(lambda: second.session.running, what="second regional standby")
            assert second.session.leadership == "standby"
            fleet = Fleet(da.urls["regional"], Store(client))
            await fleet.enrol()
            armed = trio.Event()
            woke_at: list[int] = []

            async def pause() -> None:
                if not armed.is_set() or woke_at:
                    return
                woke_at.append(0)
                lease = first.session.lease
                assert lease is not None
                # What etcd does to a paused process's lease once its TTL is over.
                await client.lease_revoke(lease.id)
                # Active, and done with what a new leader writes first (its OS types):
                # every write after this point would be the woken one's.
                await wait_for(
                    lambda: second.session.active and second.boot.published.is_set(),
                    what="the standby takes over",
                )
                woke_at[0] = (await client.get_prefix(schema.ROOT)).revision

            stop = trio.Event()
            with hooks.install("etcd.fenced-txn", pause):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fleet.run, stop)
                    await acked_more(fleet, 30)
                    armed.set()
                    await wait_for(lambda: first.session.restarts == 1, what="first restarts")
                    await wait_for(lambda: first.session.running, what="first back")
                    stop.set()
            assert first.session.leadership == "standby"
            written = [
                kv.key.decode()
                for kv in (await client.get_prefix(schema.ROOT)).kvs
                if kv.mod_revision > woke_at[0]
                and not kv.key.startswith(schema.regional_election_prefix(IDC).encode())
            ]
            verdict = await fleet.verify(client)
            refused = [
                r for r in caplog.records if "lost the leadership" in str(r.__dict__.get("error"))
            ]
            assert refused, "the woken leader sent its write and etcd refused it"
            assert written == [], "the woken leader wrote"
            assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        "active regional paused mid-write past its lease; standby took over",
        "woken, its fenced Txn was refused by etcd: 0 keys written; "
        f"{verdict.acked} acknowledged steps, 0 lost, 0 duplicated",
    )


async def a_follower(urls: list[str]) -> int:
    """The index of a member that does not lead the cluster now."""
    with trio.fail_after(10):
        while True:
            for i, url in enumerate(urls):
                async with open_client([url]) as c:
                    status = await c.status()
                if status.leader and status.member_id != status.leader:
                    return i
            await trio.sleep(0.05)


async def test_member_partitioned_from_its_peers() -> None:
    """A follower cut off from its peers still answers its clients: no read through it
    may return what the majority already overwrote, and the daemon that was using it
    moves to the majority side with its installs."""
    with NetnsCluster() as cluster:
        urls = cluster.endpoints
        # A follower, by name: cutting off the Raft leader instead would make the majority
        # hold an election first, and the test would depend on its timing.
        isolated = await a_follower(urls)
        majority = [u for i, u in enumerate(urls) if i != isolated]
        config = make_config([urls[isolated], *majority], session_ttl=10, request_timeout=3.0)
        async with (
            open_client(majority) as client,
            open_client([urls[isolated]], request_timeout=1.0) as via_isolated,
            open_daemon(config) as daemon,
        ):
            await client.put("/fault/k", "before")
            assert (await via_isolated.get("/fault/k")) is not None
            rg = regional(daemon)
            fleet = Fleet(daemon.urls["regional"], Store(client))
            await fleet.enrol()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.run, stop)
                await acked_more(fleet, 30)
                cut_at = trio.current_time()
                await trio.to_thread.run_sync(cluster.partition, isolated)
                await client.put("/fault/k", "after")
                reads = []
                for _ in range(2):
                    try:
                        kv = await via_isolated.get("/fault/k")
                    except EtcdError as exc:
                        reads.append(type(exc).__name__)
                    else:
                        assert kv is not None and kv.value == b"after", "a stale read"
                        reads.append("fresh")
                # A serializable read is answered locally: that is the stale value a
                # linearizable read (all lpmosd does) never returns.
                local = await via_isolated.range("/fault/k", serializable=True)
                assert local.kvs[0].value == b"before"
                await acked_more(fleet, 30)
                # Where the daemon is while cut off (after the heal any member will do).
                during_partition = rg.client.current_endpoint
                await trio.to_thread.run_sync(cluster.heal, isolated)
                await acked_more(fleet, 15)
                stop.set()
            verdict = await fleet.verify(client)
            gap = fleet.longest_gap(cut_at)
            print(f"\npartition: reads via the isolated member {reads}; {verdict}; gap {gap:.2f}s")
            assert during_partition != urls[isolated]
            assert rg.machines is not None
            await view_matches_etcd(rg.machines, client)
            assert verdict.lost == 0 and verdict.duplicated == 0, verdict
    record(
        "a follower partitioned from its peers (the daemon's own member)",
        f"linearizable reads through it: {', '.join(sorted(set(reads)))} — never stale; the "
        f"daemon moved to the majority (longest write gap {gap:.1f} s); 0 lost, 0 duplicated",
    )
