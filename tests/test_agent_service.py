"""AgentService without HTTP: enrolment, agent tokens, leases and task writes on real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from provisioning_kit import GUIDE_TASK, HARDWARE, keyspace, wait_for

from lpmosd import schema
from lpmosd.agent_service import AgentService, Registration, TaskEndedError, bearer_token
from lpmosd.api_requests import (
    CreateTaskRequest,
    FailRequest,
    LogRequest,
    ProgressRequest,
    RegisterRequest,
)
from lpmosd.config import RegionalConfig
from lpmosd.documents import TaskStatus
from lpmosd.errors import (
    AuthenticationError,
    ConflictError,
    PermissionDeniedError,
    UnavailableError,
)
from lpmosd.etcd import EtcdClient
from lpmosd.plan import DEMO_PLAN
from lpmosd.store import Store
from lpmosd.timestamps import utcnow
from lpmosd.view import PrefixView

IDC, MAC = "dc1", "00:1a:2b:3c:4d:5e"
MAC_B = "00:1a:2b:3c:4d:5f"


@dataclass
class World:
    store: Store
    view: PrefixView
    agents: AgentService
    #: Whether the service sees the view (the regional's session is up).
    up: bool = True

    async def create(self, sn: str = "sn-001", mac: str = MAC) -> str:
        req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn, "mac": mac, "os_type": "demo"})
        _, secret = await self.store.create_enrolled_task(req, actor="op")
        return secret

    async def register(
        self, secret: str | None, sn: str = "sn-001", mac: str = MAC, token: str | None = None
    ) -> Registration:
        body: dict[str, Any] = {"sn": sn, "mac": mac, "hardware": HARDWARE}
        if secret is not None:
            body["enrollment_secret"] = secret
        req = RegisterRequest.from_obj(body, now=utcnow())
        return await self.agents.register(req, None if token is None else f"Bearer {token}")


@pytest.fixture
async def world(client: EtcdClient) -> AsyncIterator[World]:
    store = Store(client)
    view = PrefixView(client, schema.machines_prefix(IDC))
    holder: list[World] = []

    def machines() -> PrefixView:
        if not holder[0].up:
            raise UnavailableError("session down")
        return view

    agents = AgentService(
        RegionalConfig(idc=IDC, heartbeat_interval=10), client, store, machines=machines
    )
    view.listeners.append(agents.on_machine_key)
    holder.append(World(store, view, agents))
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        await nursery.start(agents.writer.run)
        yield holder[0]
        nursery.cancel_scope.cancel()


def auth(token: str) -> str:
    return f"Bearer {token}"


async def test_an_agent_installs(world: World, client: EtcdClient) -> None:
    secret = await world.create()
    reg = await world.register(secret)
    assert reg.task.status is TaskStatus.PENDING
    assert reg.plan == DEMO_PLAN
    assert await world.store.get_lease_id(IDC, "sn-001") is not None
    assert await world.store.get_meta(IDC, "sn-001") is not None
    await world.store.approve(IDC, "sn-001", approved_by="op")

    call = await world.agents.authorize("sn-001", auth(reg.agent_token))
    reported = await world.agents.progress(call, ProgressRequest("partitioning", 50))
    assert reported.committed and reported.task.status is TaskStatus.INSTALLING
    call = await world.agents.authorize("sn-001", auth(reg.agent_token))
    heard = await world.agents.heartbeat(call)
    assert heard.status is TaskStatus.INSTALLING and heard.lease_ttl > 0 and heard.committed
    assert (await world.agents.logs(call, LogRequest(("hello",)))).committed
    task = (await world.store.get_task(IDC, "sn-001")).task
    assert task.logs[-1].endswith("[INFO] hello")
    call = await world.agents.authorize("sn-001", auth(reg.agent_token))
    task = (await world.agents.complete(call)).task
    assert task.status is TaskStatus.COMPLETED
    stored = await world.store.get_task(IDC, "sn-001")
    assert stored.task.status is TaskStatus.COMPLETED
    assert await world.store.get_lease_id(IDC, "sn-001") is None  # the lease went with it
    # The token ended with the task: the holder learns how.
    with pytest.raises(TaskEndedError) as ended:
        await world.agents.authorize("sn-001", auth(reg.agent_token))
    assert ended.value.task_status is TaskStatus.COMPLETED


async def test_failure_keeps_the_reason(world: World) -> None:
    reg = await world.register(await world.create())
    await world.store.approve(IDC, "sn-001", approved_by="op")
    call = await world.agents.authorize("sn-001", auth(reg.agent_token))
    task = (await world.agents.fail(call, FailRequest("disk full"))).task
    assert task.status is TaskStatus.FAILED and task.error == "disk full"


async def test_enrolment_refusals_write_nothing(world: World, client: EtcdClient) -> None:
    secret = await world.create()
    before = await keyspace(client)
    with pytest.raises(AuthenticationError, match="enrollment_secret is required"):
        await world.register(None)
    with pytest.raises(AuthenticationError, match="wrong enrollment_secret"):
        await world.register("lpe_" + "x" * 40)
    with pytest.raises(ConflictError, match="MAC"):
        await world.register(secret, mac=MAC_B)
    assert await keyspace(client) == before


async def test_used_secret_refused_while_its_agent_lives(world: World) -> None:
    secret = await world.create()
    first = await world.register(secret)
    with pytest.raises(ConflictError, match="still alive"):
        await world.register(secret)
    # The same agent (it holds the current token) may register again; its old token ends.
    again = await world.register(secret, token=first.agent_token)
    assert again.agent_token != first.agent_token
    with pytest.raises(AuthenticationError, match="unknown or revoked"):
        await world.agents.authorize("sn-001", auth(first.agent_token))


async def test_tokens_are_per_server(world: World) -> None:
    reg_a = await world.register(await world.create())
    secret_b = await world.create("sn-002", MAC_B)
    await world.register(secret_b, sn="sn-002", mac=MAC_B)
    await wait_for(lambda: len(world.agents.agent_tokens) == 2, what="the view's token keys")
    with pytest.raises(PermissionDeniedError):
        await world.agents.authorize("sn-002", auth(reg_a.agent_token))
    with pytest.raises(AuthenticationError):
        await world.agents.authorize("sn-001", None)
    with pytest.raises(AuthenticationError):
        await world.agents.authorize("sn-001", "Basic abc")


async def test_unavailable_without_the_session(world: World) -> None:
    reg = await world.register(await world.create())
    world.up = False
    with pytest.raises(UnavailableError):
        await world.agents.authorize("sn-001", auth(reg.agent_token))
    with pytest.raises(UnavailableError):
        world.agents.machines()


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Bearer", "Basic abc", "Bearer " + "x" * 1000):
        with pytest.raises(AuthenticationError):
            bearer_token(bad)
