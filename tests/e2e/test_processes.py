"""The whole system as production runs it: etcd, ``lpmosd run`` for the control plane and
for the regional, and ``lpmosd agent``, each its own process.

- The guide's flow end to end, then the raw etcd keys checked against the guide's layout
  and "Task JSON Structure".
- kill -9 of the agent mid-install: the task fails between TTL and TTL + 2 s after the
  last heartbeat the agent got an answer to (timed on the wire by a proxy).
- kill -9 of the regional mid-install, down for 5 s: no task fails, the install completes.
- ``lpmosd run`` stops cleanly on SIGTERM, releasing its session.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import GUIDE_TASK

from lpmosd import schema
from lpmosd.documents import Task
from lpmosd.errors import NotFoundError
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.roles.reaper import HEARTBEAT_LOST
from lpmosd.store import Store

from .conftest import Cluster, Proc

IDC, SN, MAC = "dc1", "sn-001", "00:1a:2b:3c:4d:5e"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
TASK_KEY = schema.task_key(IDC, SN)


async def task_doc(client: EtcdClient, sn: str = SN) -> dict[str, Any]:
    """The task as the API shows it: the document with its log chunks' lines."""
    return (await Store(client).get_task(IDC, sn)).task.to_dict()


async def wait_task(
    client: EtcdClient, predicate: Any, *, timeout: float, what: str, cluster: Cluster
) -> dict[str, Any]:
    """Poll the task (as the API shows it, log lines included) until ``predicate(doc)``."""
    with trio.move_on_after(timeout):
        while True:
            with contextlib.suppress(NotFoundError):
                doc = await task_doc(client)
                if predicate(doc):
                    return doc
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.tails()}")


async def create_task(cp: Proc, body: dict[str, Any] = GUIDE_TASK) -> dict[str, Any]:
    """Create through the API; the enrolment secret goes where ``Cluster.agent`` finds it."""
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
        r = await http.post("/api/v1/tasks", json=body)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        (cp.log.parent / f"{out['sn']}.enrollment-secret").write_text(out["enrollment_secret"])
        return out


async def approve(cp: Proc, sn: str = SN) -> None:
    async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
        r = await http.post(
            f"/api/v1/tasks/{IDC}/{sn}/approve",
            json={"approved_by": "admin@example.com", "notes": "Hardware verified"},
        )
        assert r.status_code == 200, r.text


async def start_roles(cluster: Cluster, **regional: Any) -> tuple[Proc, Proc]:
    cp = await cluster.start_control_plane()
    rg = await cluster.start_regional(**regional)
    await cp.wait_ready()
    await rg.wait_ready()
    return cp, rg


def check_ts(value: object, where: str) -> None:
    assert isinstance(value, str) and RFC3339_UTC.fullmatch(value), f"{where}: {value!r}"


# --------------------------------------------------------------------- the guide's flow


async def test_guide_flow_in_processes(cluster: Cluster) -> None:
    cp, rg = await start_roles(cluster)
    async with open_client(cluster.endpoints) as client:
        created = await create_task(cp)
        agent = cluster.agent(rg.url, SN, MAC)
        agent.start()
        await wait_task(
            client,
            lambda d: any(p["step"] == "hardware_collect" for p in d["progress"]),
            timeout=20,
            what="hardware report",
            cluster=cluster,
        )
        # While the agent is alive its lease key is there, bound to a live etcd lease.
        lease_kv = await client.get(schema.lease_key(IDC, SN))
        assert lease_kv is not None and lease_kv.lease != 0
        assert lease_kv.value == f"lease-{lease_kv.lease}".encode()
        info = await client.lease_time_to_live(lease_kv.lease)
        assert info is not None and info.granted_ttl == 5 and 0 < info.ttl <= 5

        await approve(cp)
        assert await agent.wait(30) == 0, cluster.tails()

        snapshot = await client.get_prefix("/os/dc1/")
        election = schema.regional_election_prefix(IDC)
        keys = {
            kv.key.decode(): kv for kv in snapshot.kvs if not kv.key.decode().startswith(election)
        }
        assert len(snapshot.kvs) == len(keys) + 1, "the regional's candidate key is there too"
        # The log lines are in chunk keys, exactly those the stored document lists.
        chunks = {k for k in keys if k.startswith(schema.logs_prefix(IDC, SN))}
        stored = Task.from_json(keys[TASK_KEY].value)
        assert chunks == {schema.log_chunk_key(IDC, SN, c.seq) for c in stored.log_chunks}
        keys = {k: kv for k, kv in keys.items() if k not in chunks}
        assert set(keys) == {
            "/os/dc1/servers/sn-001",
            "/os/dc1/machines/sn-001/task",
            "/os/dc1/machines/sn-001/meta",
            # The agent's credentials stay, hashed, and are dead with the task.
            "/os/dc1/machines/sn-001/enrolment",
            "/os/dc1/machines/sn-001/agent-token",
            schema.os_types_key(IDC),
        }, "the lease key goes with completion"

        server = json.loads(keys["/os/dc1/servers/sn-001"].value)
        assert server["status"] == "completed" and server["sn"] == SN and server["mac"] == MAC
        check_ts(server["added_at"], "server.added_at")

        assert json.loads(keys[TASK_KEY].value)["logs"] == [], "lines live in chunks"
        task = await task_doc(client)
        guide_fields = [
            "task_id", "sn", "mac", "os_type", "os_version", "disk_layout", "network_config",
            "status", "status_history", "progress", "logs", "approval",
            "created_at", "updated_at", "created_by",
        ]  # fmt: skip
        assert list(task)[: len(guide_fields)] == guide_fields, "the guide's fields, in order"
        assert task["task_id"] == created["task_id"]
        assert task["idc"] == IDC
        for key, value in GUIDE_TASK.items():
            if key != "idc":
                assert task[key] == value, key
        assert (task["disk_layout"], task["network_config"]) == ("auto", "dhcp")
        assert task["status"] == "completed"
        assert [h["status"] for h in task["status_history"]] == [
            "pending",
            "approved",
            "installing",
            "completed",
        ]
        for i, h in enumerate(task["status_history"]):
            check_ts(h["timestamp"], f"status_history[{i}]")
        steps = [(p["step"], p["percent"]) for p in task["progress"]]
        assert steps[0] == ("hardware_collect", 100)
        assert [s for s, _ in steps[1:]] == [
            "partitioning",
            "base_system",
            "packages",
            "bootloader",
        ]
        assert all(pct == 100 for _, pct in steps)
        for i, p in enumerate(task["progress"]):
            assert set(p) == {"step", "percent", "timestamp", "message"}
            check_ts(p["timestamp"], f"progress[{i}]")
        assert task["logs"] and all(isinstance(line, str) for line in task["logs"])
        for line in task["logs"]:
            assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[(INFO|WARN|ERROR|DEBUG)\] ", line)
        assert any("Task created" in line for line in task["logs"])
        assert any("Hardware:" in line for line in task["logs"])
        assert task["approval"]["approved"] is True
        assert task["approval"]["approved_by"] == "admin@example.com"
        assert task["approval"]["notes"] == "Hardware verified"
        check_ts(task["approval"]["approved_at"], "approval.approved_at")
        for key in ("created_at", "updated_at"):
            check_ts(task[key], key)
        assert task["updated_at"] >= task["created_at"]

        meta = json.loads(keys["/os/dc1/machines/sn-001/meta"].value)
        assert meta["cpu_cores"] > 0 and meta["memory_bytes"] > 0
        assert isinstance(meta["cpu_model"], str) and isinstance(meta["disks"], list)
        check_ts(meta["reported_at"], "meta.reported_at")

        # The operator sees the same through the API.
        async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
            r = await http.get("/api/v1/tasks", params={"idc": IDC, "status": "completed"})
            assert [t["sn"] for t in r.json()["tasks"]] == [SN]
            r = await http.get("/api/v1/servers", params={"idc": IDC})
            assert r.json()["servers"][0]["status"] == "completed"


# ------------------------------------------------------------- agent killed mid-install


class HeartbeatProxy:
    """A TCP proxy between the agent and the regional that notes when each heartbeat
    answer (HTTP 200) was handed to the agent: its last acknowledged heartbeat."""

    def __init__(self, target_port: int, sn: str) -> None:
        self.target_port = target_port
        self.marker = f"POST /api/v1/agent/{sn}/heartbeat ".encode()
        self.port = 0
        self.acks: list[float] = []

    async def _handle(self, conn: trio.SocketStream) -> None:
        pending = [0]  # heartbeat requests sent on this connection, not yet answered

        async def up(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            while data := await src.receive_some(65536):
                pending[0] += data.count(self.marker)
                await dst.send_all(data)

        async def down(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
                if pending[0] and data.startswith(b"HTTP/1.1 200"):
                    pending[0] -= 1
                    self.acks.append(trio.current_time())
                elif pending[0] and data.startswith(b"HTTP/1.1 "):
                    pending[0] -= 1

        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await conn.aclose()
            return
        try:
            async with conn, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(up, conn, upstream)
                nursery.start_soon(down, upstream, conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


@asynccontextmanager
async def heartbeat_proxy(url: str, sn: str) -> AsyncIterator[HeartbeatProxy]:
    proxy = HeartbeatProxy(int(url.rsplit(":", 1)[1]), sn)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()


async def agent_killed_mid_install(cluster: Cluster, ttl: int, heartbeat: int) -> None:
    plan = [("partitioning", 0.2), ("packages", 600.0), ("bootloader", 0.2)]
    cp, rg = await start_roles(
        cluster, agent_lease_ttl=ttl, heartbeat_interval=heartbeat, plan=plan
    )
    async with open_client(cluster.endpoints) as client, heartbeat_proxy(rg.url, SN) as proxy:
        await create_task(cp)
        agent = cluster.agent(f"http://127.0.0.1:{proxy.port}", SN, MAC)
        agent.start()
        await wait_task(
            client,
            lambda d: d["progress"],
            timeout=20,
            what="registration",
            cluster=cluster,
        )
        await approve(cp)
        await wait_task(
            client,
            lambda d: any(p["step"] == "packages" for p in d["progress"]),
            timeout=20,
            what="the long step",
            cluster=cluster,
        )
        # The kill lands at a random point between two heartbeats.
        await trio.sleep(random.uniform(0.1, heartbeat))
        assert proxy.acks, "no heartbeat was answered"
        agent.send_signal(signal.SIGKILL)
        assert await agent.wait(5) == -signal.SIGKILL
        last_ack = proxy.acks[-1]

        doc = await wait_task(
            client,
            lambda d: d["status"] != "installing",
            timeout=ttl + 5,
            what="the reaper",
            cluster=cluster,
        )
        took = trio.current_time() - last_ack
        assert doc["status"] == "failed", doc["status"]
        assert ttl - 0.05 <= took <= ttl + 2, f"failed {took:.2f}s after the last heartbeat"
        assert doc["error"] == HEARTBEAT_LOST
        assert doc["logs"][-1].endswith(f"Task failed at step packages by reaper: {HEARTBEAT_LOST}")
        assert await client.get(schema.lease_key(IDC, SN)) is None
        async with httpx.AsyncClient(base_url=cp.url, headers=cp.headers) as http:
            r = await http.get(f"/api/v1/tasks/{IDC}/{SN}")
            assert r.json()["status"] == "failed"


async def test_agent_killed_mid_install_fails_after_lease_ttl(cluster: Cluster) -> None:
    await agent_killed_mid_install(cluster, ttl=5, heartbeat=2)


@pytest.mark.slow
async def test_agent_killed_mid_install_fails_after_lease_ttl_30s(cluster: Cluster) -> None:
    await agent_killed_mid_install(cluster, ttl=30, heartbeat=10)


# ------------------------------------------------------- regional restart mid-install


async def regional_restart_mid_install(cluster: Cluster, ttl: int, heartbeat: int) -> None:
    # The agent finishes "packages" while the regional is down and keeps retrying its report.
    plan = [("partitioning", 0.2), ("packages", 2.0), ("bootloader", 0.5), ("post_install", 0.5)]
    cp, rg = await start_roles(
        cluster, agent_lease_ttl=ttl, heartbeat_interval=heartbeat, plan=plan
    )
    async with open_client(cluster.endpoints) as client:
        await create_task(cp)
        agent = cluster.agent(rg.url, SN, MAC)
        agent.start()
        await wait_task(
            client, lambda d: d["progress"], timeout=20, what="register", cluster=cluster
        )
        await approve(cp)
        await wait_task(
            client,
            lambda d: any(p["step"] == "packages" for p in d["progress"]),
            timeout=20,
            what="the long step",
            cluster=cluster,
        )
        lease_before = await client.get(schema.lease_key(IDC, SN))
        assert lease_before is not None

        rg.send_signal(signal.SIGKILL)
        assert await rg.wait(5) == -signal.SIGKILL
        await trio.sleep(5)
        rg.start()  # same config file, same port
        await rg.wait_ready()

        assert await agent.wait(60) == 0, cluster.tails()
        doc = await task_doc(client)
        assert doc["status"] == "completed"
        assert "failed" not in [h["status"] for h in doc["status_history"]]
        assert [p["step"] for p in doc["progress"]] == [
            "hardware_collect",
            "partitioning",
            "packages",
            "bootloader",
            "post_install",
        ]
        assert all(p["percent"] == 100 for p in doc["progress"])
        # The agent never had to register again: its lease survived the restart.
        assert sum("Hardware:" in line for line in doc["logs"]) == 1


async def test_regional_restart_mid_install_fails_nothing(cluster: Cluster) -> None:
    await regional_restart_mid_install(cluster, ttl=15, heartbeat=2)


@pytest.mark.slow
async def test_regional_restart_mid_install_fails_nothing_ttl_30s(cluster: Cluster) -> None:
    await regional_restart_mid_install(cluster, ttl=30, heartbeat=10)


# ------------------------------------------------------------------------- SIGTERM


async def test_run_stops_cleanly_on_sigterm(cluster: Cluster) -> None:
    cp, rg = await start_roles(cluster)
    async with open_client(cluster.endpoints) as client:
        election = schema.regional_election_prefix(IDC)
        assert len((await client.get_prefix(election)).kvs) == 1
        for proc in (rg, cp):
            t0 = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait(10)
            took = trio.current_time() - t0
            assert code == 0, proc.tail()
            assert took < 5, f"{proc.name} took {took:.1f}s to stop"
            assert "Traceback" not in proc.log.read_text(), proc.tail()
        # Graceful: the sessions were revoked, not left to expire.
        assert (await client.get_prefix(election)).kvs == []
        assert (await client.get_prefix("/os/_control-plane/")).kvs == []
