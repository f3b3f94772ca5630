"""Batched, coalesced task writes: the regional's hot path for agents' progress reports.

A regional serving thousands of installing machines gets a steady stream of small
updates, each to a different task document. Done one by one, each is one etcd Txn: one
gRPC round trip and about half a millisecond of client CPU, and hundreds of them in
flight at once slow the client down further. :class:`TaskWriter` instead queues the
updates and writes them in few Txns:

* **coalescing**: updates queued for the same task are applied in order to one copy of the
  document, and written once;
* **batching**: the updates of up to 64 different tasks (128 ops: the task document and
  its server entry each, etcd's ``--max-txn-ops`` default; at most 1 MiB of values) go in
  one Txn, guarded by one ``mod_revision`` compare per task, so each task keeps exactly the
  compare-and-swap semantics of :meth:`lpmosd.store.Store.update_task`;
* **no read before the write**: the revision to compare against is the one the caller's
  watch cache holds (``current``) or the one our own last write produced, whichever is
  newer.

A batch whose compares do not all hold changes nothing; its failure branch reads every
task of the batch, so the stale ones are refreshed from that answer and requeued (bounded
attempts, as ``atomic_update``), while the tasks whose compares held are sent again at
once, not charged an attempt: one contended task never holds back the rest. An update
function that refuses (an :class:`~lpmosd.errors.InputError`) is re-decided on fresh data through
:meth:`Store.update_task`, since a watch cache may lag behind an operator's change. A few
Txns are kept in flight at once; a task is never in two of them.

Parsed documents are cached by ``(key, mod_revision)`` (:meth:`TaskWriter.task_of`), so a
task is parsed once per revision however many requests look at it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lpmosd import hooks, metrics, schema
from lpmosd.documents import Task
from lpmosd.errors import ContentionError, EtcdUnavailableError, InputError, NotFoundError
from lpmosd.etcd import Compare, KeyValue, Op, RangeResult, get, put
from lpmosd.etcd.txn import MAX_TXN_OPS
from lpmosd.store import Store, StoredTask, new_op_id, task_write

log = logging.getLogger("lpmosd.taskwriter")

TaskFn = Callable[[Task], Task]

#: Parsed documents kept; beyond this the cache starts over (it only saves parsing).
_PARSED_MAX = 100_000


@dataclass(eq=False, slots=True)
class _Pending:
    """One queued update and, once written, its outcome."""

    idc: str
    sn: str
    fn: TaskFn
    #: Recorded in the document with the change (see :attr:`lpmosd.documents.Task.ops`).
    op_id: str = field(default_factory=new_op_id)
    done: trio.Event = field(default_factory=trio.Event)
    result: StoredTask | None = None
    error: BaseException | None = None
    attempts: int = 0

    def finish(self, result: StoredTask | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass(slots=True)
class _Write:
    """What one batch writes for one task."""

    key: str
    old: KeyValue
    value: bytes
    applied: list[tuple[_Pending, Task]]
    ops: tuple[Op, ...]
    #: The stored document ``value`` encodes (log lines moved to a chunk).
    doc: Task


def _within_txn_limit(writes: list[_Write]) -> list[list[_Write]]:
    """``writes`` in groups whose ops fit one Txn: a write that drops log chunks deletes
    their keys too, so tasks alone do not bound a batch's ops."""
    groups: list[list[_Write]] = [[]]
    ops = 0
    for w in writes:
        if groups[-1] and ops + len(w.ops) > MAX_TXN_OPS:
            groups.append([])
            ops = 0
        groups[-1].append(w)
        ops += len(w.ops)
    return groups if groups[0] else []


class TaskWriter:
    """Coalesces and batches task-document updates of many machines into few Txns.

    Run :meth:`run` in a nursery; then call :meth:`update` from any task (or pass the
    writer as ``via`` to :meth:`Store.record_progress`). Results are those of
    :meth:`Store.update_task`.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_tasks: int = MAX_TXN_OPS // 2,
        max_bytes: int = 1 << 20,
        max_inflight: int = 4,
        max_attempts: int = 20,
    ) -> None:
        self.store = store
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.max_attempts = max_attempts
        self._queues: dict[str, list[_Pending]] = {}
        self._kv: dict[str, KeyValue] = {}
        self._parsed: dict[str, tuple[int, Task]] = {}
        self._inflight: set[str] = set()
        self._slots = trio.Semaphore(max_inflight)
        self._wakeup = trio.Event()
        self._running = False
        #: Counters for metrics and benchmarks: Txns written, updates in them, retries.
        self.txns = 0
        self.updates = 0
        self.conflicts = 0

    # --- reads ---------------------------------------------------------------------------

    def task_of(self, kv: KeyValue) -> Task:
        """``Task.from_json(kv.value)``, parsed once per key and revision."""
        key = kv.key.decode(errors="replace")
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        task = Task.from_json(kv.value)
        self._remember(key, kv.mod_revision, task)
        return task

    def _remember(self, key: str, revision: int, task: Task) -> None:
        if len(self._parsed) >= _PARSED_MAX:
            self._parsed.clear()
        self._parsed[key] = (revision, task)

    def _note(self, key: str, kv: KeyValue | None) -> None:
        if kv is None:
            return
        old = self._kv.get(key)
        if old is None or old.mod_revision < kv.mod_revision:
            self._kv[key] = kv

    # --- writes --------------------------------------------------------------------------

    async def update(
        self,
        idc: str,
        sn: str,
        fn: TaskFn,
        *,
        current: KeyValue | None = None,
        op_id: str | None = None,
    ) -> StoredTask:
        """Apply ``fn`` to the task of ``sn`` in a batched CAS; see the module docstring.

        Without ``current`` and no write of ours to go by, or while :meth:`run` is not
        running, this is :meth:`Store.update_task` (read, then CAS). ``op_id`` as there.
        """
        key = schema.task_key(idc, sn)
        self._note(key, current)
        op = op_id or new_op_id()
        if not self._running or key not in self._kv:
            stored = await self.store.update_task(idc, sn, fn, current=current, op_id=op)
            self._note(key, stored.kv)
            return stored
        pending = _Pending(idc, sn, fn, op)
        self._queues.setdefault(key, []).append(pending)
        self._wakeup.set()
        try:
            await pending.done.wait()
        except BaseException:
            queue = self._queues.get(key)
            if queue is not None and pending in queue:
                queue.remove(pending)  # not written yet: withdraw it
                if not queue:
                    del self._queues[key]
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    # --- the flusher ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued updates until cancelled (queued callers then fail over to etcd)."""
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                task_status.started()
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    while True:
                        await self._slots.acquire()
                        batch = self._take()
                        if not batch:
                            self._slots.release()
                            break
                        nursery.start_soon(self._flush_and_release, batch)
        finally:
            self._running = False
            for queue in self._queues.values():
                for p in queue:
                    p.finish(error=EtcdUnavailableError("task writer stopped; try again"))
            self._queues.clear()

    def _take(self) -> dict[str, list[_Pending]]:
        """The next batch: queued tasks not in flight, within the op and byte limits."""
        batch: dict[str, list[_Pending]] = {}
        size = 0
        for key in list(self._queues):
            if key in self._inflight:
                continue
            kv = self._kv[key]
            if batch and size + 2 * len(kv.value) > self.max_bytes:
                break
            batch[key] = self._queues.pop(key)
            size += 2 * len(kv.value)  # the new document is about the old one's size
            if len(batch) >= self.max_tasks:
                break
        self._inflight.update(batch)
        return batch

    async def _flush_and_release(self, batch: dict[str, list[_Pending]]) -> None:
        try:
            await self._flush(batch)
        finally:
            self._inflight.difference_update(batch)
            self._slots.release()
            self._wakeup.set()

    def _prepare(self, batch: dict[str, list[_Pending]], refused: list[_Pending]) -> list[_Write]:
        """Apply each task's queued functions in order; what to write."""
        writes: list[_Write] = []
        for key, pendings in batch.items():
            kv = self._kv[key]
            try:
                base = self.task_of(kv)
            except InputError as exc:  # an unreadable document: nothing to batch
                for p in pendings:
                    p.finish(error=exc)
                continue
            task = base
            applied: list[tuple[_Pending, Task]] = []
            for p in pendings:
                if p.op_id in task.ops:
                    applied.append((p, task))  # applied before (a repeated request)
                    continue
                try:
                    new = p.fn(task)
                    if new is not task:
                        new = new.with_op(p.op_id)
                except InputError:
                    refused.append(p)  # decide again on fresh data, outside the batch
                    continue
                except Exception as exc:
                    p.finish(error=exc)
                    continue
                applied.append((p, new))
                task = new
            if task is base:
                for p, t in applied:
                    p.finish(StoredTask(t, kv.mod_revision, kv))
                continue
            parsed = schema.parse_key(key)
            assert parsed is not None
            doc, before, after = task_write(parsed.idc, parsed.sn, base, task)
            value = doc.to_json()
            ops = (*before, put(key, value, lease=kv.lease), *after)
            writes.append(_Write(key, kv, value, applied, ops, doc))
        return writes

    async def _flush(self, batch: dict[str, list[_Pending]]) -> None:
        refused: list[_Pending] = []
        writes = self._prepare(batch, refused)
        if writes:
            await self._write(writes)
        for p in refused:
            try:
                stored = await self.store.update_task(p.idc, p.sn, p.fn, op_id=p.op_id)
            except Exception as exc:
                p.finish(error=exc)
            else:
                self._note(schema.task_key(p.idc, p.sn), stored.kv)
                p.finish(stored)

    async def _write(self, writes: list[_Write]) -> None:
        # Each round that fails drops at least one task (its compare failed, or it is gone),
        # so the tasks whose compares held are re-sent at once, uncharged, until they commit.
        for group in _within_txn_limit(writes):
            while group:
                group = await self._write_once(group)

    async def _write_once(self, writes: list[_Write]) -> list[_Write]:
        """One Txn of ``writes``; those that only failed because another task's compare
        did (to send again as they are)."""
        compares = [Compare.mod_revision(w.key, "==", w.old.mod_revision) for w in writes]
        ops = [op for w in writes for op in w.ops]
        await hooks.reach("writer.before-txn")
        try:
            r = await self.store.txn(compares, ops, [get(w.key) for w in writes])
        except EtcdUnavailableError as exc:
            await self._settle_ambiguous(writes, exc)
            return []
        except Exception as exc:
            log.warning("batch of task writes failed", extra={"error": str(exc)})
            for w in writes:
                for p, _ in w.applied:
                    p.finish(error=exc)
            return []
        self.txns += 1
        if r.succeeded:
            for w in writes:
                self._committed(w, r.revision)
            return []
        retry: dict[str, list[_Pending]] = {}
        held: list[_Write] = []
        for w, got in zip(writes, r.responses, strict=True):
            assert isinstance(got, RangeResult)
            fresh = got.kvs[0] if got.kvs else None
            if fresh is None:
                parsed = schema.parse_key(w.key)
                err = NotFoundError(
                    f"no task for server {parsed.sn if parsed else w.key}", field="sn"
                )
                for p, _ in w.applied:
                    p.finish(error=err)
                continue
            if fresh.mod_revision == w.old.mod_revision:
                held.append(w)  # its compare held: not its conflict
                continue
            self.conflicts += 1
            metrics.CAS_RETRIES.inc()
            self._kv[w.key] = fresh
            retry[w.key] = [p for p, _ in w.applied]
        self._requeue(retry)
        return held

    def _committed(self, w: _Write, revision: int) -> None:
        new_kv = KeyValue(
            w.key.encode(),
            w.value,
            w.old.create_revision,
            revision,
            w.old.version + 1,
            w.old.lease,
        )
        self._note(w.key, new_kv)
        self._remember(w.key, revision, w.doc)
        self.updates += len(w.applied)
        for p, task in w.applied:
            p.finish(StoredTask(task, revision, new_kv))

    async def _settle_ambiguous(self, writes: list[_Write], exc: EtcdUnavailableError) -> None:
        """The batch may or may not have applied: read the tasks back and decide."""
        try:
            r = await self.store.client.txn([], [get(w.key) for w in writes], [])
        except Exception:
            for w in writes:
                for p, _ in w.applied:
                    p.finish(error=exc)
            return
        retry: dict[str, list[_Pending]] = {}
        for w, got in zip(writes, r.responses, strict=True):
            assert isinstance(got, RangeResult)
            fresh = got.kvs[0] if got.kvs else None
            self._note(w.key, fresh)
            if fresh is not None and fresh.value == w.value:
                self._committed(w, fresh.mod_revision)
                continue
            # Changed since (by us or another writer)? The operation ids say whether our
            # write is in it: the whole write went in one Txn, so its last id tells.
            base_ops = self.task_of(w.old).ops
            mine = [p.op_id for p, _ in w.applied if p.op_id not in base_ops][-1]
            try:
                task = self.task_of(fresh) if fresh is not None else None
            except InputError:
                task = None
            if fresh is not None and task is not None and mine in task.ops:
                self.updates += len(w.applied)
                for p, _ in w.applied:
                    p.finish(StoredTask(task, fresh.mod_revision, fresh))
                continue
            retry[w.key] = [p for p, _ in w.applied]
        self._requeue(retry)

    def _requeue(self, retry: dict[str, list[_Pending]]) -> None:
        """Put conflicting updates back at the front of the queue (bounded attempts)."""
        front: dict[str, list[_Pending]] = {}
        for key, pendings in retry.items():
            keep = []
            for p in pendings:
                p.attempts += 1
                if p.attempts >= self.max_attempts:
                    p.finish(error=ContentionError(key, p.attempts))
                else:
                    keep.append(p)
            if keep:
                front[key] = keep + self._queues.pop(key, [])
        if front:
            self._queues = {**front, **self._queues}
            self._wakeup.set()
