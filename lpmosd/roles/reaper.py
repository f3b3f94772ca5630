"""The lease reaper: fail the task of an agent whose lease key vanished.

It follows a :class:`~lpmosd.view.PrefixView` of ``/os/``. When an agent's lease key is
deleted (lease expired, revoked, or lost to a compaction and found by the relist diff)
while its task is approved or installing, the task is failed ("agent heartbeat lost"),
guarded on the lease key still being absent so an agent that re-registered meanwhile is
left alone.

Vanished keys wait in an unbounded, de-duplicated queue (one entry per machine): a rack
losing power at once must not overflow a fixed buffer, since a reap dropped here never
comes back (the delete event is consumed). At start the view is scanned for the same
condition in every state with an agent, as the live path sees it: the delete may have
happened while no reaper ran.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from lpmosd import hooks, schema
from lpmosd._trio_util import open_nursery
from lpmosd.documents import Task, TaskStatus
from lpmosd.errors import EtcdError, InputError, NotLeaderError
from lpmosd.etcd import Compare
from lpmosd.lifecycle import ACTIVE_AGENT
from lpmosd.store import Store, StoredTask
from lpmosd.view import Change, PrefixView

log = logging.getLogger("lpmosd.reaper")

HEARTBEAT_LOST = "agent heartbeat lost"
#: Documents decoded between two yields to the scheduler while scanning a view.
SCAN_SLICE: Final = 256
#: Reaper tasks sharing the queue of vanished lease keys.
REAPER_WORKERS = 16


async def orphans(view: PrefixView) -> list[tuple[str, str]]:
    """Machines whose task had an agent and has no lease key: ``(idc, sn)``, as the view
    stood when called (it is read a slice at a time, yielding in between: tens of thousands
    of documents take seconds to decode, which must not starve the session's keepalives).

    An installing task always had one. An approved one had one if an agent token was
    issued for this attempt (registration writes it with the lease key; a retry deletes
    it): without one the machine simply has not booted yet.
    """
    snapshot = dict(view.items)
    found = []
    for i, (key, kv) in enumerate(snapshot.items()):
        if i % SCAN_SLICE == SCAN_SLICE - 1:
            await trio.lowlevel.checkpoint()
        parsed = schema.parse_key(key)
        if parsed is None or parsed.kind != "task":
            continue
        idc, sn = parsed.idc, parsed.sn
        if snapshot.get(schema.lease_key(idc, sn)) is not None:
            continue
        try:
            status = Task.from_json(kv.value).status
        except Exception:
            continue  # an unreadable document is reported by whoever reads it
        if status is TaskStatus.INSTALLING or (
            status in ACTIVE_AGENT and snapshot.get(schema.agent_token_key(idc, sn)) is not None
        ):
            found.append((idc, sn))
    return found


class Reaper:
    """Fails tasks whose agent's lease key vanished; run :meth:`run` with a synced view.

    The control plane runs it while it leads, with a store fenced on its leadership: a
    former leader that wakes up fails nothing.
    """

    def __init__(self, store: Store, *, workers: int = REAPER_WORKERS) -> None:
        self.store = store
        self.workers = workers
        self.view: PrefixView | None = None
        #: Tasks failed by the reaper.
        self.reaped = 0
        #: Vanished lease keys looked at (live, relisted or found by the start-up scan).
        self.lease_losses = 0
        self._queue: dict[tuple[str, str], str] = {}  # insertion order = arrival order
        self._lot = trio.lowlevel.ParkingLot()

    # --- what to reap ----------------------------------------------------------------------

    def enqueue(self, idc: str, sn: str, why: str) -> None:
        """Queue one machine (once: a second loss before the first is handled is the same)."""
        if (idc, sn) not in self._queue:
            self._queue[(idc, sn)] = why
            self._lot.unpark()

    def on_change(self, change: Change) -> None:
        """View listener: a deleted lease key queues its machine."""
        parsed = schema.parse_key(change.key)
        if parsed is None or parsed.kind != "lease" or change.kv is not None:
            return
        self.enqueue(parsed.idc, parsed.sn, "deleted")

    async def scan(self, view: PrefixView) -> int:
        """Queue every task that had an agent and has no lease key; how many."""
        found = await orphans(view)
        for idc, sn in found:
            self.enqueue(idc, sn, "absent at start")
        return len(found)

    # --- the workers -----------------------------------------------------------------------

    async def run(
        self,
        view: PrefixView,
        *,
        follow: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow ``view`` (already synced) and reap until cancelled. With ``follow``
        false it reaps only what is :meth:`enqueue`d (the disruption guard decides)."""
        self.view = view
        # Listen, then scan, with no checkpoint between the two: a delete the view applies
        # from here on reaches the listener, any earlier one shows in the snapshot scanned.
        if follow:
            view.listeners.append(self.on_change)
            await self.scan(view)
        try:
            async with open_nursery() as nursery:
                # Several workers: when many agents die at once (a rack loses power) their
                # tasks are failed in parallel, not one Txn after another.
                for _ in range(self.workers):
                    nursery.start_soon(self._work)
                task_status.started()
        finally:
            if follow:
                view.listeners.remove(self.on_change)
            self.view = None

    async def _work(self) -> None:
        while True:
            while not self._queue:
                await self._lot.park()
            (idc, sn), why = next(iter(self._queue.items()))
            del self._queue[(idc, sn)]
            self.lease_losses += 1
            if not self._may_need_reaping(idc, sn):
                continue
            stored = await self._reap_one(idc, sn)
            if stored is not None:
                self.reaped += 1
                view = self.view
                if view is not None and stored.kv is not None:
                    view.observe(stored.kv)
                log.warning(
                    "agent offline: task failed", extra={"idc": idc, "sn": sn, "lease_key": why}
                )

    def _may_need_reaping(self, idc: str, sn: str) -> bool:
        """False when the view shows no task: it was deleted, and its lease key with it
        (the view has seen every write up to the delete it reported, so this is sure)."""
        view = self.view
        return view is None or view.get(schema.task_key(idc, sn)) is not None

    async def _reap_one(self, idc: str, sn: str) -> StoredTask | None:
        """Fail one task whose agent's lease key vanished; None when it is left alone.

        Never gives up on etcd errors (retried with backoff: a reap lost here would not
        come back, as the delete event is consumed) and never dies of a bad document.
        """
        lease_key = schema.lease_key(idc, sn)
        backoff = 0.05
        while True:
            view = self.view
            current = view.get(schema.task_key(idc, sn)) if view else None
            try:
                await hooks.reach("reaper.before-fail")
                return await self.store.fail(
                    idc,
                    sn,
                    HEARTBEAT_LOST,
                    actor="reaper",
                    only_if=ACTIVE_AGENT,
                    guards=[Compare.absent(lease_key)],
                    current=current,
                )
            except NotLeaderError as exc:
                # Leadership lost: the next leader reaps (its start-up scan sees the task).
                log.warning("reap refused", extra={"idc": idc, "sn": sn, "error": str(exc)})
                return None
            except InputError as exc:
                log.error(
                    "cannot reap: invalid task document",
                    extra={"idc": idc, "sn": sn, "error": exc.message},
                )
                return None
            except EtcdError as exc:
                log.warning(
                    "reap failed; retrying", extra={"idc": idc, "sn": sn, "error": str(exc)}
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
