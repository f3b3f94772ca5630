"""The regional role: its session lease, the cleanup when it is lost, lease re-attachment.

Session loss is made real twice: the session lease is revoked from outside (its id is in
the session key), and etcd is frozen (SIGSTOP) for longer than the session TTL. Either way
the session's nursery must be cancelled — nothing of the old session left running — and
the role must come back with a fresh lease. Meanwhile the agent API serves from the last
view: reads answer, reports are journaled (202) and applied when etcd is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    TcpProxy,
    make_config,
    open_daemon,
    register_agent,
    wait_for,
)

from lpmosd import hooks, schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.config import ROLE_REGIONAL
from lpmosd.daemon import Daemon
from lpmosd.etcd import EtcdClient, candidate_key, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.roles.regional import Regional
from lpmosd.store import Store
from lpmosd.view import PrefixView


def session_key(lease_id: int) -> str:
    """The regional's session key: its candidacy in dc1's election."""
    return candidate_key(schema.regional_election_prefix("dc1"), lease_id)


RG_ONLY = frozenset({ROLE_REGIONAL})
SN, MAC = "sn-001", "00:1a:2b:3c:4d:5e"


def walk_tasks(task: trio.lowlevel.Task | None = None) -> Iterator[trio.lowlevel.Task]:
    """Every live Trio task of the run."""
    task = task or trio.lowlevel.current_root_task()
    assert task is not None
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from walk_tasks(child)


def tasks_running_for(obj: object) -> list[trio.lowlevel.Task]:
    """Live tasks whose outermost coroutine is a method of ``obj`` (e.g. ``view.run``)."""
    found = []
    for task in walk_tasks():
        frame = getattr(task.coro, "cr_frame", None)
        if frame is not None and frame.f_locals.get("self") is obj:
            found.append(task)
    return found


def regional(daemon: Daemon) -> Regional:
    assert daemon.regional is not None
    return daemon.regional


async def create_and_register(store: Store, url: str) -> dict[str, str]:
    """Create the task, register its agent; returns the agent token's header."""
    req = CreateTaskRequest.from_obj(GUIDE_TASK)
    _, secret = await store.create_enrolled_task(req, actor="test")
    async with httpx.AsyncClient(base_url=url) as http:
        r, auth = await register_agent(http, sn=SN, mac=MAC, secret=secret)
        assert r.status_code == 200, r.text
    return auth


async def test_revoked_session_lease_restarts_the_role_cleanly(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    config = make_config(etcd.endpoints, roles=RG_ONLY, session_ttl=3)
    async with open_daemon(config) as daemon:
        rg = regional(daemon)
        auth = await create_and_register(store, rg.url)
        old_lease = rg.session.lease
        old_views: list[PrefixView] = [v for v in (rg.servers, rg.machines) if v is not None]
        assert old_lease is not None and len(old_views) == 2
        assert all(tasks_running_for(v) for v in old_views), "views run in the session"
        kv = await client.get(session_key(old_lease.id))
        assert kv is not None and kv.lease == old_lease.id

        await client.lease_revoke(kv.lease)

        await wait_for(lambda: rg.session.restarts == 1 and rg.session.running, what="restart")
        new_lease = rg.session.lease
        assert new_lease is not None and new_lease.id != old_lease.id
        kv = await client.get(session_key(new_lease.id))
        assert kv is not None and kv.lease == new_lease.id
        assert rg.machines is not None and rg.machines not in old_views
        for view in old_views:
            assert tasks_running_for(view) == [], "a task of the old session survived"
        await wait_for(lambda: rg.machines is not None and rg.machines.synced.is_set())

        # The old views are dead: writes reach only the new ones.
        frozen = [(v.revision, dict(v.items)) for v in old_views]
        await store.append_logs("dc1", SN, ["after the restart"])
        await store.create_task(
            CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": "sn-002"}), actor="test"
        )
        new = rg.machines
        await wait_for(
            lambda: new.get(schema.task_key("dc1", "sn-002")) is not None, what="new view"
        )
        await trio.sleep(0.1)
        assert [(v.revision, dict(v.items)) for v in old_views] == frozen

        # And the agent API serves again, with the agent's own lease untouched.
        async with httpx.AsyncClient(base_url=rg.url, headers=auth) as http:
            r = await http.post(f"/api/v1/agent/{SN}/heartbeat")
            assert r.status_code == 200, r.text
            assert r.json()["lease_ttl"] > 0
            assert (await http.get("/readyz")).status_code == 200


async def test_session_lost_while_etcd_answers_journals_nothing(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    """The active regional's session ends while etcd answers (as when it wakes from a pause
    past its TTL and a standby may lead): until a new session says who leads, reports get
    503 — never a journaled 202 that only this host could apply — and nothing is journaled."""
    config = make_config(etcd.endpoints, roles=RG_ONLY, session_ttl=3)
    ended, release = trio.Event(), trio.Event()

    async def hold() -> None:
        ended.set()
        await release.wait()

    async with open_daemon(config) as daemon:
        rg = regional(daemon)
        auth = await create_and_register(store, rg.url)
        await store.approve("dc1", SN, approved_by="op")
        lease = rg.session.lease
        assert lease is not None and rg.session.active
        async with httpx.AsyncClient(base_url=rg.url, headers=auth) as http:
            with hooks.install("regional.session-ended", hold):
                await client.lease_revoke(lease.id)
                with trio.fail_after(10):
                    await ended.wait()
                assert not rg.session.running and not rg.autonomous
                r = await http.post(
                    f"/api/v1/agent/{SN}/progress", json={"step": "partitioning", "percent": 1}
                )
                assert r.status_code == 503, r.text
                assert "restarting" in r.json()["error"]
                r = await http.post(f"/api/v1/agent/{SN}/heartbeat")
                assert r.status_code == 503, r.text
                assert len(rg.journal) == 0
                release.set()
            await wait_for(lambda: rg.session.active, what="active again")
            r = await http.post(
                f"/api/v1/agent/{SN}/progress", json={"step": "partitioning", "percent": 1}
            )
            assert r.status_code == 200, r.text
        task = (await store.get_task("dc1", SN)).task
        assert [(p.step, p.percent) for p in task.progress][-1] == ("partitioning", 1)


async def test_journal_of_a_cut_off_regional_is_applied_once_a_standby_leads(
    etcd: EtcdProcess, store: Store, tmp_path: Path
) -> None:
    """The active regional is cut off from etcd (WAN) past its session TTL and journals an
    agent's report; the standby takes over. When the link heals the old one is a standby:
    the report it acknowledged (202) is applied all the same — unfenced, still a CAS with
    its operation id — instead of waiting in its journal until it might lead again."""
    async with trio.open_nursery() as nursery:
        proxy = TcpProxy(etcd.client_port)
        await nursery.start(proxy.serve)
        config_a = make_config(
            [proxy.endpoint],
            roles=RG_ONLY,
            session_ttl=3,
            request_timeout=3,
            state_dir=tmp_path / "a",
        )
        config_b = make_config(
            etcd.endpoints, roles=RG_ONLY, session_ttl=3, state_dir=tmp_path / "b"
        )
        async with open_daemon(config_a) as daemon_a:
            a = regional(daemon_a)
            auth = await create_and_register(store, a.url)
            await store.approve("dc1", SN, approved_by="op")
            await wait_for(
                lambda: (
                    a.machines is not None
                    and "approved" in a.machines.items[schema.task_key("dc1", SN)].value.decode()
                ),
                what="the approval in a's view",
            )
            async with open_daemon(config_b) as daemon_b:
                b = regional(daemon_b)
                await wait_for(lambda: b.session.running, what="b's session")
                assert a.session.active and not b.session.active

                proxy.freeze()
                await wait_for(lambda: a.autonomous, timeout=10, what="a serving alone")
                async with httpx.AsyncClient(base_url=a.url, headers=auth, timeout=5) as http:
                    r = await http.post(
                        f"/api/v1/agent/{SN}/progress",
                        json={"step": "partitioning", "percent": 1},
                    )
                assert r.status_code == 202, r.text
                assert len(a.journal) == 1
                await wait_for(lambda: b.session.active, timeout=10, what="b takes over")

                proxy.heal()
                await wait_for(lambda: a.session.running, timeout=15, what="a back, standby")
                assert not a.session.active
                await wait_for(lambda: len(a.journal) == 0, timeout=10, what="journal applied")
                task = (await store.get_task("dc1", SN)).task
                assert [(p.step, p.percent) for p in task.progress][-1] == ("partitioning", 1)
                assert task.status.value == "installing"
        nursery.cancel_scope.cancel()


async def test_frozen_etcd_expires_session_view_serves_journal_applies(
    private_etcd: EtcdProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP etcd past the session TTL: the lease is lost, the agent API serves from its
    view (a progress report is journaled: 202), /readyz says 503; after SIGCONT the role
    restarts with a new lease and the journaled report is applied."""
    caplog.set_level(logging.INFO, "lpmosd")
    config = make_config(private_etcd.endpoints, roles=RG_ONLY, session_ttl=3, request_timeout=3)
    async with open_client(private_etcd.endpoints) as client, open_daemon(config) as daemon:
        rg = regional(daemon)
        store = Store(client)
        auth = await create_and_register(store, rg.url)
        await store.approve("dc1", SN, approved_by="op")
        old_lease = rg.session.lease
        old_machines = rg.machines
        assert old_lease is not None and old_machines is not None
        await wait_for(
            lambda: (
                old_machines.revision >= 0
                and "approved" in old_machines.items[schema.task_key("dc1", SN)].value.decode()
            ),
            what="the approval in the view",
        )

        async with httpx.AsyncClient(base_url=rg.url, timeout=5, headers=auth) as http:
            await private_etcd.apause()
            try:
                # Keepalives go unanswered; past TTL - margin the role gives the lease up.
                with trio.fail_after(6):
                    while rg.session.running:  # noqa: ASYNC110 - watching in-process state
                        await trio.sleep(0.05)
                r = await http.get(f"/api/v1/agent/{SN}/task")
                assert r.status_code == 200, r.text
                assert r.json()["task"]["status"] == "approved"
                r = await http.post(
                    f"/api/v1/agent/{SN}/progress", json={"step": "partitioning", "percent": 1}
                )
                assert r.status_code == 202, r.text
                assert r.json() == {"status": "approved", "committed": False, "journaled": True}
                r = await http.post(f"/api/v1/agent/{SN}/heartbeat")
                assert r.status_code == 200, r.text
                assert r.json()["committed"] is False
                assert len(rg.journal) == 1
                assert (await http.get("/readyz")).status_code == 503
                assert (await http.get("/healthz")).status_code == 200
                await trio.sleep(1.5)  # well past the session TTL
            finally:
                await private_etcd.aresume()

            await wait_for(
                lambda: rg.session.running, timeout=15, what="session back after SIGCONT"
            )
            assert rg.session.restarts == 1
            new_lease = rg.session.lease
            assert new_lease is not None and new_lease.id != old_lease.id
            assert tasks_running_for(old_machines) == []
            # etcd expired the old lease; the session key rides on the new one.
            assert await client.lease_time_to_live(old_lease.id) is None
            kv = await client.get(session_key(new_lease.id))
            assert kv is not None and kv.lease == new_lease.id
            await wait_for(lambda: len(rg.journal) == 0, timeout=10, what="journal applied")
            task = (await store.get_task("dc1", SN)).task
            assert task.status.value == "installing"
            assert [(p.step, p.percent) for p in task.progress][-1] == ("partitioning", 1)
            r = await http.get(f"/api/v1/agent/{SN}/task")
            assert r.status_code == 200, r.text
            assert r.json()["task"]["status"] == "installing"
    assert "session lease lost" in caplog.text


async def test_restarted_regional_reattaches_to_live_agent_leases(
    etcd: EtcdProcess, store: Store, client: EtcdClient
) -> None:
    config = make_config(etcd.endpoints, roles=RG_ONLY)
    async with open_daemon(config) as daemon:
        auth = await create_and_register(store, regional(daemon).url)
    lease_id = await store.get_lease_id("dc1", SN)
    assert lease_id is not None
    before = await client.lease_time_to_live(lease_id)
    assert before is not None
    # The agent token is in etcd (hashed): the restarted regional still knows it.
    async with open_daemon(config) as daemon, httpx.AsyncClient(headers=auth) as http:
        url = regional(daemon).url
        r = await http.post(f"{url}/api/v1/agent/{SN}/heartbeat")
        assert r.status_code == 200, r.text
        assert r.json()["lease_ttl"] == config.regional.agent_lease_ttl  # type: ignore[union-attr]
    assert await store.get_lease_id("dc1", SN) == lease_id


async def test_new_servers_are_logged_like_the_guide(
    etcd: EtcdProcess, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lpmosd.regional")
    async with open_daemon(make_config(etcd.endpoints, roles=RG_ONLY)) as daemon:
        rg = regional(daemon)
        await store.create_task(CreateTaskRequest.from_obj(GUIDE_TASK), actor="test")
        other = CreateTaskRequest.from_obj({**GUIDE_TASK, "idc": "dc2", "sn": "sn-009"})
        await store.create_task(other, actor="test")
        await wait_for(lambda: "New server: sn-001" in caplog.text, what="log line")
        assert rg.servers is not None
        assert set(rg.servers.items) == {"/os/dc1/servers/sn-001"}, "only its own IDC"
        assert "sn-009" not in caplog.text
