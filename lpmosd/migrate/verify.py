"""``lpmosd migrate verify``: is every v2 server in v3, with the content v2 had?

For one IDC, at one revision:

- the v2 list key must be gone and no v2 ``tasks``/``state`` document may remain;
- every server with a migration record must have its v3 server key and task. While the task
  is untouched since the migration (same mod_revision as the record: they were written by
  one Txn), it must equal, byte for byte, what mergeTaskAndState makes of the recorded v2
  documents, and so must the server entry. Once the daemon has updated it, its identity
  fields (task_id, sn, mac, os_*, disk_layout, network_config, created_*) must still match;
- with ``--against backup.json`` (an export): every server in the backup must be in v3, and
  its record must be of the same v2 revision as the backup (otherwise it changed after the
  export, which is reported as a note, not an error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from lpmosd import schema, tasklogs
from lpmosd.documents import ServerEntry, Task
from lpmosd.errors import ValidationError
from lpmosd.etcd import EtcdClient, KeyValue
from lpmosd.migrate import v2
from lpmosd.migrate.export import Export
from lpmosd.migrate.merge import Malformed, merge_task_and_state
from lpmosd.migrate.plan import Action, Plan, make_plan, read_snapshot
from lpmosd.migrate.record import MigrationRecord

__all__ = ["VerifyReport", "verify", "verify_plan"]

_IDENTITY: Final = (
    "task_id",
    "sn",
    "mac",
    "os_type",
    "os_version",
    "disk_layout",
    "network_config",
    "created_at",
    "created_by",
)


@dataclass(slots=True)
class VerifyReport:
    """What verify found in one IDC."""

    idc: str
    revision: int = 0
    checked: int = 0
    equal: int = 0
    updated_since: int = 0
    unrecorded: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No problem found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "idc": self.idc,
            "revision": self.revision,
            "passed": self.passed,
            "checked": self.checked,
            "equal": self.equal,
            "updated_since_migration": self.updated_since,
            "in_v3_without_record": self.unrecorded,
            "problems": [{"sn": sn, "problem": p} for sn, p in self.problems],
            "notes": [{"sn": sn, "note": n} for sn, n in self.notes],
        }


def _first_difference(want: dict[str, Any], got: dict[str, Any]) -> str:
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            return key
    return "encoding"


def _assembled(task_kv: KeyValue, chunks: Mapping[int, tuple[str, ...]]) -> Task | None:
    """The task as readers see it (lines from its chunks); None when not a valid task."""
    try:
        return tasklogs.assemble(Task.from_json(task_kv.value), chunks)
    except ValidationError:
        return None


def _check_server(
    report: VerifyReport,
    sn: str,
    rec_kv: KeyValue,
    task_kv: KeyValue | None,
    server_kv: KeyValue | None,
    chunks: Mapping[int, tuple[str, ...]],
) -> MigrationRecord | None:
    try:
        rec = MigrationRecord.from_json(rec_kv.value)
    except ValueError as exc:
        report.problems.append((sn, f"unreadable migration record: {exc}"))
        return None
    if task_kv is None or server_kv is None:
        missing = [k for k, kv in (("task", task_kv), ("server entry", server_kv)) if kv is None]
        report.problems.append((sn, f"migrated, but the v3 {' and '.join(missing)} is missing"))
        return rec
    try:
        want = merge_task_and_state(
            rec.idc, rec.sn, rec.tasks.value, rec.state.value if rec.state else None
        )
    except Malformed as exc:
        report.problems.append((sn, f"recorded v2 documents no longer merge: {exc.reason}"))
        return rec
    if task_kv.mod_revision == rec_kv.mod_revision:
        want_doc, _ = tasklogs.stored_form(rec.idc, rec.sn, want.task)
        shown = _assembled(task_kv, chunks)
        if task_kv.value != want_doc.to_json() or (
            shown is not None and shown.to_dict() != want.task.to_dict()
        ):
            try:
                got = (shown or Task.from_json(task_kv.value)).to_dict()
                where = _first_difference(want.task.to_dict(), got)
            except ValidationError:
                where = "whole document (not a valid task)"
            report.problems.append((sn, f"v3 task differs from the v2 documents (at {where})"))
            return rec
    else:
        try:
            got_task = Task.from_json(task_kv.value)
        except ValidationError as exc:
            report.problems.append((sn, f"v3 task is not valid: {exc}"))
            return rec
        want_d, got_d = want.task.to_dict(), got_task.to_dict()
        diff = [k for k in _IDENTITY if want_d[k] != got_d[k]]
        if diff:
            report.problems.append((sn, f"v3 task identity differs from v2: {', '.join(diff)}"))
            return rec
        report.updated_since += 1
    if server_kv.mod_revision == rec_kv.mod_revision:
        if server_kv.value != want.server.to_json():
            report.problems.append((sn, "v3 server entry differs from the v2 documents"))
            return rec
    else:
        try:
            entry = ServerEntry.from_json(server_kv.value)
        except ValidationError as exc:
            report.problems.append((sn, f"v3 server entry is not valid: {exc}"))
            return rec
        if entry.sn not in ("", sn) or entry.task_id not in ("", want.task.task_id):
            report.problems.append((sn, "v3 server entry names another server or task"))
            return rec
    report.equal += 1
    return rec


def verify_plan(
    plan: Plan,
    *,
    records: dict[str, KeyValue],
    tasks: dict[str, KeyValue],
    servers: dict[str, KeyValue],
    against: Export | None = None,
    chunks: Mapping[str, Mapping[int, tuple[str, ...]]] | None = None,
) -> VerifyReport:
    """Verify from an already-read snapshot (see :func:`verify`); ``chunks``: each
    server's log chunks, to compare the task with its lines."""
    report = VerifyReport(plan.idc, plan.revision)
    if plan.list_kv is not None:
        report.problems.append(("-", f"the v2 server list {v2.list_key(plan.idc)} still exists"))
    elif not plan.items and not servers:
        # Most likely a typo in --idc: passing would be a lie.
        report.problems.append(
            ("-", f"nothing to verify: no v2 keys, records or servers in {plan.idc}")
        )
    recs: dict[str, MigrationRecord] = {}
    for item in plan.items:
        report.checked += 1
        if item.action is not Action.DONE:
            why = item.reason or "v2 documents still present"
            if item.action is Action.MIGRATE:
                why = "not migrated yet: v2 documents still present"
            report.problems.append((item.sn, f"{item.action.value}: {why}"))
            continue
        rec_kv = records.get(item.sn)
        if rec_kv is None:
            report.unrecorded += 1
            report.notes.append((item.sn, "in v3 without a migration record: not compared"))
            continue
        rec = _check_server(
            report,
            item.sn,
            rec_kv,
            tasks.get(item.sn),
            servers.get(item.sn),
            (chunks or {}).get(item.sn, {}),
        )
        if rec is not None:
            recs[item.sn] = rec
    if against is not None:
        _check_against(report, plan, against, recs)
    return report


def _check_against(
    report: VerifyReport, plan: Plan, export: Export, recs: dict[str, MigrationRecord]
) -> None:
    servers = export.servers(plan.idc)
    if not servers and not export.has_idc(plan.idc):
        report.problems.append(("-", f"the backup has no data for {plan.idc}"))
        return
    reported = {sn for sn, _ in report.problems}
    for sn, docs in sorted(servers.items()):
        rec = recs.get(sn)
        if rec is None:
            if sn not in reported:  # already explained by the scan (skip, conflict, ...)
                report.problems.append((sn, "in the backup but not in v3"))
            continue
        tasks = docs.get("tasks")
        if tasks is not None and tasks.mod_revision != rec.tasks.mod_revision:
            report.notes.append(
                (
                    sn,
                    f"changed after the backup (tasks revision {tasks.mod_revision} → "
                    f"{rec.tasks.mod_revision}); migrated the newer content",
                )
            )
    for sn in export.listed(plan.idc):
        if sn not in servers and sn not in recs:
            report.notes.append((sn, "listed in the backup without documents"))


async def verify(client: EtcdClient, idc: str, *, against: Export | None = None) -> VerifyReport:
    """Verify the migration of ``idc`` at one revision (see the module docstring)."""
    snap = await read_snapshot(client, idc)
    plan = make_plan(snap)
    records = {kv.key.rsplit(b"/", 1)[-1].decode(): kv for kv in snap.records}
    servers = {kv.key.rsplit(b"/", 1)[-1].decode(): kv for kv in snap.servers}
    tasks: dict[str, KeyValue] = {}
    chunk_kvs: dict[str, list[KeyValue]] = {}
    for kv in snap.machines:
        parsed = schema.parse_key(kv.key)
        if parsed is not None and parsed.kind == "task":
            tasks[parsed.sn] = kv
        elif parsed is not None and parsed.kind == "logs":
            chunk_kvs.setdefault(parsed.sn, []).append(kv)
    chunks = {sn: tasklogs.chunks_of(kvs) for sn, kvs in chunk_kvs.items()}
    return verify_plan(
        plan, records=records, tasks=tasks, servers=servers, against=against, chunks=chunks
    )
