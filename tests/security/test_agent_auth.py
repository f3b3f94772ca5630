"""Agents prove which machine they are: enrolment secrets, per-task agent tokens, rate limit.

Refusals write nothing: the whole keyspace is compared before and after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    bearer,
    keyspace,
    make_config,
    open_control_api,
    open_daemon,
    register_agent,
)

from lpmosd import schema
from lpmosd.daemon import Daemon
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store

MAC = GUIDE_TASK["mac"]
MAC_B = "00:1a:2b:3c:4d:5f"

#: Every agent endpoint after register, with a body it would accept.
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "task", None),
    ("POST", "heartbeat", {}),
    ("POST", "progress", {"step": "partitioning", "percent": 5}),
    ("POST", "logs", {"lines": ["hello"]}),
    ("POST", "complete", {}),
    ("POST", "fail", {"reason": "x"}),
]


@dataclass
class World:
    daemon: Daemon
    client: EtcdClient
    cp: httpx.AsyncClient  # operator
    agent: httpx.AsyncClient  # no credentials

    async def create(self, sn: str, mac: str = MAC) -> str:
        """Create a task for ``sn``; returns its enrolment secret."""
        r = await self.cp.post("/api/v1/tasks", json={**GUIDE_TASK, "sn": sn, "mac": mac})
        assert r.status_code == 201, r.text
        secret: str = r.json()["enrollment_secret"]
        return secret

    async def register(self, sn: str, secret: str, mac: str = MAC) -> dict[str, str]:
        r, auth = await register_agent(self.agent, sn=sn, mac=mac, secret=secret)
        assert r.status_code == 200, r.text
        return auth


@pytest.fixture
async def world(etcd: EtcdProcess, client: EtcdClient) -> AsyncIterator[World]:
    config = make_config(etcd.endpoints, agent_lease_ttl=5, heartbeat_interval=1)
    async with (
        open_daemon(config) as daemon,
        open_control_api(daemon) as cp,
        httpx.AsyncClient(base_url=daemon.urls["regional"]) as agent,
    ):
        yield World(daemon, client, cp, agent)


async def unchanged(world: World, before: Any) -> None:
    assert await keyspace(world.client) == before, "a refused request wrote something"


async def test_register_needs_the_secret(world: World) -> None:
    secret = await world.create("sn-a")
    before = await keyspace(world.client)
    for wrong in (None, "", "lpe_" + "A" * 43, secret[:-1], secret + "x", secret.upper()):
        body: dict[str, Any] = {"sn": "sn-a", "mac": MAC, "hardware": {}}
        if wrong is not None:
            body["enrollment_secret"] = wrong
        body["hardware"] = {
            "cpu_model": "x",
            "cpu_cores": 1,
            "memory_bytes": 1,
            "disks": [],
            "nics": [],
        }
        r = await world.agent.post("/api/v1/agent/register", json=body)
        assert r.status_code == 401, (wrong, r.text)
        assert r.json()["field"] == "enrollment_secret"
    await unchanged(world, before)
    auth = await world.register("sn-a", secret)
    assert auth["Authorization"].startswith("Bearer lpa_")
    # Stored hashed only: neither the secret nor the agent token is in etcd.
    snapshot = await keyspace(world.client)
    token = auth["Authorization"].removeprefix("Bearer ")
    assert not any(secret.encode() in v or token.encode() in v for v, _, _ in snapshot.values())


async def test_secret_is_bound_to_the_server_and_mac(world: World) -> None:
    secret_a = await world.create("sn-a")
    await world.create("sn-b", MAC_B)
    before = await keyspace(world.client)
    r, _ = await register_agent(world.agent, sn="sn-b", mac=MAC_B, secret=secret_a)
    assert r.status_code == 401 and r.json()["field"] == "enrollment_secret"
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC_B, secret=secret_a)
    assert r.status_code == 409 and r.json()["field"] == "mac"
    await unchanged(world, before)


async def test_replayed_secret_is_refused_while_the_agent_lives(world: World) -> None:
    secret = await world.create("sn-a")
    auth = await world.register("sn-a", secret)
    assert (await world.agent.post("/api/v1/agent/sn-a/heartbeat", headers=auth)).is_success
    before = await keyspace(world.client)
    r, stolen = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 409, r.text
    assert r.json()["field"] == "enrollment_secret" and not stolen
    await unchanged(world, before)
    # The live agent itself may register again (its token comes along): not a replay.
    r = await world.agent.post(
        "/api/v1/agent/register",
        json={
            "sn": "sn-a",
            "mac": MAC,
            "hardware": _hw(),
            "enrollment_secret": secret,
        },
        headers=auth,
    )
    assert r.status_code == 200, r.text


def _hw() -> dict[str, Any]:
    from provisioning_kit import HARDWARE

    return HARDWARE


async def test_two_registrations_racing_with_one_secret(world: World) -> None:
    """Concurrent first uses of one secret: exactly one gets a token."""
    secret = await world.create("sn-a")
    results: list[int] = []

    async def one() -> None:
        r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
        results.append(r.status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert results.count(200) == 1, results
    assert set(results) <= {200, 409}, results


async def test_rebooted_agent_reenrols_once_the_old_one_is_silent(world: World) -> None:
    """No stuck task: a restarted agent (same secret from its boot parameters, no token)
    gets in once the old agent has missed heartbeats (1.5 intervals: 1.5 s here), or at
    once when the old lease is gone. The old token dies with the re-enrolment."""
    secret = await world.create("sn-a")
    old = await world.register("sn-a", secret)
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 409  # too early: the old agent was heard from just now
    await trio.sleep(2.1)  # TimeToLive has whole-second resolution
    r, new = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 200, r.text
    assert new != old
    r = await world.agent.post("/api/v1/agent/sn-a/heartbeat", headers=old)
    assert r.status_code == 401
    assert (await world.agent.post("/api/v1/agent/sn-a/heartbeat", headers=new)).is_success
    # Lease gone (e.g. expired while the machine rebooted): in at once.
    lease_kv = await world.client.get(schema.lease_key("dc1", "sn-a"))
    assert lease_kv is not None
    await world.client.lease_revoke(lease_kv.lease)
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 200, r.text


async def test_agent_token_of_another_server_is_403(world: World) -> None:
    auth_a = await world.register("sn-a", await world.create("sn-a"))
    await world.register("sn-b", await world.create("sn-b", MAC_B), mac=MAC_B)
    before = await keyspace(world.client)
    for method, action, body in ENDPOINTS:
        r = await world.agent.request(
            method, f"/api/v1/agent/sn-b/{action}", json=body, headers=auth_a
        )
        assert r.status_code == 403, (action, r.text)
        assert r.json()["field"] == "sn"
    await unchanged(world, before)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer lpa_" + "A" * 43},
        {"Authorization": "Basic eDp5"},
        {"Authorization": "Bearer " + "x" * 300},
    ],
    ids=["none", "unknown", "basic", "oversized"],
)
async def test_agent_calls_need_a_token(world: World, headers: dict[str, str]) -> None:
    await world.register("sn-a", await world.create("sn-a"))
    before = await keyspace(world.client)
    for method, action, body in ENDPOINTS:
        r = await world.agent.request(
            method, f"/api/v1/agent/sn-a/{action}", json=body, headers=headers
        )
        assert r.status_code == 401, (action, r.text)
        assert r.headers.get("www-authenticate") or r.json()["field"] == "authorization"
    await unchanged(world, before)


async def test_operator_token_is_not_an_agent_token(world: World) -> None:
    await world.register("sn-a", await world.create("sn-a"))
    operator = world.cp.headers["Authorization"]
    r = await world.agent.post("/api/v1/agent/sn-a/heartbeat", headers={"Authorization": operator})
    assert r.status_code == 401


@pytest.mark.parametrize("ending", ["complete", "fail", "cancel", "delete"])
async def test_token_dies_with_the_task(world: World, ending: str) -> None:
    secret = await world.create("sn-a")
    auth = await world.register("sn-a", secret)
    assert (await world.cp.post("/api/v1/tasks/dc1/sn-a/approve", json={})).is_success
    if ending in ("complete", "fail"):
        r = await world.agent.post(
            "/api/v1/agent/sn-a/progress",
            json={"step": "partitioning", "percent": 100},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        body = {"reason": "x"} if ending == "fail" else {}
        r = await world.agent.post(f"/api/v1/agent/sn-a/{ending}", json=body, headers=auth)
        assert r.status_code == 200, r.text
    else:
        r = await world.cp.post("/api/v1/tasks/dc1/sn-a/cancel", json={})
        assert r.status_code == 200
        if ending == "delete":
            assert (await world.cp.delete("/api/v1/tasks/dc1/sn-a")).is_success
        await _until_the_regional_sees(world, ending)
    before = await keyspace(world.client)
    want = {"complete": "completed", "fail": "failed", "cancel": "cancelled"}.get(ending)
    for method, action, body in ENDPOINTS:
        r = await world.agent.request(
            method, f"/api/v1/agent/sn-a/{action}", json=body, headers=auth
        )
        assert r.status_code == 401, (ending, action, r.text)
        # The holder of a genuine token learns how its task ended (to stop the right way).
        assert r.json().get("task_status") == want, r.text
    # And the secret no longer enrols anyone.
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code in (401, 404), r.text
    await unchanged(world, before)


async def _until_the_regional_sees(world: World, ending: str) -> None:
    rg = world.daemon.regional
    assert rg is not None
    with trio.fail_after(5):
        while True:
            cached = rg.task_kv_and_task("sn-a")
            if ending == "delete" and cached is None:
                return
            if cached is not None and cached[0].status.value == "cancelled":
                return
            await trio.sleep(0.01)


async def test_retry_issues_a_fresh_secret_and_kills_the_old_token(
    world: World, store: Store
) -> None:
    secret = await world.create("sn-a")
    auth = await world.register("sn-a", secret)
    await world.cp.post("/api/v1/tasks/dc1/sn-a/approve", json={})
    r = await world.agent.post("/api/v1/agent/sn-a/fail", json={"reason": "x"}, headers=auth)
    assert r.status_code == 200
    r = await world.cp.post("/api/v1/tasks/dc1/sn-a/retry", json={})
    assert r.status_code == 200
    fresh = r.json()["enrollment_secret"]
    assert fresh != secret
    await trio.sleep(0.05)  # the regional's view follows
    r = await world.agent.post("/api/v1/agent/sn-a/heartbeat", headers=auth)
    assert r.status_code == 401 and "task_status" not in r.json()
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 401
    await world.register("sn-a", fresh)


async def test_reissued_secret_replaces_the_old_one(world: World) -> None:
    secret = await world.create("sn-a")
    r = await world.cp.post("/api/v1/tasks/dc1/sn-a/enrollment", json={})
    assert r.status_code == 200
    fresh = r.json()["enrollment_secret"]
    r, _ = await register_agent(world.agent, sn="sn-a", mac=MAC, secret=secret)
    assert r.status_code == 401
    await world.register("sn-a", fresh)


async def test_rate_limit_per_client(etcd: EtcdProcess) -> None:
    config = make_config(etcd.endpoints, rate_limit_per_second=1.0, rate_limit_burst=3)
    async with (
        open_daemon(config) as daemon,
        httpx.AsyncClient(base_url=daemon.urls["regional"]) as http,
    ):
        codes = [
            (await http.post("/api/v1/agent/sn-x/heartbeat", headers=bearer("x"))).status_code
            for _ in range(4)
        ]
        assert codes[:3] == [401, 401, 401] and codes[3] == 429
        r = await http.post("/api/v1/agent/register", json={})
        assert r.status_code == 429
        assert r.json()["error"] and int(r.headers["retry-after"]) >= 1
        # Probes are not agents: never limited.
        for _ in range(10):
            assert (await http.get("/healthz")).status_code == 200
        await trio.sleep(1.05)
        r = await http.post("/api/v1/agent/sn-x/heartbeat", headers=bearer("x"))
        assert r.status_code == 401  # a token came back
