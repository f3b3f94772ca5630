"""Provisioning operations as etcd transactions: the small interface the roles depend on.

Every operation is one Txn (or one CAS loop of Txns) over the v3 schema: a task change
writes the merged task document, its new log lines (a chunk key, see
:mod:`lpmosd.tasklogs`) and the server entry's status together, so readers never see them
disagree. Roles call these methods; they never build etcd requests themselves.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from lpmosd import api_requests, documents, lifecycle, schema, task_pages, tasklogs, timestamps
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.boot.ostypes import OsTypes
from lpmosd.credentials import AgentToken, Enrolment, FirstBootCredential
from lpmosd.documents import MachineMeta, ServerEntry, Task, TaskStatus
from lpmosd.errors import (
    AuthenticationError,
    ConflictError,
    InputError,
    NotFoundError,
    ValidationError,
)
from lpmosd.etcd import (
    Compare,
    EtcdClient,
    Fence,
    KeyValue,
    Op,
    TxnResult,
    Write,
    delete,
    put,
)
from lpmosd.lifecycle import ACTIVE_AGENT, LIVE, TERMINAL

log = logging.getLogger("lpmosd.store")


HARDWARE_STEP = "hardware_collect"

TaskFn = Callable[[Task], Task]


class TaskUpdater(Protocol):
    """Something that applies a TaskFn to a stored task in a CAS (like ``update_task``)."""

    async def update(
        self,
        idc: str,
        sn: str,
        fn: TaskFn,
        *,
        current: KeyValue | None = None,
        op_id: str | None = None,
    ) -> StoredTask:
        """Apply ``fn`` to the task of ``sn``, recording ``op_id``; the result as written."""
        ...


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task with the etcd revision it was read or written at."""

    task: Task
    mod_revision: int
    kv: KeyValue | None = None


def new_task_id() -> str:
    """A short unique task id (``task-`` + 12 hex digits)."""
    return f"task-{secrets.token_hex(6)}"


def new_op_id() -> str:
    """A fresh operation id for one task write (see :attr:`lpmosd.documents.Task.ops`)."""
    return secrets.token_hex(8)


def load_task(kv: KeyValue, idc: str, sn: str) -> Task:
    """The task document stored in ``kv``.

    A document that is not a valid task (written by hand with etcdctl, by an old tool) is a
    ConflictError naming ``sn``: the request is fine, the stored state is not, and the
    operator can delete it. It must never pass for bad input (400) or crash a role.
    """
    try:
        return Task.from_json(kv.value)
    except ValidationError as exc:
        raise ConflictError(
            f"the stored task of {sn} in {idc} is not a valid task document "
            f"({exc.message}); delete it and create the task again",
            field="sn",
        ) from None


def server_entry_ops(idc: str, sn: str, old: Task, new: Task) -> tuple[Op, ...]:
    """The server entry's put when ``new`` changes what it mirrors (status, MAC, task id);
    none otherwise: most writes (progress, logs) leave it as it is, and rewriting it on
    each of them was a tenth of the bytes an install wrote. Its ``updated_at`` is the
    time of the last such change."""
    if (old.status, old.mac, old.task_id) == (new.status, new.mac, new.task_id):
        return ()
    return (put(schema.server_key(idc, sn), ServerEntry.for_task(new).to_json()),)


def task_write(
    idc: str, sn: str, old: Task, new: Task
) -> tuple[Task, tuple[Op, ...], tuple[Op, ...]]:
    """What writing ``new`` over the stored ``old`` takes besides the document's own put:
    the stored document (logs moved to a chunk), the ops to put before it in the same Txn
    (the log chunk and the cap's deletes: a watcher has the chunk when the document that
    lists it arrives) and the ops to put after it (the server entry)."""
    doc, log_ops = tasklogs.split(idc, sn, old, new)
    return doc, log_ops, server_entry_ops(idc, sn, old, doc)


def lease_value(lease_id: int) -> str:
    """The value of a lease key, as the guide writes it: ``lease-<id>``."""
    return f"lease-{lease_id}"


def parse_lease_value(value: bytes) -> int | None:
    """The lease id in a lease key's value, or None when malformed."""
    text = value.decode(errors="replace")
    if not text.startswith("lease-"):
        return None
    try:
        return int(text[len("lease-") :])
    except ValueError:
        return None


def _bad_doc(kv: KeyValue, exc: ValidationError) -> dict[str, object]:
    return {"key": kv.key.decode(errors="replace"), "error": exc.message, "field": exc.field}


def hardware_summary(meta: MachineMeta) -> str:
    """One log line about the reported hardware, like the guide's."""
    gib = meta.memory_bytes // (1 << 30)
    return f"Hardware: {meta.cpu_cores} cores, {gib}GB RAM, {len(meta.disks)} disks"


def with_hardware_step(task: Task, meta: MachineMeta, *, now: datetime) -> Task:
    """Record the agent's hardware report: step ``hardware_collect`` at 100 %.

    Unlike install progress this does not move the task to installing: an agent registers
    before an operator approves, so the operator can check the hardware first.
    """
    entry = documents.ProgressStep(HARDWARE_STEP, 100, now, "Hardware collection complete")
    rest = tuple(p for p in task.progress if p.step != HARDWARE_STEP)
    task = replace(task, progress=(entry, *rest), updated_at=now)
    return lifecycle.append_logs(task, [hardware_summary(meta)], now=now)


class Store:
    """The provisioning operations over one etcd client.

    With a ``fence`` every write also requires that leadership term (a compare on the
    role's election key, in the same Txn): a standby, or a leader that lost its lease while
    paused, writes nothing and gets :class:`~lpmosd.errors.NotLeaderError`. Reads are not
    fenced.
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        clock: Callable[[], datetime] = timestamps.utcnow,
        fence: Fence | None = None,
    ):
        self.client = client
        self.clock = clock
        self.fence = fence

    def fenced(self, fence: Fence) -> Store:
        """The same operations, every write guarded by ``fence``."""
        return Store(self.client, clock=self.clock, fence=fence)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """One transaction, fenced like every write of this store."""
        return await self.client.txn(compare, success, failure, fence=self.fence)

    # --- reads -----------------------------------------------------------------------

    async def get_task(self, idc: str, sn: str) -> StoredTask:
        """The task of ``sn`` in ``idc`` with its log lines; NotFoundError when there is
        none. One Range of the machine's keys: the document and its chunks agree."""
        task_key = schema.task_key(idc, sn).encode()
        result = await self.client.get_prefix(schema.machine_prefix(idc, sn))
        kv = next((kv for kv in result.kvs if kv.key == task_key), None)
        if kv is None:
            raise NotFoundError(f"no task for server {sn} in {idc}", field="sn")
        task = tasklogs.assemble(load_task(kv, idc, sn), tasklogs.chunks_of(result.kvs))
        return StoredTask(task, kv.mod_revision, kv)

    async def with_logs(self, stored: StoredTask, idc: str, sn: str) -> Task:
        """A task a write returned, with its log lines read back (for answers that show
        the whole task; the lines are as of the read, at or after the write)."""
        if not stored.task.log_chunks:
            return stored.task
        result = await self.client.get_prefix(schema.logs_prefix(idc, sn))
        return tasklogs.assemble(stored.task, tasklogs.chunks_of(result.kvs))

    async def get_meta(self, idc: str, sn: str) -> MachineMeta | None:
        """Hardware facts of ``sn`` when its agent has reported them."""
        kv = await self.client.get(schema.meta_key(idc, sn))
        return MachineMeta.from_json(kv.value) if kv else None

    async def get_lease_id(self, idc: str, sn: str) -> int | None:
        """The lease id of the live agent of ``sn``, or None when it is offline."""
        kv = await self.client.get(schema.lease_key(idc, sn))
        return parse_lease_value(kv.value) if kv else None

    async def get_enrolment_kv(self, idc: str, sn: str) -> KeyValue | None:
        """The stored enrolment record of ``sn`` (see :class:`~lpmosd.credentials.Enrolment`)."""
        return await self.client.get(schema.enrolment_key(idc, sn))

    async def get_agent_token_kv(self, idc: str, sn: str) -> KeyValue | None:
        """The stored agent token of ``sn`` (see :class:`~lpmosd.credentials.AgentToken`)."""
        return await self.client.get(schema.agent_token_key(idc, sn))

    async def list_tasks(
        self, *, idc: str | None = None, status: TaskStatus | None = None
    ) -> list[Task]:
        """Every task (of one IDC, or of all), optionally of one status, sorted by key.

        Documents that are not valid tasks are logged and left out: one bad key must not
        take the whole listing down.
        """
        prefix = schema.machines_prefix(idc) if idc else schema.ROOT
        result = await self.client.get_prefix(prefix)
        tasks: list[Task] = []
        chunks: dict[tuple[str, str], list[KeyValue]] = {}
        for kv in result.kvs:
            parsed = schema.parse_key(kv.key)
            if parsed is not None and parsed.kind == "logs":
                chunks.setdefault((parsed.idc, parsed.sn), []).append(kv)
        for kv in result.kvs:
            parsed = schema.parse_key(kv.key.decode(errors="replace"))
            if parsed is None or parsed.kind != "task":
                continue
            try:
                task = Task.from_json(kv.value)
            except ValidationError as exc:
                log.warning("invalid task document skipped", extra=_bad_doc(kv, exc))
                continue
            if status is None or task.status is status:
                mine = chunks.get((parsed.idc, parsed.sn), [])
                tasks.append(tasklogs.assemble(task, tasklogs.chunks_of(mine)))
        return tasks

    async def list_task_page(
        self,
        *,
        idc: str | None,
        status: TaskStatus | None,
        limit: int,
        continue_token: str | None,
    ) -> task_pages.TaskPage:
        """One page of :meth:`list_tasks`, consistent across pages (:mod:`lpmosd.task_pages`)."""
        return await task_pages.read_task_page(
            self.client, idc=idc, status=status, limit=limit, continue_token=continue_token
        )

    async def list_servers(self, idc: str) -> list[ServerEntry]:
        """The IDC's server directory (invalid entries are logged and left out)."""
        result = await self.client.get_prefix(schema.servers_prefix(idc))
        servers: list[ServerEntry] = []
        for kv in result.kvs:
            try:
                servers.append(ServerEntry.from_json(kv.value))
            except ValidationError as exc:
                log.warning("invalid server entry skipped", extra=_bad_doc(kv, exc))
        return servers

    # --- writes ------------------------------------------------------------------------

    async def create_task(
        self, req: CreateTaskRequest, *, actor: str, enrolment: Enrolment | None = None
    ) -> Task:
        """Create the server entry and the task in one Txn guarded on their absence.

        A terminal task of the same server may be replaced (re-provisioning); a live one
        makes this a ConflictError. ``enrolment`` (see :meth:`create_enrolled_task`) is
        written in the same Txn; its ``task_id`` is set here.
        """
        server_key = schema.server_key(req.idc, req.sn)
        task_key = schema.task_key(req.idc, req.sn)
        enrolment_key = schema.enrolment_key(req.idc, req.sn)
        now = self.clock()
        task = lifecycle.new_task(req, task_id=new_task_id(), now=now, actor=actor)
        ops: list[Op] = [
            put(server_key, ServerEntry.for_task(task).to_json()),
            put(task_key, task.to_json()),
        ]
        if enrolment is not None:
            enrolment = replace(enrolment, task_id=task.task_id, mac=task.mac)
            ops.append(put(enrolment_key, enrolment.to_json()))
        r = await self.txn([Compare.absent(task_key), Compare.absent(server_key)], ops, [])
        if r.succeeded:
            return task
        old = await self.client.get(task_key)
        if old is not None:
            current = load_task(old, req.idc, req.sn)
            if current.status not in TERMINAL:
                raise ConflictError(
                    f"server {req.sn} in {req.idc} already has a {current.status} task "
                    f"({current.task_id})",
                    field="sn",
                )
            guard = Compare.mod_revision(task_key, "==", old.mod_revision)
        else:
            guard = Compare.absent(task_key)
        # Replace a finished task (or a stray server entry without a task): clear the
        # machine's old meta, lease and credentials along with it, all in one Txn. Key by
        # key: etcd refuses a Txn whose delete range overlaps one of its puts (the task key).
        clear = [
            delete(schema.meta_key(req.idc, req.sn)),
            delete(schema.lease_key(req.idc, req.sn)),
            delete(schema.agent_token_key(req.idc, req.sn)),
            delete(schema.first_boot_key(req.idc, req.sn)),
            delete(schema.logs_prefix(req.idc, req.sn), prefix=True),
        ]
        if enrolment is None:
            clear.append(delete(enrolment_key))
        r = await self.txn([guard], [*clear, *ops], [])
        if not r.succeeded:
            raise ConflictError(f"server {req.sn} in {req.idc} changed concurrently", field="sn")
        return task

    async def update_task(
        self,
        idc: str,
        sn: str,
        fn: TaskFn,
        *,
        current: KeyValue | None = None,
        also: Callable[[Task], Sequence[Op]] | None = None,
        guards: Sequence[Compare] = (),
        op_id: str | None = None,
    ) -> StoredTask:
        """Apply ``fn`` to the task in a CAS loop; in the same Txn the server entry follows
        (when its status changes) and the lines ``fn`` added go to a log chunk
        (:func:`task_write`). The task returned is the stored document: its ``logs`` hold
        no chunk lines (:meth:`with_logs` reads them).

        ``current`` is a cached KeyValue of the task (saves a read when fresh). ``also``
        adds ops for the same Txn; ``guards`` add compares (when one fails and the task
        itself is unchanged, ConflictError).

        The write carries ``op_id`` (a fresh one by default) in the document: when it is
        found there already — this write went through but its answer was lost, possibly
        on an earlier request that a client repeats with the same id — ``fn`` is not
        applied again and the task is returned as it is.
        """
        task_key = schema.task_key(idc, sn)
        result_task: list[Task] = []
        op = op_id or new_op_id()

        def step(kv: KeyValue | None) -> Write | None:
            if kv is None:
                raise NotFoundError(f"no task for server {sn} in {idc}", field="sn")
            old = load_task(kv, idc, sn)
            if op in old.ops:
                result_task[:] = [old]
                return None  # already applied
            new = fn(old)
            result_task[:] = [new]
            if new is old:
                return None  # nothing to change: write nothing
            new = new.with_op(op)
            doc, before, after = task_write(idc, sn, old, new)
            result_task[:] = [doc]
            extra = list(also(doc)) if also else []
            return Write(doc.to_json(), (*after, *extra), guards, before)

        try:
            r = await self.client.atomic_update(task_key, step, current=current, fence=self.fence)
        except InputError:
            if current is None:
                raise
            # ``current`` came from a watch cache that may lag behind etcd (the control
            # plane approved a moment ago): a refusal must be decided on fresh data, so
            # read the key and try once more.
            r = await self.client.atomic_update(task_key, step, fence=self.fence)
        if r.guard_failed:
            raise ConflictError(f"server {sn} in {idc} changed concurrently", field="sn")
        return StoredTask(result_task[0], r.revision, r.kv)

    async def approve(self, idc: str, sn: str, *, approved_by: str, notes: str = "") -> Task:
        """pending → approved, recording who approved and why."""
        now = self.clock()
        stored = await self.update_task(
            idc, sn, lambda t: lifecycle.approve(t, approved_by=approved_by, notes=notes, now=now)
        )
        return await self.with_logs(stored, idc, sn)

    async def cancel(self, idc: str, sn: str, *, actor: str, reason: str = "") -> Task:
        """Cancel a live task. Its lease key goes in the same Txn: the agent is done."""
        now = self.clock()
        stored = await self.update_task(
            idc,
            sn,
            lambda t: lifecycle.cancel(t, now=now, actor=actor, reason=reason),
            also=lambda t: (delete(schema.lease_key(idc, sn)),),
        )
        return await self.with_logs(stored, idc, sn)

    async def retry(
        self, idc: str, sn: str, *, actor: str, enrolment: Enrolment | None = None
    ) -> Task:
        """failed → approved, resuming from the step that failed.

        ``enrolment`` (see :meth:`retry_enrolled`) replaces the task's enrolment secret in
        the same Txn.
        """
        now = self.clock()

        def fn(t: Task) -> Task:
            # The state machine allows pending → approved too (that is approve, which
            # records who approved): retry is for failed tasks only.
            if t.status is not TaskStatus.FAILED:
                raise ConflictError(
                    f"cannot retry a task in status {t.status}; only a failed task can be retried",
                    field="status",
                )
            return lifecycle.retry(t, now=now, actor=actor)

        def also(t: Task) -> Sequence[Op]:
            # The failed attempt's agent token must not come back to life with the task:
            # the retried install enrols afresh.
            ops: list[Op] = [
                delete(schema.agent_token_key(idc, sn)),
                delete(schema.first_boot_key(idc, sn)),
            ]
            if enrolment is not None:
                fresh = replace(enrolment, task_id=t.task_id, mac=t.mac)
                ops.append(put(schema.enrolment_key(idc, sn), fresh.to_json()))
            return ops

        stored = await self.update_task(idc, sn, fn, also=also)
        return await self.with_logs(stored, idc, sn)

    # --- first boot of the installed system ----------------------------------------------

    async def issue_first_boot(self, idc: str, sn: str, *, task: Task) -> str:
        """A one-time credential for the first boot of ``task``'s installed system (the
        agent writes it onto the disk); replaces an earlier one. Returns the credential."""
        record, credential = FirstBootCredential.issue(task_id=task.task_id, now=self.clock())
        await self.client.put(schema.first_boot_key(idc, sn), record.to_json())
        return credential

    async def record_first_boot(
        self, idc: str, sn: str, credential: str, *, hostname: str = ""
    ) -> StoredTask:
        """The installed system booted: check its credential, set ``first_boot_at`` and
        delete the credential in one Txn (guarded on it, so it works once)."""
        key = schema.first_boot_key(idc, sn)
        kv = await self.client.get(key)
        record = None
        if kv is not None:
            try:
                record = FirstBootCredential.from_json(kv.value)
            except ValidationError:
                record = None
        if kv is None or record is None or not record.matches(credential):
            raise AuthenticationError(
                "unknown or already used first-boot credential", field="authorization"
            )
        now = self.clock()

        def fn(t: Task) -> Task:
            if t.task_id != record.task_id:
                raise AuthenticationError(
                    "the first-boot credential belongs to an earlier task", field="authorization"
                )
            return lifecycle.first_boot(t, now=now, hostname=hostname)

        return await self.update_task(
            idc,
            sn,
            fn,
            also=lambda t: (delete(key),),
            guards=(Compare.mod_revision(key, "==", kv.mod_revision),),
        )

    # --- agent credentials (issued by the control plane) --------------------------------

    async def create_enrolled_task(self, req: CreateTaskRequest, *, actor: str) -> tuple[Task, str]:
        """:meth:`create_task` with a fresh enrolment secret; returns the task and the secret
        (to hand to the operator once, for the machine's boot parameters)."""
        enrolment, secret = Enrolment.issue(task_id="", mac="", actor=actor, now=self.clock())
        task = await self.create_task(req, actor=actor, enrolment=enrolment)
        return task, secret

    async def retry_enrolled(self, idc: str, sn: str, *, actor: str) -> tuple[Task, str]:
        """:meth:`retry` with a fresh enrolment secret (the old one stops working)."""
        enrolment, secret = Enrolment.issue(task_id="", mac="", actor=actor, now=self.clock())
        task = await self.retry(idc, sn, actor=actor, enrolment=enrolment)
        return task, secret

    async def reissue_enrolment(self, idc: str, sn: str, *, actor: str) -> tuple[Task, str]:
        """A new enrolment secret for a live task (lost secret, regenerated PXE config,
        tasks created before enrolment existed). The old secret stops working; an agent
        that already enrolled keeps its token."""
        stored = await self.get_task(idc, sn)
        task = stored.task
        if task.status not in LIVE:
            raise ConflictError(
                f"task of {sn} is {task.status}; enrolment secrets are issued for live tasks "
                "only (retry a failed task instead)",
                field="status",
            )
        enrolment, secret = Enrolment.issue(
            task_id=task.task_id, mac=task.mac, actor=actor, now=self.clock()
        )
        r = await self.txn(
            [Compare.mod_revision(schema.task_key(idc, sn), "==", stored.mod_revision)],
            [put(schema.enrolment_key(idc, sn), enrolment.to_json())],
            [],
        )
        if not r.succeeded:
            raise ConflictError(f"task of {sn} changed concurrently; try again", field="sn")
        return task, secret

    async def mint_boot_enrolment(
        self, idc: str, sn: str, *, task_kv: KeyValue, lease_kv: KeyValue | None, actor: str
    ) -> str:
        """A fresh enrolment secret for the machine booting the installer of ``sn``'s task
        (the credential initrd); the previous secret stops working. Guarded on the task and
        its lease key being as the caller saw them (no agent enrolled meanwhile)."""
        task = load_task(task_kv, idc, sn)
        enrolment, secret = Enrolment.issue(
            task_id=task.task_id, mac=task.mac, actor=actor, now=self.clock()
        )
        lease_key = schema.lease_key(idc, sn)
        lease_guard = (
            Compare.absent(lease_key)
            if lease_kv is None
            else Compare.mod_revision(lease_key, "==", lease_kv.mod_revision)
        )
        task_guard = Compare.mod_revision(schema.task_key(idc, sn), "==", task_kv.mod_revision)
        r = await self.txn(
            [task_guard, lease_guard],
            [put(schema.enrolment_key(idc, sn), enrolment.to_json())],
            [],
        )
        if not r.succeeded:
            raise ConflictError(f"task of {sn} changed concurrently; try again", field="sn")
        return secret

    async def publish_os_types(self, idc: str, published: OsTypes) -> None:
        """Write the OS types the IDC's regional can install (see :mod:`lpmosd.boot.ostypes`)."""
        await self.txn([], [put(schema.os_types_key(idc), published.to_json())])

    async def get_os_types(self, idc: str) -> OsTypes | None:
        """The OS types the IDC's regional published (None: never, or unreadable)."""
        kv = await self.client.get(schema.os_types_key(idc))
        if kv is None:
            return None
        try:
            return OsTypes.from_json(kv.value)
        except ValidationError as exc:
            log.warning("invalid os-types document ignored", extra=_bad_doc(kv, exc))
            return None

    async def fail(
        self,
        idc: str,
        sn: str,
        reason: str,
        *,
        actor: str,
        only_if: frozenset[TaskStatus] = ACTIVE_AGENT,
        guards: Sequence[Compare] = (),
        current: KeyValue | None = None,
    ) -> StoredTask | None:
        """Fail the task if its status is in ``only_if``; None when it was not (left alone)."""
        now = self.clock()
        # The update function may run several times (CAS retries, a re-read after a stale
        # hint): only its last decision counts, so each run overwrites it.
        skipped = [False]

        def fn(t: Task) -> Task:
            skipped[0] = t.status not in only_if
            if skipped[0]:
                return t
            return lifecycle.fail(t, reason, now=now, actor=actor)

        try:
            stored = await self.update_task(idc, sn, fn, guards=guards, current=current)
        except (NotFoundError, ConflictError):
            return None
        return None if skipped[0] else stored

    async def delete_task(self, idc: str, sn: str) -> None:
        """Delete a finished task with its server entry, meta and lease key (one Txn).

        A stored document that is not a valid task can be deleted too: that is how an
        operator clears it.
        """
        kv = await self.client.get(schema.task_key(idc, sn))
        if kv is None:
            raise NotFoundError(f"no task for server {sn} in {idc}", field="sn")
        try:
            status: TaskStatus | None = Task.from_json(kv.value).status
        except ValidationError:
            status = None
        if status is not None and status not in TERMINAL:
            raise ConflictError(
                f"task of {sn} is {status}; only completed, failed or cancelled "
                "tasks can be deleted",
                field="status",
            )
        r = await self.txn(
            [Compare.mod_revision(schema.task_key(idc, sn), "==", kv.mod_revision)],
            [
                delete(schema.server_key(idc, sn)),
                delete(schema.machine_prefix(idc, sn), prefix=True),
            ],
            [],
        )
        if not r.succeeded:
            raise ConflictError(f"task of {sn} changed concurrently; try again", field="sn")

    # --- agent operations (regional) -----------------------------------------------------

    async def bind_lease(self, idc: str, sn: str, lease_id: int, *, task_revision: int) -> bool:
        """Bind ``lease_id`` as the agent lease of ``sn``, unless a lease key is there or
        the task changed since ``task_revision``; True when bound.

        The regional re-establishes the leases of agents it heard while etcd was away
        (they expired meanwhile) without making each agent register again.
        """
        lease_key = schema.lease_key(idc, sn)
        r = await self.txn(
            [
                Compare.absent(lease_key),
                Compare.mod_revision(schema.task_key(idc, sn), "==", task_revision),
            ],
            [put(lease_key, lease_value(lease_id), lease=lease_id)],
            [],
        )
        return r.succeeded

    async def register_agent(
        self,
        idc: str,
        sn: str,
        *,
        mac: str,
        meta: MachineMeta,
        lease_id: int,
        current: KeyValue | None = None,
        token: AgentToken | None = None,
        used_enrolment: tuple[Enrolment, int] | None = None,
    ) -> StoredTask:
        """Record the agent's hardware and bind its lease key, with the task, in one Txn.

        The agent's new ``token`` is stored in the same Txn, and so is ``used_enrolment``
        (the enrolment marked used, with the mod_revision it was checked at), guarded on
        the enrolment being unchanged since: of two registrations racing with one secret,
        only one commits.
        """
        now = self.clock()
        credentials: list[Op] = []
        guards: list[Compare] = []
        if token is not None:
            credentials.append(put(schema.agent_token_key(idc, sn), token.to_json()))
        if used_enrolment is not None:
            enrolment, checked_at = used_enrolment
            enrolment_key = schema.enrolment_key(idc, sn)
            credentials.append(put(enrolment_key, enrolment.to_json()))
            guards.append(Compare.mod_revision(enrolment_key, "==", checked_at))

        def fn(t: Task) -> Task:
            if t.mac != mac:
                raise ConflictError(
                    f"MAC {mac} does not match the task's MAC for {sn}", field="mac"
                )
            if t.status in (TaskStatus.COMPLETED, TaskStatus.CANCELLED):
                raise ConflictError(f"task of {sn} is {t.status}", field="status")
            return with_hardware_step(t, meta, now=now)

        return await self.update_task(
            idc,
            sn,
            fn,
            current=current,
            also=lambda t: (
                put(schema.meta_key(idc, sn), meta.to_json()),
                put(schema.lease_key(idc, sn), lease_value(lease_id), lease=lease_id),
                *credentials,
            ),
            guards=guards,
        )

    async def record_progress(
        self,
        idc: str,
        sn: str,
        *,
        step: str,
        percent: int,
        message: str,
        current: KeyValue | None = None,
        op_id: str | None = None,
        via: TaskUpdater | None = None,
    ) -> StoredTask:
        """One progress report (approved → installing on the first).

        ``via`` writes it (e.g. batched, see :class:`lpmosd.taskwriter.TaskWriter`) instead
        of :meth:`update_task`.
        """
        now = self.clock()

        def fn(t: Task) -> Task:
            return lifecycle.record_progress(t, step, percent, message, now=now)

        if via is not None:
            return await via.update(idc, sn, fn, current=current, op_id=op_id)
        return await self.update_task(idc, sn, fn, current=current, op_id=op_id)

    async def append_logs(
        self,
        idc: str,
        sn: str,
        lines: Sequence[str],
        *,
        level: api_requests.LogLevel = "INFO",
        current: KeyValue | None = None,
        op_id: str | None = None,
    ) -> StoredTask:
        """Append agent log lines to the task (capped)."""
        now = self.clock()

        def fn(t: Task) -> Task:
            if t.status in TERMINAL and t.status is not TaskStatus.FAILED:
                raise ConflictError(f"task of {sn} is {t.status}", field="status")
            return lifecycle.append_logs(t, lines, level=level, now=now)

        return await self.update_task(idc, sn, fn, current=current, op_id=op_id)

    async def finish(
        self,
        idc: str,
        sn: str,
        *,
        outcome: TaskStatus,
        reason: str = "",
        current: KeyValue | None = None,
        op_id: str | None = None,
    ) -> StoredTask:
        """The agent reports completed or failed; its lease key goes in the same Txn."""
        now = self.clock()

        def fn(t: Task) -> Task:
            if outcome is TaskStatus.COMPLETED:
                return lifecycle.complete(t, now=now)
            return lifecycle.fail(t, reason, now=now, actor="agent")

        return await self.update_task(
            idc,
            sn,
            fn,
            current=current,
            also=lambda t: (delete(schema.lease_key(idc, sn)),),
            op_id=op_id,
        )
