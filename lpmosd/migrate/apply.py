"""``lpmosd migrate apply``: move one IDC from v2 to v3, one guarded Txn per server.

Per server, one Txn::

    if   mod_revision(v2 tasks) == as read        (a v2 writer changed it → fail)
    and  mod_revision(v2 state) == as read, or state still absent
    and  v3 server key, v3 task key and the migration record are all absent
    then put  /os/{idc}/servers/{sn}              ServerEntry
         put  /os/{idc}/machines/{sn}/task        merged task
         put  /os/_migrate-v2/{idc}/{sn}          record: the v2 documents verbatim
         del  /os/{idc}/machines/{sn}/tasks, /state
    (on failure, one read-only Txn of all the above says why)

The v2 list key goes last, in its own Txn guarded on the list's mod_revision, and only when
a fresh scan finds every listed server in v3. A run is a loop of rounds: scan, migrate what
the plan says, scan again; a round that has nothing left to migrate deletes the list (or
reports why not). A server whose v2 documents changed under us is reported and migrated
again from its new content in the next round; a changed list (a v2 add) is rescanned.

Crash safety, by construction: each server moves in one atomic Txn, so a kill leaves it
either untouched (v2 documents, no record) or finished (v3 keys and record, no v2
documents). A re-run's scan sees exactly which, migrates the rest, and finally deletes the
list. Killed between the last server and the list delete, the re-run only deletes the
list. Nothing is ever written without the guards above, so nothing is duplicated or
overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

import trio

from lpmosd import schema, tasklogs, timestamps
from lpmosd.errors import EtcdUnavailableError
from lpmosd.etcd import Compare, EtcdClient, KeyValue, Op, RangeResult, delete, get, put
from lpmosd.migrate import v2
from lpmosd.migrate.plan import Action, Item, Plan, make_plan, read_snapshot
from lpmosd.migrate.record import MigrationRecord, RawDoc, record_key

__all__ = ["ApplyReport", "Hook", "Outcome", "ServerResult", "apply"]

#: ``await hook(point)`` at: ``scanned``, ``before-txn:{sn}``, ``after-txn:{sn}``,
#: ``before-list-delete``, ``after-list-delete``. Tests crash or race the run there.
Hook = Callable[[str], Awaitable[None]]
OnResult = Callable[["ServerResult"], None]

DEFAULT_CONCURRENCY: Final = 8
MAX_ROUNDS: Final = 5


class Outcome(StrEnum):
    """What happened to one server in this run."""

    MIGRATED = "migrated"
    ALREADY = "already"
    SKIPPED = "skipped"
    CONFLICT = "conflict"
    CHANGED = "changed"  # v2 documents changed under us: migrated again next round
    ERROR = "error"


_FINAL_OK: Final = frozenset({Outcome.MIGRATED, Outcome.ALREADY})


@dataclass(frozen=True, slots=True)
class ServerResult:
    """The outcome for one server, and why."""

    idc: str
    sn: str
    outcome: Outcome
    reason: str = ""
    notes: tuple[str, ...] = ()
    revision: int = 0


@dataclass(slots=True)
class ApplyReport:
    """The result of migrating one IDC."""

    idc: str
    results: dict[str, ServerResult] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    list_present: bool = False
    list_deleted: bool = False
    rounds: int = 0
    elapsed: float = 0.0

    def count(self, outcome: Outcome) -> int:
        """How many servers ended with ``outcome``."""
        return sum(1 for r in self.results.values() if r.outcome is outcome)

    @property
    def problems(self) -> list[ServerResult]:
        """Servers not in v3 at the end of the run."""
        return [r for r in self.results.values() if r.outcome not in _FINAL_OK]

    @property
    def ok(self) -> bool:
        """Every server is in v3 and the v2 list is gone."""
        return not self.problems and not self.list_present


async def _no_hook(point: str) -> None:
    return None


def _txn(plan: Plan, item: Item, now: datetime) -> tuple[list[Compare], list[Op], list[Op]]:
    """The guarded Txn that moves ``item`` (a ``migrate`` item) from v2 to v3."""
    assert item.merged is not None and item.tasks is not None
    idc, sn = plan.idc, item.sn
    server_key = schema.server_key(idc, sn)
    task_key = schema.task_key(idc, sn)
    rec_key = record_key(idc, sn)
    state_key = item.state.key if item.state is not None else v2.state_key(idc, sn).encode()
    record = MigrationRecord(
        idc=idc,
        sn=sn,
        tasks=RawDoc.from_kv(item.tasks),
        state=RawDoc.from_kv(item.state) if item.state is not None else None,
        listed=item.listed,
        migrated_at=now,
        list_mod_revision=plan.list_kv.mod_revision if plan.list_kv else 0,
    )
    compare = [
        Compare.mod_revision(item.tasks.key, "==", item.tasks.mod_revision),
        Compare.mod_revision(state_key, "==", item.state.mod_revision)
        if item.state is not None
        else Compare.absent(state_key),
        Compare.absent(server_key),
        Compare.absent(task_key),
        Compare.absent(rec_key),
    ]
    # The task's lines go to a log chunk like any write's (see lpmosd.tasklogs).
    doc, log_ops = tasklogs.stored_form(idc, sn, item.merged.task)
    success: list[Op] = [
        *log_ops,
        put(server_key, item.merged.server.to_json()),
        put(task_key, doc.to_json()),
        put(rec_key, record.to_json()),
        delete(item.tasks.key),
    ]
    if item.state is not None:
        success.append(delete(item.state.key))
    reads: list[Op] = [
        get(item.tasks.key),
        get(state_key),
        get(server_key),
        get(task_key),
        get(rec_key),
    ]
    return compare, success, reads


def _kv(r: object) -> KeyValue | None:
    assert isinstance(r, RangeResult)
    return r.kvs[0] if r.kvs else None


def _why(item: Item, found: list[KeyValue | None]) -> tuple[Outcome, str]:
    """Why the Txn of ``item`` failed, from a read of its keys just after."""
    assert item.tasks is not None
    tasks, state, server, task, rec = found
    if rec is not None:
        try:
            got = MigrationRecord.from_json(rec.value)
        except ValueError:
            got = None
        if got is not None and got.tasks.mod_revision == item.tasks.mod_revision:
            return Outcome.ALREADY, "migrated concurrently by another run"
        return Outcome.CONFLICT, "a migration record appeared during the run"
    present = [kv.key.decode(errors="replace") for kv in (server, task) if kv is not None]
    if present:
        return Outcome.CONFLICT, f"v3 key appeared during the run: {', '.join(present)}"
    changes = []
    if tasks is None or tasks.mod_revision != item.tasks.mod_revision:
        now = "deleted" if tasks is None else f"mod_revision {tasks.mod_revision}"
        changes.append(f"tasks {item.tasks.mod_revision} → {now}")
    was = item.state.mod_revision if item.state is not None else None
    is_ = state.mod_revision if state is not None else None
    if was != is_:
        changes.append(f"state {was or 'absent'} → {is_ or 'deleted'}")
    detail = ", ".join(changes) or "guard failed"
    return Outcome.CHANGED, f"v2 documents changed during the migration ({detail})"


async def _migrate_one(
    client: EtcdClient, plan: Plan, item: Item, hook: Hook, now: datetime
) -> ServerResult:
    idc, sn = plan.idc, item.sn
    await hook(f"before-txn:{sn}")
    compare, success, reads = _txn(plan, item, now)
    try:
        # No failure branch: its reads would double the encoding cost of every Txn (the
        # client's CPU is the bottleneck), and a failure is rare; read afterwards instead.
        r = await client.txn(compare, success, [])
    except EtcdUnavailableError as exc:
        # Ambiguous: the Txn may have committed. The record says whether it did.
        assert item.tasks is not None
        rec = await client.get(record_key(idc, sn))
        if rec is not None:
            try:
                got: MigrationRecord | None = MigrationRecord.from_json(rec.value)
            except ValueError:
                got = None
            if got is not None and got.tasks.mod_revision == item.tasks.mod_revision:
                await hook(f"after-txn:{sn}")
                return ServerResult(idc, sn, Outcome.MIGRATED, "", item.notes, rec.mod_revision)
        return ServerResult(idc, sn, Outcome.ERROR, f"etcd: {exc}")
    await hook(f"after-txn:{sn}")
    if r.succeeded:
        return ServerResult(idc, sn, Outcome.MIGRATED, "", item.notes, r.revision)
    after = await client.txn([], reads, [])  # read-only: one revision, safe to retry
    outcome, reason = _why(item, [_kv(x) for x in after.responses])
    return ServerResult(idc, sn, outcome, reason)


_FROM_ACTION: Final = {
    Action.DONE: Outcome.ALREADY,
    Action.SKIP: Outcome.SKIPPED,
    Action.CONFLICT: Outcome.CONFLICT,
}


async def apply(
    client: EtcdClient,
    idc: str,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    hook: Hook | None = None,
    on_result: OnResult | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    clock: Callable[[], datetime] = timestamps.utcnow,
    max_rounds: int = MAX_ROUNDS,
) -> ApplyReport:
    """Migrate ``idc``; see the module docstring. Never raises for a bad server.

    ``on_plan`` sees each round's plan (before its Txns), ``on_result`` each server's
    result as it happens. Raises only when etcd fails (a re-run resumes).
    """
    hook = hook or _no_hook
    report = ApplyReport(idc)
    started = time.monotonic()
    limiter = trio.CapacityLimiter(max(1, concurrency))
    for round_no in range(1, max_rounds + 1):
        report.rounds = round_no
        plan = make_plan(await read_snapshot(client, idc))
        report.list_present = plan.list_kv is not None
        await hook("scanned")
        if on_plan is not None:
            on_plan(plan)
        for item in plan.items:
            if item.action is Action.MIGRATE:
                continue
            prev = report.results.get(item.sn)
            if item.action is Action.DONE and prev is not None and prev.outcome in _FINAL_OK:
                continue  # migrated earlier in this run: keep that result
            res = ServerResult(idc, item.sn, _FROM_ACTION[item.action], item.reason, item.notes)
            report.results[item.sn] = res
            if on_result is not None and (prev is None or prev.outcome is not res.outcome):
                on_result(res)
        todo = plan.with_action(Action.MIGRATE)
        if todo:
            now = clock()

            async def run(plan: Plan, item: Item, now: datetime) -> None:
                async with limiter:
                    res = await _migrate_one(client, plan, item, hook, now)
                report.results[item.sn] = res
                if res.outcome is Outcome.CHANGED:
                    report.events.append(f"{idc}/{item.sn}: {res.reason}; rescanning")
                if on_result is not None:
                    on_result(res)

            async with trio.open_nursery() as nursery:
                for item in todo:
                    nursery.start_soon(run, plan, item, now)
            continue  # rescan: see the result, pick up changes, then the list
        if plan.list_kv is None:
            break
        if not plan.list_deletable:
            why = plan.list_problem or f"{len(plan.blocking)} listed servers are not in v3"
            report.events.append(f"{v2.list_key(idc)} kept: {why}")
            break
        await hook("before-list-delete")
        key = v2.list_key(idc)
        r = await client.txn(
            [Compare.mod_revision(key, "==", plan.list_kv.mod_revision)], [delete(key)], []
        )
        if r.succeeded:
            report.list_present = False
            report.list_deleted = True
            await hook("after-list-delete")
            break
        report.events.append(
            f"{key} changed during the migration (a v2 writer added a server?); rescanning"
        )
    else:
        report.events.append(
            f"gave up after {max_rounds} rounds: v2 data keeps changing; stop the v2 writers "
            "and run apply again"
        )
    report.elapsed = time.monotonic() - started
    return report
