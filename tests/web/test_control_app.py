"""The control-plane REST API over a real etcd: the guide's curl, every transition, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from provisioning_kit import (
    GUIDE_TASK,
    HARDWARE,
    TEST_PLANS,
    keyspace,
    make_config,
    open_control_api,
    open_daemon,
    publish_os_types,
)

from lpmosd.config import ROLE_CONTROL_PLANE
from lpmosd.documents import MachineMeta, TaskStatus
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store
from lpmosd.timestamps import utcnow

MAC = GUIDE_TASK["mac"]


@pytest.fixture
async def api(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a control-plane-only daemon, with an admin token (``test-admin``)."""
    config = make_config(etcd.endpoints, roles=frozenset({ROLE_CONTROL_PLANE}))
    async with open_daemon(config) as daemon, open_control_api(daemon) as http:
        for idc in ("dc1", "dc2"):
            await publish_os_types(daemon, idc, tuple(TEST_PLANS))
        yield http


async def register(store: Store, client: EtcdClient, sn: str = "sn-001") -> None:
    lease = await client.lease_grant(60)
    meta = MachineMeta.from_report(HARDWARE, now=utcnow())
    await store.register_agent("dc1", sn, mac=MAC, meta=meta, lease_id=lease.id)


async def test_guide_curl_creates_a_pending_task(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/tasks", json=GUIDE_TASK)
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["status"] == "pending"
    assert (task["disk_layout"], task["network_config"]) == ("auto", "dhcp")
    for key, value in GUIDE_TASK.items():
        assert task[key] == value
    r = await api.get("/api/v1/tasks/dc1/sn-001")
    assert r.status_code == 200 and r.json()["task_id"] == task["task_id"]
    r = await api.post("/api/v1/tasks", json=GUIDE_TASK)
    assert r.status_code == 409
    assert r.json()["field"] == "sn"


async def test_mac_is_normalised(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/tasks", json={**GUIDE_TASK, "mac": "00-1A-2B-3C-4D-5E"})
    assert r.status_code == 201, r.text
    assert r.json()["mac"] == MAC


async def test_every_transition_through_the_api(
    api: httpx.AsyncClient, store: Store, client: EtcdClient
) -> None:
    assert (await api.post("/api/v1/tasks", json=GUIDE_TASK)).status_code == 201
    await register(store, client)
    r = await api.post(
        "/api/v1/tasks/dc1/sn-001/approve",
        json={"approved_by": "admin@example.com", "notes": "Hardware verified"},
    )
    assert r.status_code == 200, r.text
    approval = r.json()["approval"]
    # The approver is the authenticated principal; a body's approved_by is ignored.
    assert approval["approved"] is True and approval["approved_by"] == "test-admin"
    assert approval["notes"] == "Hardware verified"
    # approve again, retry while approved: illegal, nothing changes
    before = await keyspace(client)
    for action in ("approve", "retry"):
        r = await api.post(f"/api/v1/tasks/dc1/sn-001/{action}")
        assert r.status_code == 409, (action, r.text)
        assert r.json()["field"] == "status"
    assert (await api.delete("/api/v1/tasks/dc1/sn-001")).status_code == 409
    assert await keyspace(client) == before

    await store.record_progress("dc1", "sn-001", step="partitioning", percent=20, message="")
    await store.finish("dc1", "sn-001", outcome=TaskStatus.FAILED, reason="disk error")
    r = await api.post("/api/v1/tasks/dc1/sn-001/retry", json={})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved" and r.json()["resume_from"] == "partitioning"
    r = await api.post("/api/v1/tasks/dc1/sn-001/cancel", json={"reason": "rack moved"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert [h["status"] for h in r.json()["status_history"]] == [
        "pending",
        "approved",
        "installing",
        "failed",
        "approved",
        "cancelled",
    ]
    r = await api.get("/api/v1/servers", params={"idc": "dc1"})
    assert r.status_code == 200
    assert [(s["sn"], s["status"]) for s in r.json()["servers"]] == [("sn-001", "cancelled")]
    before = await keyspace(client)
    r = await api.post("/api/v1/tasks/dc1/sn-001/cancel")
    assert r.status_code == 409
    assert await keyspace(client) == before

    r = await api.delete("/api/v1/tasks/dc1/sn-001")
    assert r.status_code == 200, r.text
    assert [k for k in await keyspace(client) if b"sn-001" in k] == []
    assert (await api.get("/api/v1/tasks/dc1/sn-001")).status_code == 404


async def test_recreate_after_completion(api: httpx.AsyncClient, store: Store) -> None:
    first = (await api.post("/api/v1/tasks", json=GUIDE_TASK)).json()
    await api.post("/api/v1/tasks/dc1/sn-001/cancel")
    r = await api.post("/api/v1/tasks", json={**GUIDE_TASK, "os_type": "Debian 12"})
    assert r.status_code == 201, r.text
    assert r.json()["task_id"] != first["task_id"]
    assert (await store.get_task("dc1", "sn-001")).task.os_type == "Debian 12"


async def test_list_filters(api: httpx.AsyncClient) -> None:
    for idc, sn in (("dc1", "a1"), ("dc1", "a2"), ("dc2", "b1")):
        r = await api.post("/api/v1/tasks", json={**GUIDE_TASK, "idc": idc, "sn": sn})
        assert r.status_code == 201
    await api.post("/api/v1/tasks/dc1/a2/cancel")
    r = await api.get("/api/v1/tasks")
    assert r.json()["count"] == 3
    r = await api.get("/api/v1/tasks", params={"idc": "dc1"})
    assert sorted(t["sn"] for t in r.json()["tasks"]) == ["a1", "a2"]
    r = await api.get("/api/v1/tasks", params={"idc": "dc1", "status": "cancelled"})
    assert [t["sn"] for t in r.json()["tasks"]] == ["a2"]
    r = await api.get("/api/v1/tasks", params={"status": "pending"})
    assert sorted(t["sn"] for t in r.json()["tasks"]) == ["a1", "b1"]


async def test_ops_endpoints(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    r = await api.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    await api.get("/api/v1/tasks")
    r = await api.get("/metrics")
    assert r.status_code == 200
    assert "lpmosd_http_requests_total" in r.text
