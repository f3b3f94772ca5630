"""Regional autonomy, with real processes: installs survive the regional losing etcd.

The control plane and the regional are ``lpmosd run`` processes; the agents are the real
:func:`lpmosd.agent.main.run_agent`, many at once in the test process. Each test starts an
outage with every agent mid-install, keeps it longer than the agent lease TTL (steps finish
meanwhile, so reports are made during it), ends it, and checks: every install completed,
none ever failed, and no report was lost (every step at 100 % with its "done" log line).

- the regional cut off from etcd by a proxy that blackholes (the control plane still sees
  etcd: the tasks show "agent unreachable" until the agents are heard again);
- etcd stopped, then started again (everyone loses it);
- the regional killed (SIGKILL) and started again.

While etcd is away the regional serves its agents from its last view and journals their
reports (202), applying them in order when etcd is back; agent leases are re-established
by the agents registering again. The long variants (60 s outages, 50 agents, 30 s leases)
are marked slow.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from provisioning_kit import GUIDE_TASK, open_proxy

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import TaskStatus
from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store

from .conftest import Cluster, Proc
from .test_disruption import (
    api_tasks,
    approve_when_reported,
    facts_of,
    mac_of,
    regional_metric,
    tasks_of,
    wait_journal_applied,
    wait_until,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.*was garbage collected:ResourceWarning"
)

STEPS = ("partitioning", "packages", "bootloader", "post_install")
PLAN = [("partitioning", 0.2), ("packages", 2.0), ("bootloader", 0.5), ("post_install", 0.5)]

#: Starts the outage; returns what ends it.
Outage = Callable[[Proc, Proc], Awaitable[Callable[[], Awaitable[None]]]]


async def installs_survive(
    cluster: Cluster,
    outage: Outage,
    *,
    agents: int,
    ttl: int,
    hb: int,
    down_for: float,
    rg_endpoints: list[str] | None = None,
    expect_journal: bool = True,
) -> None:
    cp = await cluster.start_control_plane()
    rg = await cluster.start_regional(
        etcd_endpoints=rg_endpoints or (),
        agent_lease_ttl=ttl,
        heartbeat_interval=hb,
        session_ttl=3,
        plan=PLAN,
        journal_after=1.0,
    )
    await cp.wait_ready()
    await rg.wait_ready()
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
                request_timeout=5.0,
                retry=RetryPolicy(initial=0.2, maximum=2.0, total=down_for * 3 + 60),
            )
            codes[sn] = await run_agent(opts)

        async def all_in_long_step() -> bool:
            tasks = await tasks_of(store)
            return all(any(p.step == "packages" for p in t.progress) for t in tasks.values())

        with trio.fail_after(down_for * 3 + 180):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(approve_when_reported, store, sns)
                for i, sn in enumerate(sns):
                    nursery.start_soon(agent, i, sn)
                await wait_until(
                    all_in_long_step, timeout=90, what="every agent installing", cluster=cluster
                )
                end = await outage(cp, rg)
                try:
                    await trio.sleep(down_for)  # the outage: longer than the lease TTL
                finally:
                    await end()
        assert codes == dict.fromkeys(sns, EXIT_OK), cluster.tails()
        await wait_journal_applied(rg, cluster)
        problems = []
        for sn, task in (await tasks_of(store)).items():
            history = [h.status.value for h in task.status_history]
            if task.status is not TaskStatus.COMPLETED or "failed" in history:
                problems.append(f"{sn}: {task.status} {history} {task.error}")
            done = {p.step for p in task.progress if p.percent == 100}
            if not set(STEPS) <= done:
                problems.append(f"{sn}: progress {[(p.step, p.percent) for p in task.progress]}")
            logged = [s for s in STEPS if any(f"{s} done" in line for line in task.logs)]
            if logged != list(STEPS):
                problems.append(f"{sn}: step logs {logged}")
        assert not problems, "\n".join(problems) + "\n" + cluster.tails()
        if expect_journal:
            journaled = await regional_metric(rg, "lpmosd_reports_journaled_total")
            assert journaled > 0, "no report was journaled during the outage"
        listed = await api_tasks(cp)
        assert {t["agent_state"] for t in listed.values()} == {"offline"}


# ------------------------------------------------------- the regional cut off from etcd


async def regional_cut_off(cluster: Cluster, *, agents: int, ttl: int, down_for: float) -> None:
    async with open_proxy(int(cluster.endpoints[0].rsplit(":", 1)[1])) as proxy:

        async def outage(cp: Proc, rg: Proc) -> Callable[[], Awaitable[None]]:
            proxy.freeze()  # a blackhole: connections stay, nothing gets through

            async def end() -> None:
                proxy.heal()

            return end

        await installs_survive(
            cluster,
            outage,
            agents=agents,
            ttl=ttl,
            hb=2 if ttl < 30 else 10,
            down_for=down_for,
            rg_endpoints=[proxy.endpoint],
        )


async def test_regional_cut_off_from_etcd_fails_nothing(cluster: Cluster) -> None:
    await regional_cut_off(cluster, agents=8, ttl=6, down_for=9)


@pytest.mark.slow
async def test_regional_cut_off_from_etcd_60s_fails_nothing(cluster: Cluster) -> None:
    await regional_cut_off(cluster, agents=50, ttl=30, down_for=60)


# ------------------------------------------------------------------- etcd stopped


async def etcd_stopped(
    private_etcd: EtcdProcess, tmp_path: Path, *, agents: int, ttl: int, down_for: float
) -> None:
    cluster = Cluster(tmp_path, list(private_etcd.endpoints))

    async def outage(cp: Proc, rg: Proc) -> Callable[[], Awaitable[None]]:
        await private_etcd.astop()

        async def end() -> None:
            await private_etcd.astart()

        return end

    try:
        await installs_survive(
            cluster, outage, agents=agents, ttl=ttl, hb=2 if ttl < 30 else 10, down_for=down_for
        )
    finally:
        for proc in cluster.procs:
            proc.kill()


async def test_etcd_stopped_fails_nothing(private_etcd: EtcdProcess, tmp_path: Path) -> None:
    await etcd_stopped(private_etcd, tmp_path, agents=8, ttl=6, down_for=9)


@pytest.mark.slow
async def test_etcd_stopped_60s_fails_nothing(private_etcd: EtcdProcess, tmp_path: Path) -> None:
    await etcd_stopped(private_etcd, tmp_path, agents=50, ttl=30, down_for=60)


# ------------------------------------------------------ the regional killed, restarted


async def regional_killed(cluster: Cluster, *, agents: int, ttl: int, down_for: float) -> None:
    async def outage(cp: Proc, rg: Proc) -> Callable[[], Awaitable[None]]:
        rg.send_signal(signal.SIGKILL)
        assert await rg.wait(5) == -signal.SIGKILL

        async def end() -> None:
            rg.start()  # same config, port and state directory

        return end

    await installs_survive(
        cluster,
        outage,
        agents=agents,
        ttl=ttl,
        hb=2 if ttl < 30 else 10,
        down_for=down_for,
        expect_journal=False,  # nothing to journal: the agents wait for the regional
    )


async def test_regional_killed_and_restarted_fails_nothing(cluster: Cluster) -> None:
    await regional_killed(cluster, agents=8, ttl=6, down_for=9)


@pytest.mark.slow
async def test_regional_killed_and_restarted_after_60s_fails_nothing(cluster: Cluster) -> None:
    await regional_killed(cluster, agents=50, ttl=30, down_for=60)
