"""The control plane's lease reaper, against a real etcd.

When an agent's lease key disappears while its task is approved or installing, the task
must be failed ("agent heartbeat lost", naming the last step) within 1 s of the delete;
finished, cancelled and deleted tasks are left alone; a delete the watch never delivered
(lost to compaction while disconnected) is still reaped after the relist.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio
from fault_table import record
from provisioning_kit import (
    GUIDE_TASK,
    HARDWARE,
    keyspace,
    make_config,
    open_daemon,
    open_proxy,
    wait_for,
)

from lpmosd import hooks, schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.config import ROLE_CONTROL_PLANE, DisruptionConfig
from lpmosd.credentials import AgentToken
from lpmosd.documents import MachineMeta, TaskStatus
from lpmosd.etcd import EtcdClient, candidate_key, open_client, put
from lpmosd.etcd_process import EtcdProcess
from lpmosd.roles.reaper import HEARTBEAT_LOST
from lpmosd.store import Store
from lpmosd.timestamps import utcnow

S = TaskStatus
IDC, MAC = "dc1", "00:1a:2b:3c:4d:5e"
CP_ONLY = frozenset({ROLE_CONTROL_PLANE})


#: The session key of the IDC's (fake) regional.
REGIONAL_KEY = schema.regional_election_prefix(IDC) + "1"


async def regional_up(client: EtcdClient, lease_ttl: int = 60) -> None:
    """The IDC's regional holds its session (the reaper fails nothing while it does not:
    see lpmosd.roles.disruption), announcing ``lease_ttl`` for its agents."""
    value = f'{{"role":"regional","agent_lease_ttl":"{lease_ttl}"}}'
    await client.put(REGIONAL_KEY, value)


async def setup_task(store: Store, client: EtcdClient, sn: str, status: TaskStatus) -> int:
    """A task for ``sn`` in ``status`` whose agent holds a live lease; returns the lease."""
    await regional_up(client)
    req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn})
    await store.create_task(req, actor="test")
    lease = await client.lease_grant(60)
    meta = MachineMeta.from_report(HARDWARE, now=utcnow())
    # Registration issues the agent's token with the lease key (the reaper only asks
    # whether one was issued).
    token, _ = AgentToken.issue(task_id="t", mac=MAC, now=utcnow())
    await store.register_agent(IDC, sn, mac=MAC, meta=meta, lease_id=lease.id, token=token)
    if status is S.PENDING:
        return lease.id
    if status is S.CANCELLED:
        await store.cancel(IDC, sn, actor="op")
    else:
        await store.approve(IDC, sn, approved_by="op")
    if status in (S.INSTALLING, S.COMPLETED):
        await store.record_progress(IDC, sn, step="partitioning", percent=40, message="")
    if status is S.COMPLETED:
        await store.finish(IDC, sn, outcome=S.COMPLETED)
    if status in (S.COMPLETED, S.CANCELLED):
        # Finishing dropped the lease key; an agent that lingers could still hold one.
        await client.put(schema.lease_key(IDC, sn), f"lease-{lease.id}", lease=lease.id)
    return lease.id


async def wait_status(store: Store, sn: str, status: TaskStatus, *, timeout: float = 5.0) -> float:
    """Poll until the task of ``sn`` has ``status``; the trio time it was seen."""
    with trio.fail_after(timeout):
        while (await store.get_task(IDC, sn)).task.status is not status:  # noqa: ASYNC110
            await trio.sleep(0.005)
    return trio.current_time()


@pytest.mark.parametrize("status", [S.APPROVED, S.INSTALLING])
@pytest.mark.parametrize("how", ["delete", "revoke"])
async def test_lost_lease_fails_task_within_one_second(
    etcd: EtcdProcess, store: Store, client: EtcdClient, status: TaskStatus, how: str
) -> None:
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        lease_id = await setup_task(store, client, "sn-001", status)
        await setup_task(store, client, "sn-002", status)  # its agent stays alive
        t0 = trio.current_time()
        if how == "delete":
            await client.delete(schema.lease_key(IDC, "sn-001"))
        else:
            await client.lease_revoke(lease_id)
        took = await wait_status(store, "sn-001", S.FAILED) - t0
        assert took < 1.0, f"reaped {took:.3f}s after the lease key went"
        task = (await store.get_task(IDC, "sn-001")).task
        assert task.error == HEARTBEAT_LOST
        assert task.status_history[-1].actor == "reaper"
        if status is S.INSTALLING:
            assert "at step partitioning" in task.logs[-1]
        entry = {s.sn: s for s in await store.list_servers(IDC)}["sn-001"]
        assert entry.status is S.FAILED
        await trio.sleep(0.3)
        assert (await store.get_task(IDC, "sn-002")).task.status is status
        assert daemon.control_plane is not None and daemon.control_plane.reaped == 1


async def test_idle_finished_and_deleted_tasks_are_left_alone(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """Lease keys vanishing under pending, completed and cancelled tasks, and with a
    deleted task, change nothing: no task is failed or resurrected."""
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        for sn, status in (("sn-p", S.PENDING), ("sn-c", S.COMPLETED), ("sn-x", S.CANCELLED)):
            await setup_task(store, client, sn, status)
            await client.delete(schema.lease_key(IDC, sn))
        await setup_task(store, client, "sn-d", S.INSTALLING)
        await store.cancel(IDC, "sn-d", actor="op")
        await store.delete_task(IDC, "sn-d")  # its lease key goes with the machine's keys
        before = await keyspace(client)
        assert not [k for k in before if b"sn-d" in k]
        await trio.sleep(1.2)
        assert await keyspace(client) == before
        assert daemon.control_plane is not None and daemon.control_plane.reaped == 0


async def test_delete_lost_to_compaction_is_still_reaped(private_etcd: EtcdProcess) -> None:
    """The control plane's connection is cut while the lease key is deleted and the
    history compacted; when it reconnects the watch cannot replay the delete, and the
    relist diff must still fail the task."""
    async with (
        open_client(private_etcd.endpoints) as client,
        open_proxy(private_etcd.client_port) as proxy,
    ):
        store = Store(client)
        config = make_config([proxy.endpoint], roles=CP_ONLY, request_timeout=2)
        async with open_daemon(config) as daemon:
            cp = daemon.control_plane
            assert cp is not None
            await setup_task(store, client, "sn-001", S.INSTALLING)
            view = cp.view
            assert view is not None
            with trio.fail_after(5):
                while view.get(schema.lease_key(IDC, "sn-001")) is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            relists = view.relists

            proxy.cut()
            r = await client.delete(schema.lease_key(IDC, "sn-001"))
            await client.put("/unrelated", "bump")
            await client.compact(r.revision + 1)
            await trio.sleep(0.5)
            assert (await store.get_task(IDC, "sn-001")).task.status is S.INSTALLING
            proxy.heal()

            await wait_status(store, "sn-001", S.FAILED, timeout=10)
            assert cp.view is view, "the session survived the short cut"
            assert view.relists == relists + 1
            task = (await store.get_task(IDC, "sn-001")).task
            assert task.error == HEARTBEAT_LOST


async def test_installing_task_without_lease_at_start_is_reaped(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """The delete happened while no control plane was running: the task gets one lease TTL
    for its agent to come back (what happened meanwhile is unknown), then fails."""
    await setup_task(store, client, "sn-001", S.INSTALLING)
    await regional_up(client, lease_ttl=2)
    await client.delete(schema.lease_key(IDC, "sn-001"))
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        cp = daemon.control_plane
        assert cp is not None
        t0 = trio.current_time()
        await wait_for(lambda: cp.guard is not None, what="the control plane's session")
        assert cp.agent_state(IDC, "sn-001")["agent_state"] in ("offline", "unreachable")
        took = await wait_status(store, "sn-001", S.FAILED) - t0
        assert took >= 2 - 0.1, f"failed {took:.2f}s after start, before a lease TTL"


async def test_start_up_scan_covers_every_state_with_an_agent(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """Like the live path: an approved task whose registered agent's lease went while no
    control plane ran is reaped too (review finding, issue 15); one approved but never
    registered (no agent token: retried, or its machine has not booted) is left alone."""
    await setup_task(store, client, "sn-a", S.APPROVED)
    await client.delete(schema.lease_key(IDC, "sn-a"))
    await setup_task(store, client, "sn-r", S.INSTALLING)
    await store.finish(IDC, "sn-r", outcome=S.FAILED, reason="disk")
    await store.retry(IDC, "sn-r", actor="op")  # approved again, waiting for its agent
    await regional_up(client, lease_ttl=2)  # found at start: a lease TTL of grace first
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        await wait_status(store, "sn-a", S.FAILED)
        assert (await store.get_task(IDC, "sn-a")).task.error == HEARTBEAT_LOST
        cp = daemon.control_plane
        assert cp is not None
        with trio.fail_after(5):
            while cp.reaped < 1:  # noqa: ASYNC110 - a counter, not an event
                await trio.sleep(0.01)
        assert (await store.get_task(IDC, "sn-r")).task.status is S.APPROVED


async def test_a_burst_of_lost_leases_is_never_dropped(
    etcd: EtcdProcess, store: Store, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """More lease keys vanish at once (one revoke) than any fixed queue would hold: every
    one is looked at and no reap is dropped (review finding, issue 15). The plain reaper:
    with the disruption guard three agents dying at once, alone in their IDC, would be a
    disrupted IDC (see test_many_agents_silent_at_once_are_kept_until_the_idc_recovers)."""
    lease = await client.lease_grant(60)
    real = ["zz-1", "zz-2", "zz-3"]
    config = make_config(etcd.endpoints, roles=CP_ONLY)
    assert config.control_plane is not None
    plain = dataclasses.replace(config.control_plane, disruption=DisruptionConfig(enabled=False))
    async with open_daemon(dataclasses.replace(config, control_plane=plain)) as daemon:
        cp = daemon.control_plane
        assert cp is not None
        for sn in real:
            await setup_task(store, client, sn, S.INSTALLING)
            await client.put(schema.lease_key(IDC, sn), f"lease-{lease.id}", lease=lease.id)
        # Lease keys of machines whose tasks were deleted meanwhile: cheap to write, and
        # each must still be looked at.
        fake = [schema.lease_key(IDC, f"gone-{i:05d}") for i in range(10_100)]
        for i in range(0, len(fake), 128):
            await client.txn([], [put(k, "x", lease=lease.id) for k in fake[i : i + 128]], [])
        await client.lease_revoke(lease.id)
        for sn in real:
            await wait_status(store, sn, S.FAILED, timeout=20)
        with trio.fail_after(20):
            while cp.lease_losses < len(fake) + len(real):  # noqa: ASYNC110 - a counter
                await trio.sleep(0.05)
        assert cp.lease_losses == len(fake) + len(real)
    assert "reaper queue full" not in caplog.text


async def test_corrupt_task_document_does_not_kill_the_reaper(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """A lease key vanishing under an unreadable task document (a hand-made etcdctl put)
    is logged and skipped; the reaper, its session and the daemon carry on."""
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        cp = daemon.control_plane
        assert cp is not None
        await regional_up(client)
        lease = await client.lease_grant(60)
        await client.put(schema.task_key(IDC, "sn-bad"), b'{"status": "installing"}')
        await client.put(schema.lease_key(IDC, "sn-bad"), f"lease-{lease.id}", lease=lease.id)
        await setup_task(store, client, "sn-001", S.INSTALLING)
        await client.delete(schema.lease_key(IDC, "sn-bad"))
        await client.delete(schema.lease_key(IDC, "sn-001"))
        await wait_status(store, "sn-001", S.FAILED)
        # The reaper counts after its Txn returns; the status can be seen a moment before.
        with trio.fail_after(5):
            while cp.reaped < 1:  # noqa: ASYNC110 - a counter, not an event
                await trio.sleep(0.01)
        assert cp.session.running and cp.session.restarts == 0
        assert cp.reaped == 1


async def test_reaper_works_across_a_session_restart(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """The control plane's session lease revoked from outside: the session (view, reaper)
    restarts with a fresh lease, and a lease lost after that is still reaped."""
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        cp = daemon.control_plane
        assert cp is not None and cp.session.lease is not None
        old_lease, old_view = cp.session.lease.id, cp.view
        kv = await client.get(candidate_key(schema.CONTROL_PLANE_ELECTION, old_lease))
        assert kv is not None and kv.lease == old_lease
        await client.lease_revoke(old_lease)
        with trio.fail_after(10):
            while not (cp.session.restarts == 1 and cp.session.running):  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert cp.session.lease is not None and cp.session.lease.id != old_lease
        assert cp.view is not None and cp.view is not old_view
        await setup_task(store, client, "sn-001", S.INSTALLING)
        t0 = trio.current_time()
        await client.delete(schema.lease_key(IDC, "sn-001"))
        assert await wait_status(store, "sn-001", S.FAILED) - t0 < 1.0


async def test_two_control_planes_one_reaps_and_a_paused_leader_writes_nothing(
    etcd: EtcdProcess, store: Store, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Both serve the API; only the leader reaps. A leader "paused" (its reaper held at a
    named point, shielded from cancellation like a stopped process) past the loss of its
    lease sends its reap when it resumes: etcd refuses it, the new leader reaps instead."""
    config = make_config(etcd.endpoints, roles=CP_ONLY)
    async with open_daemon(config) as d1:
        first = d1.control_plane
        assert first is not None
        await wait_for(lambda: first.session.active, what="first leads")
        async with open_daemon(config) as d2:
            second = d2.control_plane
            assert second is not None
            await wait_for(lambda: second.view is not None, what="second serves")
            assert second.session.running and second.session.leadership == "standby"
            async with httpx.AsyncClient() as http:
                for daemon, leadership in ((d1, "active"), (d2, "standby")):
                    r = await http.get(daemon.urls["control-plane"] + "/readyz")
                    assert r.status_code == 200, "the API works on every instance"
                    assert r.json()["leadership"] == leadership

            await setup_task(store, client, "sn-001", S.INSTALLING)
            await client.delete(schema.lease_key(IDC, "sn-001"))
            await wait_status(store, "sn-001", S.FAILED)
            await wait_for(lambda: first.reaped == 1, what="the leader's count")
            assert second.reaped == 0

            await setup_task(store, client, "sn-002", S.INSTALLING)
            old_lease = first.session.lease
            assert old_lease is not None
            paused: list[int] = []
            entered: list[bool] = []

            async def pause() -> None:
                if entered:
                    return  # the new leader's reaper passes the same point
                entered.append(True)
                with trio.CancelScope(shield=True):
                    await client.lease_revoke(old_lease.id)
                    await wait_for(lambda: second.session.active, what="second leads")
                    await wait_for(lambda: second.reaped == 1, what="the new leader reaps")
                    paused.append((await client.get_prefix(schema.ROOT)).revision)

            with hooks.install("reaper.before-fail", pause):
                await client.delete(schema.lease_key(IDC, "sn-002"))
                await wait_for(lambda: first.session.restarts == 1, what="first restarts")
                await wait_for(lambda: first.session.running, what="first back")
            assert first.session.leadership == "standby"
            assert (first.reaped, second.reaped) == (1, 1), "the new leader reaped sn-002"
            writes = [
                kv.key
                for kv in (await client.get_prefix(schema.ROOT)).kvs
                if kv.mod_revision > paused[0]
                and not kv.key.startswith(schema.CONTROL_PLANE_ELECTION.encode())
            ]
            assert writes == [], "the paused leader wrote after losing its leadership"
            # It did send its reap: etcd refused it on the fence.
            refused = [r for r in caplog.records if r.getMessage() == "reap refused"]
            assert refused and "lost the leadership" in refused[0].__dict__["error"]
            history = (await store.get_task(IDC, "sn-002")).task.status_history
            assert [h.status for h in history].count(S.FAILED) == 1
    record(
        "control-plane leader's reap held past its lease (2 control planes)",
        "the standby took over and reaped; the old leader's fenced Txn was refused: 0 writes",
    )


async def test_many_agents_silent_at_once_are_kept_until_the_idc_recovers(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """The regional keeps its session but most agents go silent together (their network
    failed): their tasks are marked unreachable, not failed. Those heard again carry on;
    the one that stays silent is failed a lease TTL after the IDC is healthy again."""
    ttl = 4
    sns = [f"sn-{i}" for i in range(8)]
    silent, healthy = sns[:6], sns[6:]
    leases: dict[str, int] = {}

    async def bind(sn: str) -> None:
        lease = await client.lease_grant(ttl)
        await client.put(schema.lease_key(IDC, sn), f"lease-{lease.id}", lease=lease.id)
        leases[sn] = lease.id

    async def keep_alive(nursery_sns: list[str]) -> None:
        while True:
            for sn in nursery_sns:
                await client.keepalive_once(leases[sn])
            await trio.sleep(0.5)

    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        cp = daemon.control_plane
        assert cp is not None
        for sn in sns:
            await setup_task(store, client, sn, S.INSTALLING)
        await regional_up(client, lease_ttl=ttl)
        for sn in sns:
            await bind(sn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, healthy)
            # The six silent leases expire together, a lease TTL from now.
            with trio.fail_after(ttl + 5):
                while True:
                    guard = cp.guard
                    if guard and all(guard.unreachable_since(IDC, sn) for sn in silent):
                        break
                    await trio.sleep(0.05)
            listed = {t.sn: t.status for t in await store.list_tasks(idc=IDC)}
            assert listed == dict.fromkeys(sns, S.INSTALLING)
            assert cp.agent_state(IDC, silent[0])["agent_state"] == "unreachable"
            assert cp.agent_state(IDC, healthy[0]) == {"agent_state": "online"}
            # Five agents come back (they register again: new leases); one never does.
            back = silent[:5]
            for sn in back:
                await bind(sn)
            nursery.start_soon(keep_alive, back)
            t_back = trio.current_time()
            took = await wait_status(store, silent[5], S.FAILED, timeout=ttl * 3) - t_back
            assert took >= ttl - 0.5, f"failed {took:.2f}s after the IDC recovered"
            task = (await store.get_task(IDC, silent[5])).task
            assert task.error == HEARTBEAT_LOST
            listed = {t.sn: t.status for t in await store.list_tasks(idc=IDC)}
            assert listed == {**dict.fromkeys(sns, S.INSTALLING), silent[5]: S.FAILED}
            assert guard.unreachable_counts() == {IDC: 0}
            nursery.cancel_scope.cancel()
        assert cp.reaped == 1
