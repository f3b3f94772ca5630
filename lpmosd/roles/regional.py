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
from typing import Any

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.boot.service import BootService
from lpmosd.config import RegionalConfig
from lpmosd.credentials import AgentToken
from lpmosd.errors import EtcdError, InputError, UnavailableError, ValidationError
from lpmosd.etcd import EtcdClient, Fence, HeldLease, KeyValue
from lpmosd.models import ACTIVE_AGENT, Task, TaskStatus
from lpmosd.roles.journal import Entry, Op, ReportJournal
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

    #: Reports etcd could not take yet, applied in order when it answers (see journal.py).
    journal: ReportJournal = field(init=False)
    _journal_wake: trio.Event = field(default_factory=trio.Event)
    #: Whether this regional led its IDC in its last session (then it serves alone while
    #: etcd is away; a standby does not).
    _led: bool = False

    def __post_init__(self) -> None:
        self.fence = Fence(f"regional {self.config.idc}")
        self.store = self.store.fenced(self.fence)
        self.writer = TaskWriter(self.store)
        self.journal = ReportJournal(
            self.config.state_dir, self.config.idc, max_entries=self.config.journal_max_entries
        )
        self.boot = BootService(self.config, self.store, lambda: self.machines)

    @property
    def autonomous(self) -> bool:
        """True while the regional, active when it lost its session (etcd unreachable),
        serves its agents from its last view: reports go to the journal."""
        return not self.session.running and self._led and self.machines is not None

    def journal_report(self, sn: str, op: Op, args: dict[str, Any]) -> None:
        """Journal one agent report durably (JournalFullError: 503, the agent retries)."""
        try:
            self.journal.append(sn, op, args)
        except OSError as exc:
            log.error("cannot write the report journal", extra={"error": str(exc)})
            raise UnavailableError(
                "etcd is unreachable and the report journal is not writable"
            ) from exc
        self._journal_wake.set()

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
        try:
            self.journal.load()
        except OSError as exc:
            log.error("cannot read the report journal", extra={"error": str(exc)})
        async with open_nursery() as nursery:
            await nursery.start(self.writer.run)
            nursery.start_soon(self._apply_journal)
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
        await self._rebind_leases(machines)
        self._journal_wake.set()
        await self.boot.keep_os_types_published(self.url, task_status=task_status)

    async def _rebind_leases(self, machines: PrefixView) -> None:
        """At session start: give a fresh lease to every enrolled agent of an approved or
        installing task whose lease is gone (it expired while etcd was away from us, or
        while we were down), so no task is failed for our outage and no agent has to
        register again. An agent that really died is failed a lease TTL later, as usual.
        A task without an agent token (retried, its machine not booted yet) is left alone.
        """
        ttl = self.config.agent_lease_ttl
        limiter = trio.CapacityLimiter(32)
        bound = [0]

        async def rebind(sn: str, kv: KeyValue) -> None:
            async with limiter:
                try:
                    lease = await self.client.lease_grant(ttl)
                except EtcdError as exc:
                    log.warning("cannot re-establish a lease", extra={"sn": sn, "error": str(exc)})
                    return
                try:
                    ok = await self.store.bind_lease(
                        self.idc, sn, lease.id, task_revision=kv.mod_revision
                    )
                except EtcdError:
                    ok = False
                if ok:
                    bound[0] += 1
                else:
                    await self.revoke_quietly(lease.id)

        async with open_nursery() as nursery:
            for key, kv in list(machines.items.items()):
                parsed = schema.parse_key(key)
                if parsed is None or parsed.kind != "task":
                    continue
                sn = parsed.sn
                if machines.get(schema.lease_key(self.idc, sn)) is not None:
                    continue
                if machines.get(schema.agent_token_key(self.idc, sn)) is None:
                    continue
                try:
                    status = Task.from_json(kv.value).status
                except ValidationError:
                    continue
                if status in ACTIVE_AGENT:
                    nursery.start_soon(rebind, sn, kv)
        if bound[0]:
            log.info("agent leases re-established", extra={"idc": self.idc, "agents": bound[0]})

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

    async def _apply_journal(self) -> None:
        """Apply journaled reports whenever the session runs: each a CAS on its task, in
        order per agent, agents in parallel."""
        while True:
            if not len(self.journal) or not self.session.active:
                self._journal_wake = trio.Event()
                with trio.move_on_after(1.0):
                    await self._journal_wake.wait()
                continue
            limiter = trio.CapacityLimiter(32)
            async with open_nursery() as nursery:
                for entries in self.journal.by_agent():
                    nursery.start_soon(self._apply_agent, entries, limiter)
            if not len(self.journal):
                log.info("journal applied", extra={"idc": self.idc})

    async def _apply_agent(self, entries: list[Entry], limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            for entry in entries:
                backoff = 0.1
                while True:
                    if not self.session.active:
                        return  # etcd went away again: the next round takes it up
                    try:
                        await self._apply(entry)
                    except EtcdError as exc:
                        log.warning("journal: etcd refused; retrying", extra={"error": str(exc)})
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                    except InputError as exc:
                        # The task moved on meanwhile (an operator cancelled it, or this
                        # report was applied before a restart): nothing left to apply.
                        log.warning(
                            "journal: report no longer applies; dropped",
                            extra={"sn": entry.sn, "op": entry.op, "error": exc.message},
                        )
                    break
                self.journal.applied(entry)

    async def _apply(self, entry: Entry) -> None:
        args, idc, sn = entry.args, self.idc, entry.sn
        stored = None
        op_id = args.get("op_id")  # the id the agent's request carried: applied once
        if entry.op == "progress":
            stored = await self.store.record_progress(
                idc,
                sn,
                step=args["step"],
                percent=args["percent"],
                message=args["message"],
                op_id=op_id,
            )
        elif entry.op == "logs":
            stored = await self.store.append_logs(
                idc, sn, args["lines"], level=args["level"], op_id=op_id
            )
        else:
            outcome = TaskStatus.COMPLETED if entry.op == "complete" else TaskStatus.FAILED
            lease_id = self.lease_id(sn) or await self.store.get_lease_id(idc, sn)
            stored = await self.store.finish(
                idc, sn, outcome=outcome, reason=str(args.get("reason", "")), op_id=op_id
            )
            await self.revoke_quietly(lease_id)
            self.heartbeats.pop(sn, None)
        view = self.machines
        if view is not None and stored.kv is not None:
            view.observe(stored.kv)

    async def revoke_quietly(self, lease_id: int | None) -> None:
        """Revoke an agent lease; failures only cost a TTL of waiting."""
        if not lease_id:
            return
        try:
            await self.client.lease_revoke(lease_id)
        except EtcdError as exc:
            log.warning("lease revoke failed", extra={"lease": lease_id, "error": str(exc)})
