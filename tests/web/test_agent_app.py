"""The regional's agent API over a real etcd: what an agent does, and what goes wrong.

The control plane runs in the same daemon, so approvals come through its API while the
regional's watch cache may still lag: the agent API must decide on fresh data then, never
answer a false 404/409.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    HARDWARE,
    bearer,
    make_config,
    open_control_api,
    open_daemon,
    wait_for,
)

from lpmosd import schema
from lpmosd.daemon import Daemon
from lpmosd.documents import MachineMeta
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store

SN, MAC = "sn-001", GUIDE_TASK["mac"]


@dataclass
class Apis:
    daemon: Daemon
    cp: httpx.AsyncClient
    agent: httpx.AsyncClient
    #: sn -> the enrolment secret its task was created with.
    secrets: dict[str, str] = field(default_factory=dict)


@pytest.fixture
async def apis(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[Apis]:
    config = make_config(etcd.endpoints, agent_lease_ttl=10, heartbeat_interval=3)
    async with (
        open_daemon(config) as daemon,
        open_control_api(daemon) as cp,
        httpx.AsyncClient(base_url=daemon.urls["regional"]) as agent,
    ):
        yield Apis(daemon, cp, agent)


async def create(apis: Apis, **changes: str) -> dict[str, object]:
    r = await apis.cp.post("/api/v1/tasks", json={**GUIDE_TASK, **changes})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    secret = body["enrollment_secret"]
    assert isinstance(secret, str)
    apis.secrets[str(body["sn"])] = secret
    return body


async def register(
    apis: Apis, sn: str = SN, mac: str = MAC, *, token: str | None = None
) -> dict[str, object]:
    """Register ``sn`` with its task's secret (and ``token``, as the agent's re-registration
    does); later agent calls carry the new agent token."""
    r = await apis.agent.post(
        "/api/v1/agent/register",
        json={"sn": sn, "mac": mac, "hardware": HARDWARE, "enrollment_secret": apis.secrets[sn]},
        headers=bearer(token) if token else None,
    )
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    apis.agent.headers.update(bearer(str(body["agent_token"])))
    return body


async def test_agent_happy_path(apis: Apis, store: Store, client: EtcdClient) -> None:
    await create(apis, os_type="demo")
    reg = await register(apis)
    assert reg["lease_ttl"] == 10 and reg["heartbeat_interval"] == 3
    task = reg["task"]
    assert isinstance(task, dict) and task["status"] == "pending"
    plan = reg["plan"]
    assert isinstance(plan, dict) and plan["name"] == "demo" and plan["steps"]
    meta = await store.get_meta("dc1", SN)
    assert meta is not None and meta.cpu_cores == 28
    assert meta == MachineMeta.from_dict(meta.to_dict())
    lease_id = await store.get_lease_id("dc1", SN)
    assert lease_id is not None

    r = await apis.agent.get(f"/api/v1/agent/{SN}/task")
    assert r.status_code == 200 and r.json()["task"]["status"] == "pending"
    r = await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/approve", json={"approved_by": "op"})
    assert r.status_code == 200
    # Right after the approval: no waiting for the regional's watch to catch up.
    r = await apis.agent.post(
        f"/api/v1/agent/{SN}/progress",
        json={"step": "partitioning", "percent": 0, "message": "Creating partitions..."},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "installing"
    for pct in (50, 100):
        r = await apis.agent.post(
            f"/api/v1/agent/{SN}/progress", json={"step": "partitioning", "percent": pct}
        )
        assert r.status_code == 200, r.text
    r = await apis.agent.post(
        f"/api/v1/agent/{SN}/logs", json={"lines": ["Slow disk I/O"], "level": "WARN"}
    )
    assert r.status_code == 200, r.text
    r = await apis.agent.post(f"/api/v1/agent/{SN}/heartbeat")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "installing", "lease_ttl": 10}
    r = await apis.agent.post(f"/api/v1/agent/{SN}/complete")
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert await client.get(schema.lease_key("dc1", SN)) is None
    assert await client.lease_time_to_live(lease_id) is None, "lease revoked on completion"
    task_doc = (await store.get_task("dc1", SN)).task
    assert task_doc.status.value == "completed"
    assert any("[WARN] Slow disk I/O" in line for line in task_doc.logs)


async def test_a_repeated_request_is_applied_once(apis: Apis, store: Store) -> None:
    """An agent repeats a log batch (or a progress report) whose answer it lost, with the same
    Idempotency-Key: the regional recognises it and stores nothing twice (review finding,
    issue 15); a new key is a new batch; a malformed key is refused, naming the header."""
    await create(apis, os_type="demo")
    await register(apis)
    r = await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/approve", json={"approved_by": "op"})
    assert r.status_code == 200
    for key in ("batch-1", "batch-1", "batch-2"):
        r = await apis.agent.post(
            f"/api/v1/agent/{SN}/logs",
            json={"lines": ["same words"]},
            headers={"Idempotency-Key": key},
        )
        assert r.status_code == 200, r.text
    task = (await store.get_task("dc1", SN)).task
    assert sum(line.endswith("same words") for line in task.logs) == 2
    r = await apis.agent.post(
        f"/api/v1/agent/{SN}/logs", json={"lines": ["x"]}, headers={"Idempotency-Key": "a b"}
    )
    assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key", r.text
    for _ in range(2):
        r = await apis.agent.post(
            f"/api/v1/agent/{SN}/progress",
            json={"step": "s", "percent": 10},
            headers={"Idempotency-Key": "p-1"},
        )
        assert r.status_code == 200, r.text
    task = (await store.get_task("dc1", SN)).task
    assert [c.status.value for c in task.status_history].count("installing") == 1
    r = await apis.cp.get(f"/api/v1/tasks/dc1/{SN}")
    assert r.status_code == 200 and "ops" not in r.json()  # the API's JSON is unchanged


async def test_heartbeat_right_after_register(apis: Apis) -> None:
    """The lease key was written a moment ago; the watch cache may not have it yet."""
    for sn in ("hb-1", "hb-2", "hb-3"):
        await create(apis, sn=sn)
        await register(apis, sn=sn)
        r = await apis.agent.post(f"/api/v1/agent/{sn}/heartbeat")
        assert r.status_code == 200, r.text
        assert r.json()["lease_ttl"] == 10


async def test_reregister_replaces_the_lease(apis: Apis, store: Store, client: EtcdClient) -> None:
    await create(apis)
    token = (await register(apis))["agent_token"]
    assert isinstance(token, str)
    first = await store.get_lease_id("dc1", SN)
    await trio.sleep(0.2)  # the regional's cache knows the first lease
    await register(apis, token=token)  # the live agent itself, with its token
    second = await store.get_lease_id("dc1", SN)
    assert first is not None and second is not None and first != second
    assert await client.lease_time_to_live(first) is None, "old lease revoked"
    r = await apis.agent.post(f"/api/v1/agent/{SN}/heartbeat")
    assert r.status_code == 200, r.text
    # Still one hardware_collect entry.
    steps = [p.step for p in (await store.get_task("dc1", SN)).task.progress]
    assert steps == ["hardware_collect"]


async def test_agent_fail_report(apis: Apis, store: Store, client: EtcdClient) -> None:
    await create(apis)
    await register(apis)
    await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/approve")
    r = await apis.agent.post(
        f"/api/v1/agent/{SN}/progress", json={"step": "packages", "percent": 10}
    )
    assert r.status_code == 200, r.text
    r = await apis.agent.post(f"/api/v1/agent/{SN}/fail", json={"reason": "mirror down"})
    assert r.status_code == 200 and r.json()["status"] == "failed"
    task = (await store.get_task("dc1", SN)).task
    assert task.error == "mirror down" and "at step packages" in task.logs[-1]
    assert await client.get(schema.lease_key("dc1", SN)) is None
    # The task ended: the agent token is revoked; the agent learns how its task ended.
    r = await apis.agent.post(f"/api/v1/agent/{SN}/logs", json={"line": "dmesg tail"})
    assert r.status_code == 401, r.text
    assert r.json()["task_status"] == "failed"


async def test_cancelled_task_is_visible_to_the_agent(apis: Apis) -> None:
    await create(apis)
    await register(apis)
    await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/cancel")
    # Cancelling revoked the agent's token; each refusal tells the agent why. (The regional
    # learns of the cancel from its watch, a moment later: until then a write would be
    # refused by the state machine, 409, and a heartbeat would still say "pending".)
    rg = apis.daemon.regional
    assert rg is not None

    def seen() -> bool:
        cached = rg.task_kv_and_task(SN)
        return cached is not None and cached[0].status.value == "cancelled"

    await wait_for(seen, what="the regional's view of the cancel")
    for call in (
        apis.agent.post(f"/api/v1/agent/{SN}/heartbeat"),
        apis.agent.get(f"/api/v1/agent/{SN}/task"),
        apis.agent.post(f"/api/v1/agent/{SN}/progress", json={"step": "a", "percent": 1}),
    ):
        r = await call
        assert r.status_code == 401, r.text
        assert r.json()["task_status"] == "cancelled"


async def test_agent_reads_its_task_right_after_creation(apis: Apis) -> None:
    await create(apis)
    await register(apis)
    r = await apis.agent.get(f"/api/v1/agent/{SN}/task")
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    assert {"task_id", "status", "os_type", "mac", "approval"} <= set(task)
