"""Live dashboard updates: one hub, fed by the control plane's view, fanned out as SSE.

The control plane already keeps one watched view of ``/os/``. The hub listens to it and
turns every change of a task, meta or lease key into one event, encoded once and handed to
every connected browser through a small bounded queue. No browser causes an etcd request.

Event ids are ``"<etcd revision>-<n>"`` (``n`` counts events of the same revision), so they
order events across hub restarts and even across control-plane processes. A short ring of
recent events lets a browser that reconnects with ``Last-Event-ID`` (or the page's
``?since=``) resume exactly where it stopped; a browser further behind than the ring, or
one that connected before the hub first synced, gets a ``reset`` event and reloads its
snapshot. A browser too slow to drain its queue is disconnected; its EventSource
reconnects and resumes from the ring, so slowness never costs a status change.

The tasks table is paged (tens of thousands of machines): its browser subscribes to the
key range of the rows it shows, so it gets only their changes, plus a ``counts`` event (no
id: it is state, not history) at most once a second while the per-status counts change.

Log lines travel as deltas: each task event carries only the lines added since the
previous event of that task, with their absolute index (``logs_dropped`` + position), so a
resumed page appends exactly the missing lines.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Final

import trio

from lpmosd import schema, tasklogs
from lpmosd.documents import MachineMeta, ProgressStep, Task, TaskStatus
from lpmosd.errors import LpmosdError, UnavailableError
from lpmosd.etcd import KeyValue
from lpmosd.timestamps import format_ts
from lpmosd.view import Change, PrefixView

log = logging.getLogger("lpmosd.dashboard")

#: Keys decoded between two yields to the scheduler while a view is loaded.
LOAD_SLICE: Final = 256

#: Events kept for resuming browsers (a few minutes of a busy provisioning day).
RING_SIZE: Final = 2048
#: Frames queued per browser before it counts as too slow and is disconnected.
QUEUE_SIZE: Final = 256
#: Concurrent event streams; more are refused (503) instead of exhausting memory.
MAX_SUBSCRIBERS: Final = 1000

EventId = tuple[int, int]
_ZERO: Final[EventId] = (0, 0)


def format_event_id(eid: EventId) -> str:
    """``(revision, n)`` as the SSE id text ``"revision-n"``."""
    return f"{eid[0]}-{eid[1]}"


def parse_event_id(text: str | None) -> EventId | None:
    """Parse an SSE id (``"rev-n"`` or a bare revision); None when absent or malformed."""
    if not text:
        return None
    rev, _, seq = text.strip().partition("-")
    if not (rev.isdigit() and (seq.isdigit() or not seq)) or len(text) > 40:
        return None
    return int(rev), int(seq or 0)


def machine_id(idc: str, sn: str) -> str:
    """The hub's key of a machine: ``"idc/sn"`` (both validated names, so unambiguous)."""
    return f"{idc}/{sn}"


def current_step(progress: Iterable[ProgressStep]) -> ProgressStep | None:
    """The step to show in the table: the latest unfinished one, else the latest one."""
    latest: ProgressStep | None = None
    running: ProgressStep | None = None
    for p in progress:
        if latest is None or p.timestamp >= latest.timestamp:
            latest = p
        if p.percent < 100 and (running is None or p.timestamp >= running.timestamp):
            running = p
    return running or latest


def os_label(task: Task) -> str:
    """``os_type`` plus ``os_version`` unless the type already says it ("Ubuntu 22.04")."""
    if not task.os_version or task.os_version in task.os_type:
        return task.os_type
    return f"{task.os_type} {task.os_version}"


def task_summary(task: Task, *, agent_online: bool, unreachable: bool = False) -> dict[str, Any]:
    """One row of the tasks table."""
    step = current_step(task.progress)
    return {
        "key": machine_id(task.idc, task.sn),
        "idc": task.idc,
        "sn": task.sn,
        "mac": task.mac,
        "os": os_label(task),
        "status": task.status.value,
        "step": step.step if step else "",
        "percent": 100 if task.status is TaskStatus.COMPLETED else (step.percent if step else 0),
        "steps_done": sum(1 for p in task.progress if p.percent >= 100),
        "steps": len(task.progress),
        "updated_at": format_ts(task.updated_at),
        "task_id": task.task_id,
        "agent": agent_online,
        # Silent while its IDC is disrupted: not failed (lpmosd.roles.disruption).
        "unreachable": unreachable,
    }


def task_detail(task: Task) -> dict[str, Any]:
    """Everything the task page shows except the logs (which travel as deltas)."""
    return {
        "task_id": task.task_id,
        "status": task.status.value,
        "error": task.error,
        "resume_from": task.resume_from,
        "first_boot_at": None if task.first_boot_at is None else format_ts(task.first_boot_at),
        "netboot": task.netboot,
        "progress": [p.to_dict() for p in task.progress],
        "history": [c.to_dict() for c in task.status_history],
        "approval": task.approval.to_dict() if task.approval else None,
        "updated_at": format_ts(task.updated_at),
    }


def log_delta(task: Task, prev: Task | None) -> dict[str, Any]:
    """The log lines of ``task`` a page showing ``prev`` lacks, with their absolute index.

    ``replace`` tells the page to start over (a new task for the machine, or lines it
    still shows were dropped in a way appending cannot express).
    """
    end = task.logs_dropped + len(task.logs)
    if prev is not None and prev.task_id == task.task_id:
        prev_end = prev.logs_dropped + len(prev.logs)
        if task.logs_dropped <= prev_end <= end:
            new = task.logs[prev_end - task.logs_dropped :]
            return {"start": prev_end, "lines": list(new), "replace": False, "end": end}
    return {"start": task.logs_dropped, "lines": list(task.logs), "replace": True, "end": end}


def _frame(eid: EventId, kind: str, data: dict[str, Any]) -> str:
    # json.dumps never emits a raw newline, so one data: line carries the whole object.
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {format_event_id(eid)}\nevent: {kind}\ndata: {body}\n\n"


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One published change: its frame for the tasks table and for the machine's page."""

    id: EventId
    machine: str
    #: For subscribers of every machine (None: not shown in the table).
    table_frame: str | None
    #: For subscribers of this one machine.
    detail_frame: str


@dataclass(eq=False)
class _Subscriber:
    machine: str | None
    send: trio.MemorySendChannel[str]
    overflowed: bool = False
    #: A table's rows: machines from ``lo`` to ``hi`` (inclusive; None: unbounded).
    lo: str | None = None
    hi: str | None = None


@dataclass(eq=False)
class MachineState:
    """What the hub knows of one machine (all of it from the view, none from etcd reads)."""

    task: Task | None = None
    task_rev: int = 0
    meta: MachineMeta | None = None
    meta_rev: int = 0
    agent_online: bool = False
    #: The control plane's disruption guard marked the agent unreachable.
    unreachable: bool = False


@dataclass(eq=False)
class Subscription:
    """An open event stream: frames to replay first, then the live queue."""

    backlog: list[str]
    receive: trio.MemoryReceiveChannel[str]


def _assembled(doc: Task, idc: str, sn: str, lookup: Callable[[str], KeyValue | None]) -> Task:
    """``doc`` with the lines of its log chunks from the view. Writers put a chunk before
    the document that lists it (same Txn, earlier event), so the view has it by now."""
    found = (lookup(schema.log_chunk_key(idc, sn, c.seq)) for c in doc.log_chunks)
    return tasklogs.assemble(doc, tasklogs.chunks_of(kv for kv in found if kv is not None))


@dataclass(eq=False)
class LiveHub:
    """The dashboard's event hub (one per control plane)."""

    ring_size: int = RING_SIZE
    queue_size: int = QUEUE_SIZE
    max_subscribers: int = MAX_SUBSCRIBERS
    machines: dict[str, MachineState] = field(default_factory=dict)
    #: Tasks per IDC and status, kept incrementally (the page header and /metrics).
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    #: Bumped whenever ``counts`` changes (event streams send ``counts`` when it moved).
    counts_version: int = 0
    #: Machines that have a task, sorted: the tasks table's pages are slices of it.
    order: list[str] = field(default_factory=list)
    #: Events published so far (a metric).
    published: int = 0
    _ring: deque[LiveEvent] = field(default_factory=deque)
    _subs: set[_Subscriber] = field(default_factory=set)
    _last: EventId = _ZERO
    #: A browser whose last id is below this cannot resume from the ring.
    _floor: EventId = (1 << 62, 0)
    _view: PrefixView | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    _counts_frame: tuple[int, str] | None = None

    # ------------------------------------------------------------------ reading

    @property
    def synced(self) -> bool:
        """True once the hub holds a snapshot of etcd (it keeps it across session restarts)."""
        return self._floor != (1 << 62, 0)

    @property
    def live(self) -> bool:
        """True while a current view feeds the hub (False while the session restarts)."""
        view = self._view
        return view is not None and view.synced.is_set()

    @property
    def last_id(self) -> str:
        """The id of the latest event: a page rendered now subscribes ``since`` it."""
        return format_event_id(self._last)

    @property
    def subscribers(self) -> int:
        """Open event streams."""
        return len(self._subs)

    def tasks(self) -> list[tuple[str, Task, bool]]:
        """``(machine, task, agent_online)`` of every machine with a task, sorted by machine."""
        out: list[tuple[str, Task, bool]] = []
        for m in self.order:
            state = self.machines[m]
            assert state.task is not None
            out.append((m, state.task, state.agent_online))
        return out

    def machine(self, idc: str, sn: str) -> MachineState | None:
        """The state of one machine, if the hub knows it."""
        return self.machines.get(machine_id(idc, sn))

    def counts_dict(self) -> dict[str, dict[str, int]]:
        """``{idc: {status: n}}`` with every status present (zeros included)."""
        return {
            idc: {s.value: c.get(s.value, 0) for s in TaskStatus}
            for idc, c in sorted(self.counts.items())
        }

    def counts_frame(self) -> str:
        """The ``counts`` event as it stands (no id: current state, not a change to replay)."""
        cached = self._counts_frame
        if cached is None or cached[0] != self.counts_version:
            body = json.dumps({"counts": self.counts_dict()}, separators=(",", ":"))
            cached = (self.counts_version, f"event: counts\ndata: {body}\n\n")
            self._counts_frame = cached
        return cached[1]

    # ------------------------------------------------------------------ subscribing

    def check_capacity(self) -> None:
        """Raise :class:`TooManySubscribersError` (503) past :data:`MAX_SUBSCRIBERS`."""
        if len(self._subs) >= self.max_subscribers:
            raise TooManySubscribersError("too many event streams; try again later")

    @contextmanager
    def subscribe(
        self,
        *,
        machine: str | None,
        since: EventId | None,
        lo: str | None = None,
        hi: str | None = None,
    ) -> Iterator[Subscription]:
        """Open an event stream: the table rows of machines ``lo``..``hi`` (inclusive, None
        unbounded), or (``machine``) one machine's page.

        ``since`` is the last event the browser has. The backlog and the live queue are
        taken with no checkpoint in between, so nothing falls in the gap.
        """
        send, receive = trio.open_memory_channel[str](self.queue_size)
        sub = _Subscriber(machine, send, lo=lo, hi=hi)
        backlog: list[str] = []
        if not self.synced:
            # No snapshot yet (etcd unreachable since start): wait; attach() resets us.
            self._subs.add(sub)
        elif since is None or since < self._floor:
            backlog.append(self._reset_frame())
            send.close()  # the page reloads its snapshot; nothing more for this stream
        else:
            for ev in self._ring:
                if ev.id > since:
                    frame = self._frame_for(sub, ev)
                    if frame is not None:
                        backlog.append(frame)
            self._subs.add(sub)
        try:
            yield Subscription(backlog, receive)
        finally:
            self._subs.discard(sub)
            send.close()
            receive.close()

    def _reset_frame(self) -> str:
        return f"id: {self.last_id}\nevent: reset\ndata: {{}}\n\n"

    @staticmethod
    def _frame_for(sub: _Subscriber, ev: LiveEvent) -> str | None:
        if sub.machine is None:
            if (sub.lo is not None and ev.machine < sub.lo) or (
                sub.hi is not None and ev.machine > sub.hi
            ):
                return None  # not on this browser's page of the table
            return ev.table_frame
        return ev.detail_frame if sub.machine == ev.machine else None

    # ------------------------------------------------------------------ feeding

    def attach(self, view: PrefixView) -> None:
        """Follow a (synced) view of ``/os/``; called for each new control-plane session.

        The first view becomes the baseline (open streams get ``reset``). A later view —
        after a lost session — is diffed against what the hub knows, and the differences
        are published like live changes, so browsers miss nothing that happened meanwhile.
        """
        fresh: dict[str, MachineState] = {}
        for key, kv in view.items.items():
            self._load(fresh, key, kv, view.get)
        self._take(view, fresh)

    async def load(self, view: PrefixView) -> None:
        """:meth:`attach`, decoding the view a slice at a time: with tens of thousands of
        tasks one pass takes seconds, which would starve the session's keepalives (the
        lease lost, the session restarted, the view loaded again...)."""
        snapshot = dict(view.items)
        fresh: dict[str, MachineState] = {}
        for i, (key, kv) in enumerate(snapshot.items()):
            self._load(fresh, key, kv, snapshot.get)
            if i % LOAD_SLICE == LOAD_SLICE - 1:
                await trio.lowlevel.checkpoint()
        # The view moved on meanwhile: decode again the machines whose keys changed, then
        # take it all without yielding, so no change falls between the load and the listener.
        current = view.items
        redo = set()
        for key in snapshot.keys() | current.keys():
            if current.get(key) is not snapshot.get(key):
                parsed = schema.parse_key(key)
                if parsed is not None and parsed.kind != "server":
                    redo.add((parsed.idc, parsed.sn))
        for idc, sn in redo:
            fresh.pop(machine_id(idc, sn), None)
            for key in (
                schema.task_key(idc, sn),
                schema.meta_key(idc, sn),
                schema.lease_key(idc, sn),
            ):
                found = current.get(key)
                if found is not None:
                    self._load(fresh, key, found, view.get)
        self._take(view, fresh)

    def _take(self, view: PrefixView, fresh: dict[str, MachineState]) -> None:
        first = not self.synced
        if first:
            self.machines = fresh
            self.counts = {}
            for state in fresh.values():
                if state.task is not None:
                    self._count(state.task, +1)
            self.order = sorted(m for m, state in fresh.items() if state.task is not None)
            self._last = (view.revision, 0)
            self._floor = self._last
            for sub in list(self._subs):
                self._close(sub, self._reset_frame())
        else:
            rev = max(view.revision, self._last[0])
            for machine in sorted(set(self.machines) | set(fresh)):
                new = fresh.get(machine, MachineState())
                self._sync_machine(machine, new, rev)
        self._view = view
        view.listeners.append(self._listener(view))
        self._notify()
        log.info(
            "dashboard hub attached",
            extra={"revision": view.revision, "tasks": len(self.tasks()), "first": first},
        )

    def _listener(self, view: PrefixView) -> Any:
        def on_change(change: Change) -> None:
            if view is self._view:  # a stale view (old session) is ignored
                self.apply(change)

        return on_change

    def _lookup(self, key: str) -> KeyValue | None:
        return self._view.get(key) if self._view is not None else None

    @staticmethod
    def _load(
        into: dict[str, MachineState],
        key: str,
        kv: KeyValue,
        lookup: Callable[[str], KeyValue | None],
    ) -> None:
        parsed = schema.parse_key(key)
        if parsed is None or parsed.kind not in ("task", "meta", "lease"):
            return
        state = into.setdefault(machine_id(parsed.idc, parsed.sn), MachineState())
        if parsed.kind == "lease":
            state.agent_online = True
            return
        try:
            if parsed.kind == "task":
                task = _assembled(Task.from_json(kv.value), parsed.idc, parsed.sn, lookup)
                if not task.idc:  # a guide-shaped document: the key has the IDC
                    task = _with_idc(task, parsed.idc)
                state.task, state.task_rev = task, kv.mod_revision
            else:
                state.meta, state.meta_rev = MachineMeta.from_json(kv.value), kv.mod_revision
        except (LpmosdError, ValueError, TypeError) as exc:
            # One bad document must not stop the dashboard (nor the session calling us).
            log.warning("unreadable document ignored", extra={"key": key, "error": str(exc)})

    def apply(self, change: Change) -> None:
        """Publish one change of the view (task, meta or lease key; others are ignored)."""
        parsed = schema.parse_key(change.key)
        if parsed is None or parsed.kind not in ("task", "meta", "lease"):
            return
        machine = machine_id(parsed.idc, parsed.sn)
        current = self.machines.get(machine, MachineState())
        new = MachineState(current.task, current.task_rev, current.meta, current.meta_rev)
        new.agent_online = current.agent_online
        new.unreachable = current.unreachable
        if change.kv is None:
            if parsed.kind == "task":
                new.task, new.task_rev = None, 0
            elif parsed.kind == "meta":
                new.meta, new.meta_rev = None, 0
            else:
                new.agent_online = False
        else:
            scratch: dict[str, MachineState] = {machine: new}
            self._load(scratch, change.key, change.kv, self._lookup)
        self._sync_machine(machine, new, change.revision)

    def _sync_machine(self, machine: str, new: MachineState, revision: int) -> None:
        """Make the hub's state of ``machine`` equal ``new``, publishing each difference."""
        old = self.machines.get(machine, MachineState())
        if new.task is None and new.meta is None and not new.agent_online:
            self.machines.pop(machine, None)
        else:
            self.machines[machine] = new
        if new.task_rev != old.task_rev:
            if old.task is not None:
                self._count(old.task, -1)
            if (old.task is None) != (new.task is None):
                self._reorder(machine, present=new.task is not None)
            if new.task is not None:
                self._count(new.task, +1)
                self._publish_task(machine, new, old.task, revision)
            elif old.task is not None:
                self._publish_deleted(machine, revision)
        if new.meta_rev != old.meta_rev:
            meta = new.meta.to_dict() if new.meta else None
            eid = self._next_id(revision)
            frame = _frame(eid, "meta", {"key": machine, "meta": meta})
            self._publish(LiveEvent(eid, machine, None, frame))
        if new.agent_online != old.agent_online or new.unreachable != old.unreachable:
            eid = self._next_id(revision)
            data = {"key": machine, "online": new.agent_online, "unreachable": new.unreachable}
            frame = _frame(eid, "agent", data)
            self._publish(LiveEvent(eid, machine, frame, frame))

    def set_unreachable(self, idc: str, sn: str, unreachable: bool) -> None:
        """The disruption guard (un)marked a machine's agent as unreachable."""
        machine = machine_id(idc, sn)
        current = self.machines.get(machine)
        if current is None or current.unreachable == unreachable:
            return
        new = MachineState(current.task, current.task_rev, current.meta, current.meta_rev)
        new.agent_online, new.unreachable = current.agent_online, unreachable
        self._sync_machine(machine, new, self._last[0])

    def _publish_task(self, machine: str, new: MachineState, prev: Task | None, rev: int) -> None:
        assert new.task is not None
        eid = self._next_id(rev)
        summary = task_summary(new.task, agent_online=new.agent_online, unreachable=new.unreachable)
        table = {"key": machine, "summary": summary, "counts": self.counts_dict()}
        detail = {
            "key": machine,
            "summary": summary,
            "detail": task_detail(new.task),
            "logs": log_delta(new.task, prev),
        }
        self._publish(
            LiveEvent(eid, machine, _frame(eid, "task", table), _frame(eid, "task", detail))
        )

    def _publish_deleted(self, machine: str, rev: int) -> None:
        eid = self._next_id(rev)
        frame = _frame(eid, "deleted", {"key": machine, "counts": self.counts_dict()})
        self._publish(LiveEvent(eid, machine, frame, frame))

    def _reorder(self, machine: str, *, present: bool) -> None:
        i = bisect.bisect_left(self.order, machine)
        here = i < len(self.order) and self.order[i] == machine
        if present and not here:
            self.order.insert(i, machine)
        elif here and not present:
            del self.order[i]

    def _count(self, task: Task, delta: int) -> None:
        self.counts_version += 1
        per_idc = self.counts.setdefault(task.idc, Counter())
        per_idc[task.status.value] += delta
        if per_idc[task.status.value] <= 0:
            del per_idc[task.status.value]
        if not per_idc:
            del self.counts[task.idc]

    def _next_id(self, revision: int) -> EventId:
        # Monotonic even if a synthetic change carries an older revision than a live one.
        rev = max(revision, self._last[0])
        self._last = (rev, self._last[1] + 1) if rev == self._last[0] else (rev, 0)
        return self._last

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some publish (read-your-writes for a page
        rendered right after the operator's own change); False on timeout."""
        with trio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return False

    def _publish(self, ev: LiveEvent) -> None:
        self.published += 1
        self._notify()
        if len(self._ring) >= self.ring_size:
            self._floor = self._ring.popleft().id
        self._ring.append(ev)
        for sub in list(self._subs):
            frame = self._frame_for(sub, ev)
            if frame is None:
                continue
            try:
                sub.send.send_nowait(frame)
            except trio.WouldBlock:
                # Too slow: end its stream; the browser resumes from the ring on reconnect.
                sub.overflowed = True
                self._subs.discard(sub)
                sub.send.close()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subs.discard(sub)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _close(self, sub: _Subscriber, last_frame: str) -> None:
        self._subs.discard(sub)
        with suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            sub.send.send_nowait(last_frame)
        sub.send.close()


class TooManySubscribersError(UnavailableError):
    """The hub refuses another event stream (answered with 503)."""


def _with_idc(task: Task, idc: str) -> Task:
    return replace(task, idc=idc)
