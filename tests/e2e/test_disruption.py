"""Disruption-aware failure detection, with real processes (lpmosd.roles.disruption).

The control plane and the regional run as ``lpmosd run`` processes; the agents are the real
:func:`lpmosd.agent.main.run_agent`, many at once in the test process (one of them a real
``lpmosd agent`` process when it is to be killed).

- The regional is frozen (SIGSTOP) with every agent mid-install, until the control plane has
  seen every agent lease expire (longer than the lease TTL): the tasks show "agent
  unreachable" (API, metric) instead of failing; after SIGCONT every install completes.
- One agent killed (SIGKILL) among many: only its task fails, within TTL + 1 s of its last
  acknowledged heartbeat; the others are untouched.
"""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import GUIDE_TASK

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.facts import HardwareFacts
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import Disk, Nic, Task, TaskStatus
from lpmosd.etcd import open_client
from lpmosd.roles.reaper import HEARTBEAT_LOST
from lpmosd.store import Store

from .conftest import Cluster, Proc
from .test_processes import heartbeat_proxy, start_roles

# An agent cancelled mid-request leaves httpx's request-body iterator unfinished; Trio
# reports that at garbage collection, possibly during a later test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.*was garbage collected:ResourceWarning"
)

IDC = "dc1"
OS = GUIDE_TASK["os_type"]


def mac_of(i: int) -> str:
    return f"52:54:00:01:{i // 256:02x}:{i % 256:02x}"


def facts_of(i: int) -> HardwareFacts:
    return HardwareFacts(
        cpu_model="QEMU Virtual CPU",
        cpu_cores=4,
        memory_bytes=8 * 1024**3,
        disks=(Disk("vda", 100 * 10**9, "QEMU HARDDISK", False),),
        nics=(Nic("eth0", mac_of(i), 1000),),
        default_mac=mac_of(i),
    )


async def tasks_of(store: Store) -> dict[str, Task]:
    return {t.sn: t for t in await store.list_tasks(idc=IDC)}


async def approve_when_reported(store: Store, sns: list[str]) -> None:
    """The operator: approve each machine once its agent has reported its hardware."""
    waiting = set(sns)
    while waiting:
        for task in await store.list_tasks(idc=IDC, status=TaskStatus.PENDING):
            if task.sn in waiting and task.progress:
                await store.approve(IDC, task.sn, approved_by="op")
                waiting.discard(task.sn)
        await trio.sleep(0.2)


async def wait_until(predicate: Any, *, timeout: float, what: str, cluster: Cluster) -> Any:
    """Poll the async ``predicate`` until it returns something true."""
    with trio.move_on_after(timeout):
        while True:
            result = await predicate()
            if result:
                return result
            await trio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.tails()}")


async def api_tasks(cp: Proc) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
        r = await http.get("/api/v1/tasks", params={"idc": IDC})
        assert r.status_code == 200, r.text
        return {t["sn"]: t for t in r.json()["tasks"]}


async def unreachable_metric(cp: Proc) -> float:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'lpmosd_agents_unreachable{{idc="{IDC}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def regional_metric(rg: Proc, name: str) -> float:
    """A value of the regional's /metrics (the first sample of ``name``)."""
    async with httpx.AsyncClient(base_url=rg.url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_journal_applied(rg: Proc, cluster: Cluster) -> None:
    """The agents may be done before etcd has all of their reports: reports the regional
    journaled while it had no session are applied once it has one again."""

    async def applied() -> bool:
        return await regional_metric(rg, "lpmosd_regional_journal_entries") == 0

    await wait_until(applied, timeout=60, what="the journal applied", cluster=cluster)


async def regional_frozen_past_lease(cluster: Cluster, *, agents: int, ttl: int, hb: int) -> None:
    plan = [("partitioning", 0.2), ("packages", 3.0), ("bootloader", 0.2)]
    cp, rg = await start_roles(
        cluster, agent_lease_ttl=ttl, heartbeat_interval=hb, session_ttl=3, plan=plan
    )
    sns = [f"node-{i:03d}" for i in range(agents)]
    codes: dict[str, int] = {}
    async with open_client(cluster.endpoints) as client:
        store = Store(client)
        secrets: dict[str, str] = {}
        for i, sn in enumerate(sns):
            req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn, "mac": mac_of(i)})
            _, secrets[sn] = await store.create_enrolled_task(req, actor="test")

        async def agent(i: int, sn: str) -> None:
            opts = AgentOptions(
                regional_url=rg.url,
                sn=sn,
                mac=mac_of(i),
                enrollment_secret=secrets[sn],
                facts=facts_of(i),
                poll_interval=0.3,
                register_retry_interval=0.5,
                request_timeout=3.0,
                retry=RetryPolicy(initial=0.2, maximum=2.0, total=300),
            )
            codes[sn] = await run_agent(opts)

        async def all_in_long_step() -> bool:
            tasks = await tasks_of(store)
            return all(any(p.step == "packages" for p in t.progress) for t in tasks.values())

        async def all_unreachable() -> bool:
            listed = await api_tasks(cp)
            return all(t["agent_state"] == "unreachable" for t in listed.values())

        with trio.fail_after(ttl * 4 + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(approve_when_reported, store, sns)
                for i, sn in enumerate(sns):
                    nursery.start_soon(agent, i, sn)
                await wait_until(
                    all_in_long_step, timeout=60, what="every agent installing", cluster=cluster
                )
                rg.send_signal(signal.SIGSTOP)
                try:
                    # Frozen until every agent lease has expired (more than a lease TTL).
                    await wait_until(
                        all_unreachable,
                        timeout=ttl + 30,
                        what="every agent unreachable",
                        cluster=cluster,
                    )
                    assert await unreachable_metric(cp) == agents
                    listed = await api_tasks(cp)
                    assert {t["status"] for t in listed.values()} == {"installing"}
                    assert all(t["agent_unreachable_since"] for t in listed.values())
                finally:
                    rg.send_signal(signal.SIGCONT)
        assert codes == dict.fromkeys(sns, EXIT_OK), cluster.tails()
        await wait_journal_applied(rg, cluster)
        problems = []
        for sn, task in (await tasks_of(store)).items():
            history = [h.status.value for h in task.status_history]
            if task.status is not TaskStatus.COMPLETED or "failed" in history:
                problems.append(f"{sn}: {task.status} {history} {task.error}")
            done = {p.step for p in task.progress if p.percent == 100}
            if not {"partitioning", "packages", "bootloader"} <= done:
                problems.append(f"{sn}: progress {[(p.step, p.percent) for p in task.progress]}")
        assert not problems, "\n".join(problems)
        listed = await api_tasks(cp)
        assert {t["agent_state"] for t in listed.values()} == {"offline"}
        assert await unreachable_metric(cp) == 0


async def test_regional_frozen_past_the_lease_fails_nothing(cluster: Cluster) -> None:
    await regional_frozen_past_lease(cluster, agents=12, ttl=6, hb=2)


@pytest.mark.slow
async def test_regional_frozen_past_the_lease_fails_nothing_50_agents(cluster: Cluster) -> None:
    await regional_frozen_past_lease(cluster, agents=50, ttl=30, hb=10)


async def one_agent_killed_among_many(cluster: Cluster, *, agents: int, ttl: int, hb: int) -> None:
    plan = [("partitioning", 0.2), ("packages", 600.0)]
    cp, rg = await start_roles(cluster, agent_lease_ttl=ttl, heartbeat_interval=hb, plan=plan)
    sns = [f"node-{i:03d}" for i in range(agents)]
    victim = sns[0]
    async with open_client(cluster.endpoints) as client, heartbeat_proxy(rg.url, victim) as proxy:
        store = Store(client)
        secrets: dict[str, str] = {}
        for i, sn in enumerate(sns):
            req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn, "mac": mac_of(i)})
            _, secrets[sn] = await store.create_enrolled_task(req, actor="test")
        cluster.secret_file(victim).write_text(secrets[victim])
        process = cluster.agent(f"http://127.0.0.1:{proxy.port}", victim, mac_of(0))

        async def agent(i: int, sn: str) -> None:
            opts = AgentOptions(
                regional_url=rg.url,
                sn=sn,
                mac=mac_of(i),
                enrollment_secret=secrets[sn],
                facts=facts_of(i),
                poll_interval=0.3,
                register_retry_interval=0.5,
            )
            await run_agent(opts)

        async def all_in_long_step() -> bool:
            tasks = await tasks_of(store)
            return all(any(p.step == "packages" for p in t.progress) for t in tasks.values())

        async with trio.open_nursery() as nursery:
            process.start()
            nursery.start_soon(approve_when_reported, store, sns)
            for i, sn in enumerate(sns[1:], start=1):
                nursery.start_soon(agent, i, sn)
            await wait_until(
                all_in_long_step, timeout=60, what="every agent installing", cluster=cluster
            )

            # The kill lands between two heartbeats, after at least one was answered.
            async def acked() -> bool:
                return bool(proxy.acks)

            await wait_until(
                acked,
                timeout=hb * 3,
                what="a heartbeat of the victim",
                cluster=cluster,
            )
            process.send_signal(signal.SIGKILL)
            assert await process.wait(5) == -signal.SIGKILL
            last_ack = proxy.acks[-1]

            async def victim_failed() -> bool:
                task = (await store.get_task(IDC, victim)).task
                return task.status is not TaskStatus.INSTALLING

            await wait_until(victim_failed, timeout=ttl + 5, what="the reaper", cluster=cluster)
            took = trio.current_time() - last_ack
            tasks = await tasks_of(store)
            assert tasks[victim].status is TaskStatus.FAILED
            assert tasks[victim].error == HEARTBEAT_LOST
            assert ttl - 0.05 <= took <= ttl + 1.0, f"failed {took:.2f}s after the last heartbeat"
            # Another lease TTL later, nobody else has been failed or marked.
            await trio.sleep(ttl)
            listed = await api_tasks(cp)
            others = {sn: t for sn, t in listed.items() if sn != victim}
            assert {t["status"] for t in others.values()} == {"installing"}
            assert {t["agent_state"] for t in others.values()} == {"online"}
            assert listed[victim]["agent_state"] == "offline"
            nursery.cancel_scope.cancel()


async def test_one_agent_killed_among_many_only_it_fails(cluster: Cluster) -> None:
    await one_agent_killed_among_many(cluster, agents=12, ttl=6, hb=2)


@pytest.mark.slow
async def test_one_agent_killed_among_fifty_only_it_fails(cluster: Cluster) -> None:
    await one_agent_killed_among_many(cluster, agents=50, ttl=30, hb=10)
