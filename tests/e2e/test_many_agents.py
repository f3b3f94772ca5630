"""50 agents installing at once through one regional.

The daemon runs in this process (both roles, ephemeral ports); the agents are the real
:func:`lpmosd.agent.main.run_agent`, 50 of them concurrently, each with its own HTTP
client. An operator task approves each machine once its hardware is reported. At the end
every task is completed and every progress step of every agent is in its document.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import trio
from provisioning_kit import GUIDE_TASK, make_config, open_daemon

from lpmosd import schema
from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.facts import HardwareFacts
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import Disk, Nic, TaskStatus
from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.plan import Plan, PlanStep
from lpmosd.store import HARDWARE_STEP, Store

# An agent cancelled mid-request leaves httpx's request-body iterator unfinished; Trio
# reports that at garbage collection, possibly during a later test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.*was garbage collected:ResourceWarning"
)

AGENTS = 50
STEPS = ("partitioning", "base_system", "packages", "bootloader")
OS = GUIDE_TASK["os_type"]


def mac_of(i: int) -> str:
    return f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"


def facts_of(i: int) -> HardwareFacts:
    return HardwareFacts(
        cpu_model="QEMU Virtual CPU",
        cpu_cores=4,
        memory_bytes=8 * 1024**3,
        disks=(Disk("vda", 100 * 10**9, "QEMU HARDDISK", False),),
        nics=(Nic("eth0", mac_of(i), 1000),),
        default_mac=mac_of(i),
    )


async def test_fifty_agents_install_concurrently(etcd: EtcdProcess) -> None:
    config = make_config(etcd.endpoints, agent_lease_ttl=15, heartbeat_interval=5)
    rg = config.regional
    assert rg is not None
    plan = Plan(os_type=OS, steps=tuple(PlanStep(name=s, timeout=60, simulate=0.2) for s in STEPS))
    config = dataclasses.replace(
        config,
        regional=dataclasses.replace(rg, plans=types.MappingProxyType({**rg.plans, OS: plan})),
    )
    sns = [f"node-{i:03d}" for i in range(AGENTS)]
    codes: dict[str, int] = {}

    async with open_client(etcd.endpoints) as client, open_daemon(config) as daemon:
        store = Store(client)
        url = daemon.urls["regional"]
        secrets: dict[str, str] = {}
        for i, sn in enumerate(sns):
            req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn, "mac": mac_of(i)})
            _, secrets[sn] = await store.create_enrolled_task(req, actor="test")

        async def agent(i: int, sn: str) -> None:
            opts = AgentOptions(
                regional_url=url,
                sn=sn,
                mac=mac_of(i),
                enrollment_secret=secrets[sn],
                facts=facts_of(i),
                poll_interval=0.3,
                register_retry_interval=0.5,
                retry=RetryPolicy(initial=0.1, maximum=1.0, total=60),
            )
            codes[sn] = await run_agent(opts)

        async def operator() -> None:
            """Approve each machine once its agent has reported its hardware."""
            waiting = set(sns)
            while waiting:
                for task in await store.list_tasks(idc="dc1", status=TaskStatus.PENDING):
                    if task.sn in waiting and task.progress:
                        await store.approve("dc1", task.sn, approved_by="op")
                        waiting.discard(task.sn)
                await trio.sleep(0.2)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(operator)
                for i, sn in enumerate(sns):
                    nursery.start_soon(agent, i, sn)

        assert codes == dict.fromkeys(sns, EXIT_OK)
        result = await client.get_prefix("/os/dc1/machines/")
        # As the API shows them: the log lines are in chunk keys.
        tasks = {task.sn: task for task in await Store(client).list_tasks(idc="dc1")}
        assert sorted(tasks) == sns
        problems = []
        for sn, task in tasks.items():
            steps = [(p.step, p.percent) for p in task.progress]
            if task.status is not TaskStatus.COMPLETED:
                problems.append(f"{sn}: {task.status} {task.error}")
            if steps != [(HARDWARE_STEP, 100)] + [(s, 100) for s in STEPS]:
                problems.append(f"{sn}: progress {steps}")
            done = [s for s in STEPS if any(f"{s} done" in line for line in task.logs)]
            if done != list(STEPS):
                problems.append(f"{sn}: step logs {done}")
            if [h.status.value for h in task.status_history] != [
                "pending",
                "approved",
                "installing",
                "completed",
            ]:
                problems.append(f"{sn}: history {task.status_history}")
        assert not problems, "\n".join(problems)
        # Every agent's lease key went with its completion; server entries agree.
        assert not [kv.key for kv in result.kvs if kv.key.endswith(b"/lease")]
        servers = await store.list_servers("dc1")
        assert {s.sn: s.status for s in servers} == dict.fromkeys(sns, TaskStatus.COMPLETED)
        # ...and were written by the Txn that completed their task (batched or not).
        server_revs = {
            kv.key.decode().rsplit("/", 1)[1]: kv.mod_revision
            for kv in (await client.get_prefix(schema.servers_prefix("dc1"))).kvs
        }
        task_revs = {
            kv.key.decode().split("/")[4]: kv.mod_revision
            for kv in result.kvs
            if kv.key.endswith(b"/task")
        }
        assert server_revs == task_revs
