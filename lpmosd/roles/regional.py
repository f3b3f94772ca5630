"""The regional-client role: one per IDC, on the PXE host.

Several regionals may serve one IDC (a second PXE host): they stand for election on
their session leases, one is active, the others are standby (their agent API answers 503,
so agents move to the active one) and take over when the active one's lease goes. Every
write is fenced on the active one's election key.

It watches only its own IDC (``/os/{idc}/servers/`` and ``/os/{idc}/machines/``), keeps a
local view of them for its agent service (:class:`lpmosd.agent_service.AgentService`, which
the agent API serves) and keeps one lease per live agent: the agent's heartbeats refresh it
over the client's single shared LeaseKeepAlive stream. Lease ids live in the lease keys
themselves, so a restarted regional re-attaches to live leases and a quick restart fails no
install. The daemon serves the agent API and tells :meth:`Regional.run` its URL.

While etcd is unreachable, the regional that led keeps serving its agents from its last
view (autonomy): their reports go to the agent service's journal, applied once etcd answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.agent_service import AgentService
from lpmosd.boot.service import BootService
from lpmosd.config import RegionalConfig
from lpmosd.documents import Task
from lpmosd.errors import UnavailableError
from lpmosd.etcd import EtcdClient, Fence, HeldLease
from lpmosd.journal import ReportJournal
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store
from lpmosd.view import Change, PrefixView

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
    url: str = ""
    #: The leadership term every write of this regional is guarded on: a second PXE host
    #: of the IDC runs as a standby, and one that lost its lease while paused writes nothing.
    fence: Fence = field(init=False)
    #: What the agent API does, over this role's view of the IDC's machines.
    agents: AgentService = field(init=False)
    #: The IDC's boot server (iPXE scripts, per-boot credentials, artifacts, OS types).
    boot: BootService = field(init=False)
    #: Whether this regional led its IDC in its last session (then it serves alone while
    #: etcd is away; a standby does not).
    _led: bool = False

    def __post_init__(self) -> None:
        self.fence = Fence(f"regional {self.config.idc}")
        unfenced, self.store = self.store, self.store.fenced(self.fence)

        def journal_store() -> Store | None:
            # Reports journaled while this regional served alone are agents' words it
            # acknowledged: they are applied once etcd answers, fenced while it leads, and
            # unfenced should another regional lead by then (a WAN cut outlasting the
            # session): each is still a CAS on its task, applied once by its operation id.
            if self.session.active:
                return self.store
            return unfenced if self.session.running else None

        self.agents = AgentService(
            self.config,
            self.client,
            self.store,
            machines=self._serving,
            autonomous=lambda: self.autonomous,
            journal_store=journal_store,
        )
        self.boot = BootService(self.config, self.store, lambda: self.machines)

    def _serving(self) -> PrefixView:
        """The view the agent service works on; UnavailableError (503) while there is none
        or this regional is a standby."""
        view = self.machines
        if view is None:
            raise UnavailableError("regional is starting its etcd session; retry shortly")
        if self.autonomous:
            # No session (etcd unreachable) but it was the active one: the last view
            # serves and reports are journaled.
            return view
        if not self.session.running:
            raise UnavailableError("regional is restarting its etcd session; retry shortly")
        if not self.session.active:
            raise UnavailableError(
                f"this regional is a standby for {self.idc}; use the active one (retry shortly)"
            )
        return view

    @property
    def autonomous(self) -> bool:
        """True while the regional, active when it lost its session because etcd did not
        answer, serves its agents from its last view: reports go to the journal.

        A session that merely ran out while etcd answers (this process was paused past its
        TTL, or its lease was revoked) is no reason to serve alone: a standby may lead by
        now, so until a new session says who leads, agents get 503 and retry (or move to
        the other PXE host) instead of a journaled answer that only this host could apply.
        """
        return (
            not self.session.running
            and self.session.etcd_unreachable
            and self._led
            and self.machines is not None
        )

    @property
    def journal(self) -> ReportJournal:
        """Agent reports journaled and not yet applied (see :mod:`lpmosd.journal`)."""
        return self.agents.journal

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

    async def run(
        self, *, url: str = "", task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the session (views, agent service, journal) alive until cancelled; ``url`` is
        where the agent API is served, advertised in the session key."""
        self.url = url
        self.agents.load_journal()
        async with open_nursery() as nursery:
            await nursery.start(self.agents.writer.run)
            await nursery.start(self.agents.leases.run)
            nursery.start_soon(self.agents.apply_journal)
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
                    value=session_value(
                        "regional",
                        {
                            "idc": self.idc,
                            "url": self.url,
                            # The control plane judges silence by these (lpmosd.roles.disruption).
                            "agent_lease_ttl": str(self.config.agent_lease_ttl),
                            "heartbeat_interval": str(self.config.heartbeat_interval),
                        },
                    ),
                )
            )
            log.info("regional listening", extra={"idc": self.idc, "url": self.url})
            task_status.started()

    async def _session_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        servers = PrefixView(self.client, schema.servers_prefix(self.idc))
        machines = PrefixView(self.client, schema.machines_prefix(self.idc))
        servers.listeners.append(self._on_server)
        machines.listeners.append(self.agents.on_machine_key)
        machines.listeners.append(self.boot.on_machine_key)
        self.agents.agent_tokens.clear()
        self.boot.reset()
        # When the session ends the views stay, frozen: agents are served from them while
        # etcd is away (reports go to the journal) until a new session replaces them.
        await self._session_work(servers, machines, task_status)

    async def _session_work(
        self, servers: PrefixView, machines: PrefixView, task_status: trio.TaskStatus[None]
    ) -> None:
        async with open_nursery() as nursery:
            await nursery.start(servers.run)
            await nursery.start(machines.run)
            self.servers, self.machines = servers, machines
            self._led = False
            live = sum(1 for k in machines.items if k.endswith("/lease"))
            log.info(
                "regional synced",
                extra={"idc": self.idc, "servers": len(servers.items), "live_agents": live},
            )
            task_status.started()
            await trio.sleep_forever()

    async def _leader_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """What only the active regional does: re-establish agent leases (then the journal
        is applied) and publish the IDC's installable OS types."""
        machines = self.machines
        assert machines is not None, "the session body syncs the views before the election"
        self._led = True
        await self.agents.reestablish_leases(machines)
        self.agents.wake_journal()
        await self.boot.keep_os_types_published(self.url, task_status=task_status)

    def _on_server(self, change: Change) -> None:
        if change.kv is not None and change.prev is None and not change.relisted:
            parsed = schema.parse_key(change.key)
            if parsed is not None:
                log.info("New server: %s", parsed.sn, extra={"idc": self.idc, "sn": parsed.sn})
