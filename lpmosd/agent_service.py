"""The regional's agent operations: enrolment, agent tokens, agent leases and task writes.

The agent API (:mod:`lpmosd.web.agent_app`, ``lpmosd/web/openapi/agent.yaml``) only parses
requests and maps errors; everything an agent's call does happens here, over the
:class:`~lpmosd.store.Store` and the regional's watched view of its IDC. Every write is one
atomic Txn on the task document, CAS'd against the revision already in that view (no read
first); progress reports go through the batching :class:`~lpmosd.taskwriter.TaskWriter`.

Authentication (see :mod:`lpmosd.credentials` for what is stored):

- ``register`` needs the task's enrolment secret (``enrollment_secret``), issued to the
  operator when the task was created or retried and delivered to the machine in its boot
  parameters. A good secret, for a live task, with the task's MAC, buys a fresh agent token
  (``agent_token``) bound to that task, and marks the secret used.
- A used secret enrols again when the caller also presents the current agent token (the
  same agent registering again), or when no live agent holds the task: its lease is gone,
  or it has been silent for 1.5 heartbeat intervals (a rebooted or restarted agent is
  never stuck, and whoever else learned the secret cannot push out a working agent).
  Otherwise 409. Re-enrolling replaces the agent token: the old one stops working.
- Every other call needs ``Authorization: Bearer <agent_token>`` of the path's server:
  no/unknown token 401, another server's token 403. A token is valid only while its task
  is live (pending, approved, installing): once the task is completed, failed or cancelled
  it is revoked, and using it raises :class:`TaskEndedError` (401 naming ``task_status``:
  the holder proved it owns the token, so it may learn how its task ended and stop).
  Retrying, re-creating or deleting the task deletes the stored token.

Autonomy (issue 14): a report (progress, logs, complete, fail) etcd cannot take because it
is unreachable, or any report while the regional serves without a session (``autonomous``),
is appended to the durable :class:`~lpmosd.journal.ReportJournal` and answered "journaled"
(:attr:`Reported.committed` False); :meth:`AgentService.apply_journal` applies it, in order
per agent and with the request's op id, once the regional leads again. Later reports of an
agent with journaled ones wait for those to be applied.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.api_requests import (
    FailRequest,
    FirstBootRequest,
    LogRequest,
    ProgressRequest,
    RegisterRequest,
)
from lpmosd.config import RegionalConfig
from lpmosd.credentials import MAX_SECRET_CHARS, AgentToken, Enrolment, hash_secret
from lpmosd.documents import Task, TaskStatus
from lpmosd.errors import (
    AuthenticationError,
    ConflictError,
    EtcdError,
    EtcdUnavailableError,
    InputError,
    LeaseNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    ValidationError,
)
from lpmosd.etcd import EtcdClient, KeyValue
from lpmosd.journal import Entry, Op, ReportJournal
from lpmosd.leasekeeper import LeaseKeeper
from lpmosd.lifecycle import ACTIVE_AGENT, LIVE
from lpmosd.metrics import AGENT_AUTH_FAILURES, REPORTS_JOURNALED
from lpmosd.plan import Plan
from lpmosd.store import Store, StoredTask, new_op_id, parse_lease_value
from lpmosd.taskwriter import TaskWriter
from lpmosd.timestamps import utcnow
from lpmosd.view import Change, PrefixView

__all__ = [
    "AgentCall",
    "AgentService",
    "Heard",
    "Registration",
    "Reported",
    "TaskEndedError",
    "bearer_token",
]

log = logging.getLogger("lpmosd.agents")


class TaskEndedError(AuthenticationError):
    """A genuine agent token whose task has ended; ``task_status`` says how it ended."""

    def __init__(self, task_status: TaskStatus) -> None:
        super().__init__(f"agent token revoked: the task is {task_status}", field="authorization")
        self.task_status = task_status


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value; 401 without one."""
    if authorization is None:
        raise AuthenticationError(
            "agent token required: register, then send 'Authorization: Bearer <agent_token>'",
            field="authorization",
        )
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_SECRET_CHARS:
        raise AuthenticationError("Authorization must be 'Bearer <token>'", field="authorization")
    return value


def _refuse(reason: str, message: str, field: str = "authorization") -> AuthenticationError:
    AGENT_AUTH_FAILURES.labels(reason).inc()
    return AuthenticationError(message, field=field)


@dataclass(frozen=True, slots=True)
class Registration:
    """What a successful register returns to the agent (the token is shown only here)."""

    task: Task
    plan: Plan | None
    agent_token: str


@dataclass(frozen=True, slots=True)
class AgentCall:
    """An authorized agent call: its server, the view, and the task as the caller sees it."""

    sn: str
    view: PrefixView
    task_kv: KeyValue


@dataclass(frozen=True, slots=True)
class Reported:
    """An agent report's outcome: committed to etcd, or journaled (etcd unreachable; the
    task is then as the view last saw it)."""

    task: Task
    committed: bool


@dataclass(frozen=True, slots=True)
class Heard:
    """A heartbeat's answer: the task's status, the lease's new TTL (0: none) and whether
    etcd refreshed the lease (False: etcd is unreachable, the agent was only heard)."""

    status: TaskStatus
    lease_ttl: int
    committed: bool = True


class AgentService:
    """The agent operations of one regional (one IDC).

    ``machines`` gives the regional's view of ``/os/{idc}/machines/`` while it may serve
    agents, and raises UnavailableError (503) otherwise (session down, standby). Feed the
    view's changes to :meth:`on_machine_key`; run :attr:`writer` and :meth:`apply_journal`
    while serving. ``autonomous`` tells whether the regional serves without etcd (reports
    are journaled); ``journal_store`` gives the store to apply the journal through now, or
    None while it must wait (no session).
    """

    def __init__(
        self,
        config: RegionalConfig,
        client: EtcdClient,
        store: Store,
        *,
        machines: Callable[[], PrefixView],
        autonomous: Callable[[], bool] = lambda: False,
        journal_store: Callable[[], Store | None] | None = None,
    ) -> None:
        self.config = config
        self.idc = config.idc
        self.client = client
        self.store = store
        self._machines = machines
        self._autonomous = autonomous
        self._journal_store = journal_store or (lambda: store)
        #: Reports etcd could not take yet, applied in order when it answers.
        self.journal = ReportJournal(
            config.state_dir, config.idc, max_entries=config.journal_max_entries
        )
        self._journal_wake = trio.Event()
        #: Batched, coalesced writes of agents' progress reports (see lpmosd.taskwriter).
        self.writer = TaskWriter(store)
        #: sn -> trio clock time of the agent's last heartbeat (this process's knowledge).
        self.heartbeats: dict[str, float] = {}
        #: Agent leases refreshed at most once per TTL/3 each (run :meth:`LeaseKeeper.run`).
        self.leases = LeaseKeeper(
            config.agent_lease_ttl,
            lambda lease_id: client.keepalive_once(lease_id, timeout=config.journal_after),
        )
        #: Agent token hash -> sn, from the view: tells "another server's token" (403) from
        #: an unknown one (401).
        self.agent_tokens: dict[str, str] = {}
        self._token_records: dict[bytes, tuple[int, AgentToken]] = {}
        #: A used secret may enrol again once the agent holding it has been this long silent.
        self.takeover_after = config.heartbeat_interval * 1.5

    # --- the regional's view ---------------------------------------------------------------

    def machines(self) -> PrefixView:
        """The view of the IDC's machines; UnavailableError while agents cannot be served."""
        return self._machines()

    def on_machine_key(self, change: Change) -> None:
        """Keep :attr:`agent_tokens` in step with the view's agent-token keys."""
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

    def lease_id(self, sn: str) -> int | None:
        """The live agent lease of ``sn`` according to the view."""
        try:
            view = self._machines()
        except UnavailableError:
            return None
        kv = view.get(schema.lease_key(self.idc, sn))
        if kv is None:
            return None
        return kv.lease or parse_lease_value(kv.value)

    async def _live_lease_id(self, sn: str) -> int | None:
        # The view may not have the lease key of a registration a moment ago yet.
        return self.lease_id(sn) or await self.store.get_lease_id(self.idc, sn)

    def plan_for(self, task: Task) -> Plan | None:
        """The install plan of the task's os_type (None: the agent cannot install it)."""
        return self.config.plan_for(task.os_type)

    async def revoke_quietly(self, lease_id: int | None) -> None:
        """Revoke an agent lease; failures only cost a TTL of waiting."""
        if not lease_id:
            return
        self.leases.forget(lease_id)
        try:
            await self.client.lease_revoke(lease_id)
        except EtcdError as exc:
            log.warning("lease revoke failed", extra={"lease": lease_id, "error": str(exc)})

    @staticmethod
    def _observed(view: PrefixView, stored: StoredTask) -> Task:
        if stored.kv is not None:
            view.observe(stored.kv)
        return stored.task

    async def _task_kv(self, view: PrefixView, sn: str) -> KeyValue:
        kv = view.get(schema.task_key(self.idc, sn))
        if kv is None:
            # The view may lag a task created a moment ago: ask etcd before saying 404.
            kv = (await self.store.get_task(self.idc, sn)).kv
        assert kv is not None
        return kv

    # --- enrolment -----------------------------------------------------------------------------

    @staticmethod
    def _enrolment_problem(task_kv: KeyValue, enrol_kv: KeyValue | None, secret: str) -> str:
        """Why ``secret`` does not enrol an agent for this task ("" when it does)."""
        if enrol_kv is None:
            return (
                "no enrolment secret has been issued for this task; an operator can issue "
                "one (POST /api/v1/tasks/{idc}/{sn}/enrollment on the control plane)"
            )
        try:
            enrolment = Enrolment.from_json(enrol_kv.value)
        except ValidationError:
            return "the task's enrolment record is unreadable; issue a new secret"
        if not enrolment.matches(secret):
            return "wrong enrollment_secret"
        task = Task.from_json(task_kv.value)
        if enrolment.task_id != task.task_id:
            return "enrollment_secret belongs to an earlier task of this server"
        if task.status not in LIVE:
            return f"task is {task.status}: its enrolment has ended"
        return ""

    async def _check_enrolment(
        self, view: PrefixView, sn: str, secret: str, task_kv: KeyValue
    ) -> tuple[KeyValue, KeyValue, Enrolment]:
        """The task and enrolment (fresh enough to guard a Txn) that ``secret`` opens."""
        key = schema.enrolment_key(self.idc, sn)
        enrol_kv = view.get(key)
        if self._enrolment_problem(task_kv, enrol_kv, secret):
            # The cache may lag (a task or secret issued a moment ago): decide on etcd's.
            fresh = await self.store.get_task(self.idc, sn)
            assert fresh.kv is not None
            task_kv, enrol_kv = fresh.kv, await self.store.get_enrolment_kv(self.idc, sn)
            problem = self._enrolment_problem(task_kv, enrol_kv, secret)
            if problem:
                raise _refuse("enrolment", problem, field="enrollment_secret")
        assert enrol_kv is not None
        return task_kv, enrol_kv, Enrolment.from_json(enrol_kv.value)

    async def _refuse_if_agent_alive(self, sn: str) -> None:
        """A used secret: 409 while the agent that used it still heartbeats."""
        lease_id = await self._live_lease_id(sn)
        if not lease_id:
            return
        info = await self.client.lease_time_to_live(lease_id)
        if info is None:
            return
        silent = info.granted_ttl - info.ttl
        heard = self.heartbeats.get(sn)
        if heard is not None:
            # Leases are refreshed at most once per TTL/3 (lpmosd.leasekeeper): what this
            # process heard last is the fresher word.
            silent = min(silent, round(trio.current_time() - heard))
        if silent < self.takeover_after:
            AGENT_AUTH_FAILURES.labels("secret_in_use").inc()
            raise ConflictError(
                f"this enrolment secret was used by an agent that is still alive (heard from "
                f"{silent}s ago); a restarted agent can enrol again once the old one has been "
                f"silent for {self.takeover_after:g}s",
                field="enrollment_secret",
            )

    def _token_record(self, token_kv: KeyValue) -> AgentToken:
        """The stored agent token, parsed once per revision (every agent call reads it)."""
        cached = self._token_records.get(token_kv.key)
        if cached is not None and cached[0] == token_kv.mod_revision:
            return cached[1]
        record = AgentToken.from_json(token_kv.value)
        if len(self._token_records) >= 100_000:
            self._token_records.clear()  # it only saves parsing
        self._token_records[token_kv.key] = (token_kv.mod_revision, record)
        return record

    def _token_problem(self, token_kv: KeyValue | None, token: str) -> bool:
        if token_kv is None:
            return True
        try:
            return not self._token_record(token_kv).matches(token)
        except ValidationError:
            return True

    async def _holds_agent_token(
        self, view: PrefixView, sn: str, authorization: str | None
    ) -> bool:
        """Whether a register call carries the current agent token of ``sn``: the live agent
        itself registering again (e.g. after its lease expired), not a newcomer."""
        try:
            token = bearer_token(authorization)
        except AuthenticationError:
            return False
        token_kv = view.get(schema.agent_token_key(self.idc, sn))
        if self._token_problem(token_kv, token):
            token_kv = await self.store.get_agent_token_kv(self.idc, sn)
        return not self._token_problem(token_kv, token)

    async def register(self, req: RegisterRequest, authorization: str | None) -> Registration:
        """Enrol the agent of ``req.sn``: record its hardware, grant its lease, issue a token."""
        view = self.machines()
        sn, mac = req.sn, req.mac
        if req.enrollment_secret is None:
            raise _refuse(
                "enrolment",
                "enrollment_secret is required (from the machine's boot parameters)",
                field="enrollment_secret",
            )
        current = await self._task_kv(view, sn)
        current, enrol_kv, enrolment = await self._check_enrolment(
            view, sn, req.enrollment_secret, current
        )
        if enrolment.mac != mac:
            raise ConflictError(f"MAC {mac} does not match the task's MAC for {sn}", field="mac")
        if enrolment.used_at is not None and not await self._holds_agent_token(
            view, sn, authorization
        ):
            await self._refuse_if_agent_alive(sn)
        now = utcnow()
        record, agent_token = AgentToken.issue(task_id=enrolment.task_id, mac=mac, now=now)
        old_lease = await self._live_lease_id(sn)
        lease = await self.client.lease_grant(self.config.agent_lease_ttl)
        self.leases.granted(lease.id, lease.ttl)
        try:
            stored = await self.store.register_agent(
                self.idc,
                sn,
                mac=mac,
                meta=req.hardware,
                lease_id=lease.id,
                current=current,
                token=record,
                used_enrolment=(enrolment.used(now), enrol_kv.mod_revision),
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.revoke_quietly(lease.id)
            raise
        task = self._observed(view, stored)
        if old_lease and old_lease != lease.id:
            # The lease key now rides on the new lease: revoking the old one deletes nothing.
            await self.revoke_quietly(old_lease)
        self.heartbeats[sn] = trio.current_time()
        return Registration(task=task, plan=self.plan_for(task), agent_token=agent_token)

    # --- calls with an agent token ------------------------------------------------------------

    async def authorize(self, sn: str, authorization: str | None) -> AgentCall:
        """Check the caller's agent token against ``sn`` (a path segment, validated here)."""
        view = self.machines()
        sn = schema.validate_sn(sn)
        token = bearer_token(authorization)
        token_kv = view.get(schema.agent_token_key(self.idc, sn))
        if self._token_problem(token_kv, token):
            # Registered a moment ago?
            token_kv = await self.store.get_agent_token_kv(self.idc, sn)
            if token_kv is None or self._token_problem(token_kv, token):
                other = self.agent_tokens.get(hash_secret(token))
                if other is not None and other != sn:
                    AGENT_AUTH_FAILURES.labels("other_server").inc()
                    raise PermissionDeniedError(
                        f"this agent token belongs to another server, not {sn}", field="sn"
                    )
                raise _refuse("token", "unknown or revoked agent token; register again")
        assert token_kv is not None
        record = self._token_record(token_kv)
        try:
            task_kv: KeyValue | None = await self._task_kv(view, sn)
            assert task_kv is not None
            task = self.writer.task_of(task_kv)
            if task.task_id != record.task_id or task.status not in LIVE:
                # The cache may lag (the task was re-created or retried a moment ago):
                # refuse only on etcd's word.
                fresh = await self.store.get_task(self.idc, sn)
                task, task_kv = fresh.task, fresh.kv
        except NotFoundError:
            raise _refuse("ended", "the task of this agent token is gone") from None
        assert task_kv is not None
        if task.task_id != record.task_id:
            raise _refuse("ended", "the task of this agent token is gone")
        if task.status not in LIVE:
            AGENT_AUTH_FAILURES.labels("ended").inc()
            raise TaskEndedError(task.status)
        return AgentCall(sn, view, task_kv)

    def task(self, call: AgentCall) -> Task:
        """The caller's task."""
        return Task.from_json(call.task_kv.value)

    async def heartbeat(self, call: AgentCall) -> Heard:
        """Refresh the agent's lease; while etcd is unreachable the agent is only heard
        (its lease is re-established afterwards, see :meth:`reestablish_leases`)."""
        sn = call.sn
        task = self.writer.task_of(call.task_kv)
        self.heartbeats[sn] = trio.current_time()
        if self._autonomous():
            return Heard(task.status, 0, committed=False)
        ttl = 0
        try:
            lease_id = await self._live_lease_id(sn)
            if lease_id and task.status not in (TaskStatus.COMPLETED, TaskStatus.CANCELLED):
                left = self.leases.ttl_left(lease_id)
                if left is not None:
                    # Refreshed less than TTL/3 ago (by a heartbeat or after a report).
                    self.leases.skipped += 1
                    return Heard(task.status, left)
                try:
                    ttl = await self.leases.refresh(lease_id)
                except LeaseNotFoundError:
                    # A cached id may be the lease a re-registration just replaced: ask etcd.
                    fresh = await self.store.get_lease_id(self.idc, sn)
                    if fresh and fresh != lease_id:
                        try:
                            ttl = await self.leases.refresh(fresh)
                        except LeaseNotFoundError:
                            ttl = 0
        except EtcdError:
            # etcd is away and the session does not know yet: heard, as above.
            return Heard(task.status, 0, committed=False)
        if not ttl and task.status in ACTIVE_AGENT | {TaskStatus.PENDING}:
            raise ConflictError(f"agent of {sn} holds no live lease; register again", field="sn")
        return Heard(task.status, ttl)

    async def progress(
        self, call: AgentCall, req: ProgressRequest, *, op_id: str | None = None
    ) -> Reported:
        """Record a progress report (batched with other agents' reports); ``op_id`` names
        the request, so a repeat after a lost answer is not applied twice."""
        # One id for the write and, should etcd not take it, its journal entry: a write
        # that landed after all is recognised when the journal applies it.
        op_id = op_id or new_op_id()
        args = {"step": req.step, "percent": req.percent, "message": req.message}
        return await self._report(
            call,
            "progress",
            {**args, "op_id": op_id},
            lambda: self.store.record_progress(
                self.idc,
                call.sn,
                step=req.step,
                percent=req.percent,
                message=req.message,
                current=call.task_kv,
                op_id=op_id,
                via=self.writer,
            ),
        )

    async def logs(self, call: AgentCall, req: LogRequest, *, op_id: str | None = None) -> Reported:
        """Append the agent's log lines to its task (once per ``op_id``)."""
        op_id = op_id or new_op_id()
        return await self._report(
            call,
            "logs",
            {"lines": list(req.lines), "level": req.level, "op_id": op_id},
            lambda: self.store.append_logs(
                self.idc, call.sn, req.lines, level=req.level, current=call.task_kv, op_id=op_id
            ),
        )

    async def complete(self, call: AgentCall, *, op_id: str | None = None) -> Reported:
        """The install succeeded: the task completes and the agent's lease goes."""
        return await self._finish(call, TaskStatus.COMPLETED, "", op_id)

    async def fail(
        self, call: AgentCall, req: FailRequest, *, op_id: str | None = None
    ) -> Reported:
        """The install failed: the task fails with the agent's reason; its lease goes."""
        return await self._finish(call, TaskStatus.FAILED, req.reason, op_id)

    async def first_boot_credential(self, call: AgentCall) -> str:
        """A one-time credential the installed system presents on its first boot."""
        task = self.writer.task_of(call.task_kv)
        return await self.store.issue_first_boot(self.idc, call.sn, task=task)

    async def first_boot(self, sn: str, credential: str, req: FirstBootRequest) -> Task:
        """The installed system reports its first boot, with its first-boot credential."""
        view = self.machines()
        try:
            stored = await self.store.record_first_boot(
                self.idc, sn, credential, hostname=req.hostname
            )
        except AuthenticationError as exc:
            raise _refuse("first_boot", exc.message) from None
        return self._observed(view, stored)

    async def _finish(
        self, call: AgentCall, outcome: TaskStatus, reason: str, op_id: str | None
    ) -> Reported:
        op_id = op_id or new_op_id()

        async def write() -> StoredTask:
            # From the view only: a read of etcd here could fail for a write that would not.
            lease_id = self.lease_id(call.sn)
            stored = await self.store.finish(
                self.idc,
                call.sn,
                outcome=outcome,
                reason=reason,
                current=call.task_kv,
                op_id=op_id,
            )
            await self.revoke_quietly(lease_id)
            return stored

        op: Op = "complete" if outcome is TaskStatus.COMPLETED else "fail"
        reported = await self._report(call, op, {"reason": reason, "op_id": op_id}, write)
        if reported.committed:
            # Done with this agent. A journaled finish keeps it "heard": its lease is then
            # re-established after the outage, until the journal has applied the finish.
            self.heartbeats.pop(call.sn, None)
        return reported

    # --- the journal (autonomy while etcd is unreachable) -------------------------------------

    async def _report(
        self,
        call: AgentCall,
        op: Op,
        args: dict[str, Any],
        write: Callable[[], Awaitable[StoredTask]],
    ) -> Reported:
        """Commit an agent report to etcd, or journal it when etcd is unreachable.

        A report waits for journaled ones of the same agent to be applied (order is kept).
        """
        sn = call.sn
        self.heartbeats[sn] = trio.current_time()  # any report says the agent is alive
        # Earlier reports of this agent still in the journal go first (it is being applied
        # while the regional leads; without a session everything is journaled).
        while self.journal.has(sn) and not self._autonomous():  # noqa: ASYNC110 - no event
            await trio.sleep(0.05)
        if not self._autonomous():
            try:
                stored = await write()
            except EtcdUnavailableError as exc:
                # etcd unreachable (not a refusal such as NOSPACE: that answers 5xx). The
                # client settles ambiguous writes before it raises: this one did not land
                # (and should it have, its operation id makes the journal's a no-op).
                log.warning(
                    "etcd did not take a report; journaling it",
                    extra={"sn": sn, "op": op, "error": str(exc) or type(exc).__name__},
                )
            else:
                if op in ("progress", "logs"):
                    # A report says the agent is alive: its lease is refreshed when due.
                    self.leases.heard(self.lease_id(sn))
                return Reported(self._observed(call.view, stored), committed=True)
        self.journal_report(sn, op, args)
        REPORTS_JOURNALED.inc()
        return Reported(self.writer.task_of(call.task_kv), committed=False)

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

    def load_journal(self) -> None:
        """Take up what a previous run journaled and did not apply."""
        try:
            self.journal.load()
        except OSError as exc:
            log.error("cannot read the report journal", extra={"error": str(exc)})

    def wake_journal(self) -> None:
        """Look at the journal now (the regional leads again)."""
        self._journal_wake.set()

    async def apply_journal(self) -> None:
        """Apply journaled reports whenever etcd answers (see ``journal_store``): each a CAS
        on its task, in order per agent, agents in parallel. Runs until cancelled."""
        while True:
            if not len(self.journal) or self._journal_store() is None:
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
                    store = self._journal_store()
                    if store is None:
                        return  # etcd went away again: the next round takes it up
                    try:
                        await self._apply(store, entry)
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

    async def _apply(self, store: Store, entry: Entry) -> None:
        args, idc, sn = entry.args, self.idc, entry.sn
        op_id = args.get("op_id")  # the id the agent's request carried: applied once
        if entry.op == "progress":
            stored = await store.record_progress(
                idc,
                sn,
                step=args["step"],
                percent=args["percent"],
                message=args["message"],
                op_id=op_id,
            )
        elif entry.op == "logs":
            stored = await store.append_logs(
                idc, sn, args["lines"], level=args["level"], op_id=op_id
            )
        else:
            outcome = TaskStatus.COMPLETED if entry.op == "complete" else TaskStatus.FAILED
            lease_id = await self._live_lease_id(sn)
            stored = await store.finish(
                idc, sn, outcome=outcome, reason=str(args.get("reason", "")), op_id=op_id
            )
            await self.revoke_quietly(lease_id)
            self.heartbeats.pop(sn, None)
        try:
            view = self._machines()
        except UnavailableError:
            return
        if stored.kv is not None:
            view.observe(stored.kv)

    async def reestablish_leases(self, machines: PrefixView) -> None:
        """When the regional starts leading: give a fresh lease to every enrolled agent of an
        approved or installing task whose lease is gone (it expired while etcd was away from
        us, or while we were down), so no task is failed for our outage and no agent has to
        register again. An agent that really died is failed a lease TTL later, as usual.
        A task without an agent token (retried, its machine not booted yet) is left alone.
        """
        ttl = self.config.agent_lease_ttl
        limiter = trio.CapacityLimiter(32)
        bound = 0

        async def rebind(sn: str, kv: KeyValue) -> None:
            nonlocal bound
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
                    bound += 1
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
        if bound:
            log.info("agent leases re-established", extra={"idc": self.idc, "agents": bound})
