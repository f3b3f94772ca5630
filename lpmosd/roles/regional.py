"""The regional-client role: one per IDC, on the PXE host.

Several regionals may serve one IDC (a second PXE host): they stand for election on
their session leases, one is active, the others are standby (their agent API answers 503,
so agents move to the active one) and take over when the active one's lease goes. Every
write is fenced on the active one's election key.

It watches only its own IDC (``/os/{idc}/servers/`` and ``/os/{idc}/machines/``), keeps a
local view of them, serves the agent API and keeps one lease per live agent: the agent's
heartbeats refresh it over the client's single shared LeaseKeepAlive stream. Lease ids live
in the lease keys themselves, so a restarted regional re-attaches to live leases and a
quick restart fails no install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.boot.service import BootService
from lpmosd.config import RegionalConfig
from lpmosd.credentials import AgentToken
from lpmosd.errors import EtcdError, ValidationError
from lpmosd.etcd import EtcdClient, Fence, HeldLease
from lpmosd.models import Task
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store, parse_lease_value
from lpmosd.taskwriter import TaskWriter
from lpmosd.view import Change, PrefixView
from lpmosd.web.server import serve_app

log = logging.getLogger("lpmosd.regional")


@dataclass(eq=False)
class Regional:
    """Shared state of the regional role, read by its HTTP app."""

    config: RegionalConfig
    client: EtcdClient
    store: Store
    session: SessionState = field(default_factory=lambda: SessionState("regional"))
    servers: PrefixView | None = None
    machines: PrefixView | None = None
    #: sn -> trio clock time of the agent's last heartbeat (this process's knowledge).
    heartbeats: dict[str, float] = field(default_factory=dict)
    #: Agent token hash -> sn, from the view: tells "another server's token" (403) from an
    #: unknown one (401).
    agent_tokens: dict[str, str] = field(default_factory=dict)
    url: str = ""
    #: Batched, coalesced writes of agents' progress reports (see lpmosd.taskwriter).
    writer: TaskWriter = field(init=False)
    #: The leadership term every write of this regional is guarded on: a second PXE host
    #: of the IDC runs as a standby, and one that lost its lease while paused writes nothing.
    fence: Fence = field(init=False)
    #: The IDC's boot server (iPXE scripts, per-boot credentials, artifacts, OS types).
    boot: BootService = field(init=False)

    def __post_init__(self) -> None:
        self.fence = Fence(f"regional {self.config.idc}")
        self.store = self.store.fenced(self.fence)
        self.writer = TaskWriter(self.store)
        self.boot = BootService(self.config, self.store, lambda: self.machines)

    @property
    def idc(self) -> str:
        """The IDC this regional serves."""
        return self.config.idc

    def task_kv_and_task(self, sn: str) -> tuple[Task, int] | None:
        """The cached task of ``sn`` (None when unknown to this IDC)."""
        view = self.machines
        kv = view.get(schema.task_key(self.idc, sn)) if view else None
        if kv is None:
            return None
        return Task.from_json(kv.value), kv.mod_revision

    def lease_id(self, sn: str) -> int | None:
        """The live agent lease of ``sn`` according to the view."""
        view = self.machines
        kv = view.get(schema.lease_key(self.idc, sn)) if view else None
        if kv is None:
            return None
        return kv.lease or parse_lease_value(kv.value)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the agent API and keep the session alive until cancelled."""
        from lpmosd.web.agent_app import create_agent_app

        app = create_agent_app(self)
        async with open_nursery() as nursery:
            await nursery.start(self.writer.run)
            self.url = await nursery.start(
                partial(
                    serve_app,
                    app,
                    host=self.config.listen,
                    port=self.config.port,
                    certfile=self.config.tls_cert_file,
                    keyfile=self.config.tls_key_file,
                )
            )
            await nursery.start(
                partial(
                    run_session,
                    self.client,
                    self.session,
                    election=schema.regional_election_prefix(self.idc),
                    fence=self.fence,
                    ttl=self.config.session_ttl,
                    body=self._session_body,
                    leader_body=self._leader_body,
                    value=session_value("regional", {"idc": self.idc, "url": self.url}),
                )
            )
            log.info("regional listening", extra={"idc": self.idc, "url": self.url})
            task_status.started(self.url)

    async def _session_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        servers = PrefixView(self.client, schema.servers_prefix(self.idc))
        machines = PrefixView(self.client, schema.machines_prefix(self.idc))
        servers.listeners.append(self._on_server)
        machines.listeners.append(self._on_machine_key)
        machines.listeners.append(self.boot.on_machine_key)
        self.agent_tokens.clear()
        self.boot.reset()
        try:
            async with open_nursery() as nursery:
                await nursery.start(servers.run)
                await nursery.start(machines.run)
                self.servers, self.machines = servers, machines
                live = sum(1 for k in machines.items if k.endswith("/lease"))
                log.info(
                    "regional synced",
                    extra={"idc": self.idc, "servers": len(servers.items), "live_agents": live},
                )
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.servers = self.machines = None

    async def _leader_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """What only the active regional does: publish the IDC's installable OS types."""
        await self.boot.keep_os_types_published(self.url, task_status=task_status)

    def _on_server(self, change: Change) -> None:
        if change.kv is not None and change.prev is None and not change.relisted:
            parsed = schema.parse_key(change.key)
            if parsed is not None:
                log.info("New server: %s", parsed.sn, extra={"idc": self.idc, "sn": parsed.sn})

    def _on_machine_key(self, change: Change) -> None:
        parsed = schema.parse_key(change.key)
        if parsed is None or parsed.kind != "agent_token":
            return
        for kv, add in ((change.prev, False), (change.kv, True)):
            if kv is None:
                continue
            try:
                digest = AgentToken.from_json(kv.value).token_hash
            except ValidationError:
                continue
            if add:
                self.agent_tokens[digest] = parsed.sn
            elif self.agent_tokens.get(digest) == parsed.sn:
                del self.agent_tokens[digest]

    async def revoke_quietly(self, lease_id: int | None) -> None:
        """Revoke an agent lease; failures only cost a TTL of waiting."""
        if not lease_id:
            return
        try:
            await self.client.lease_revoke(lease_id)
        except EtcdError as exc:
            log.warning("lease revoke failed", extra={"lease": lease_id, "error": str(exc)})
