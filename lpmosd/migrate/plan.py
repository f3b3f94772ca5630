"""Read one IDC's keys at one revision and decide, per server, what the migration will do.

:func:`read_snapshot` is the only I/O here; :func:`make_plan` is pure, so ``plan`` (dry run),
``apply`` (which re-plans every round) and ``verify`` classify servers the same way.

Every server named by the v2 list, having v2 documents, or having a migration record gets
one :class:`Item`:

========  =================================================================================
migrate   v2 documents merge into a valid v3 task and no v3 key or record is in the way
done      migrated already (record present, no v2 documents left), or already in v3
skip      malformed: bad JSON, missing fields, invalid name, listed without documents,
          state without tasks, too large for one etcd request; left in place
conflict  a v3 key (or a record) exists *and* v2 documents exist; neither is overwritten
========  =================================================================================

The v2 list key is deleted only when every listed server is ``migrate`` or ``done``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from lpmosd import schema
from lpmosd.errors import ValidationError
from lpmosd.etcd import EtcdClient, KeyValue
from lpmosd.etcd.txn import prefix_end, to_bytes
from lpmosd.migrate import v2
from lpmosd.migrate.merge import Malformed, Merged, merge_task_and_state
from lpmosd.migrate.record import records_prefix

__all__ = ["MAX_REQUEST_BYTES", "Action", "Item", "Plan", "Snapshot", "make_plan", "read_snapshot"]

#: etcd's default request limit is 1.5 MiB; keep a margin for keys and framing.
MAX_REQUEST_BYTES: Final = 1_400_000
_PAGE: Final = 500


class Action(StrEnum):
    """What the migration does with one server."""

    MIGRATE = "migrate"
    DONE = "done"
    SKIP = "skip"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys of one IDC that matter to the migration, all read at ``revision``."""

    idc: str
    revision: int
    list_kv: KeyValue | None
    machines: tuple[KeyValue, ...]
    servers: tuple[KeyValue, ...]
    records: tuple[KeyValue, ...]


async def _range_all(client: EtcdClient, prefix: str, revision: int) -> list[KeyValue]:
    """Every key under ``prefix`` at ``revision``, paged."""
    start = to_bytes(prefix)
    end = prefix_end(start)
    kvs: list[KeyValue] = []
    while True:
        r = await client.range(start, range_end=end, limit=_PAGE, revision=revision)
        kvs.extend(r.kvs)
        if not r.more or not r.kvs:
            return kvs
        start = r.kvs[-1].key + b"\0"


async def read_snapshot(client: EtcdClient, idc: str) -> Snapshot:
    """Read the v2 list, every machine key, v3 server keys and records at one revision."""
    first = await client.range(v2.list_key(idc))
    rev = first.revision
    return Snapshot(
        idc=idc,
        revision=rev,
        list_kv=first.kvs[0] if first.kvs else None,
        machines=tuple(await _range_all(client, v2.machines_prefix(idc), rev)),
        servers=tuple(await _range_all(client, schema.servers_prefix(idc), rev)),
        records=tuple(await _range_all(client, records_prefix(idc), rev)),
    )


@dataclass(frozen=True, slots=True)
class Item:
    """The plan for one server (``sn`` as v2 spelled it; it may be an invalid name)."""

    sn: str
    action: Action
    reason: str = ""
    notes: tuple[str, ...] = ()
    listed: bool = False
    tasks: KeyValue | None = None
    state: KeyValue | None = None
    merged: Merged | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``plan --json``."""
        d: dict[str, Any] = {"sn": self.sn, "action": self.action.value, "listed": self.listed}
        if self.reason:
            d["reason"] = self.reason
        if self.notes:
            d["notes"] = list(self.notes)
        if self.tasks is not None:
            d["tasks_mod_revision"] = self.tasks.mod_revision
        if self.state is not None:
            d["state_mod_revision"] = self.state.mod_revision
        if self.merged is not None:
            d["v3_status"] = self.merged.task.status.value
        return d


@dataclass(frozen=True, slots=True)
class Plan:
    """What a migration of one IDC would do, as of ``revision``."""

    idc: str
    revision: int
    list_kv: KeyValue | None
    listed: tuple[str, ...]
    list_problem: str | None
    items: tuple[Item, ...]
    list_notes: tuple[str, ...] = field(default=())

    def with_action(self, action: Action) -> list[Item]:
        """The items of one action."""
        return [i for i in self.items if i.action is action]

    def count(self, action: Action) -> int:
        """How many items have ``action``."""
        return sum(1 for i in self.items if i.action is action)

    @property
    def blocking(self) -> list[Item]:
        """Listed servers that will not be in v3 after this plan: they keep the list key."""
        return [i for i in self.items if i.listed and i.action in (Action.SKIP, Action.CONFLICT)]

    @property
    def list_deletable(self) -> bool:
        """True when the list key exists and goes once every ``migrate`` item is done."""
        return self.list_kv is not None and self.list_problem is None and not self.blocking

    @property
    def clean(self) -> bool:
        """Nothing to skip and nothing in conflict."""
        return self.list_problem is None and not any(
            i.action in (Action.SKIP, Action.CONFLICT) for i in self.items
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``plan --json``."""
        return {
            "idc": self.idc,
            "revision": self.revision,
            "list_key": v2.list_key(self.idc),
            "list_present": self.list_kv is not None,
            "list_mod_revision": self.list_kv.mod_revision if self.list_kv else None,
            "list_problem": self.list_problem,
            "list_notes": list(self.list_notes),
            "list_will_be_deleted": self.list_deletable,
            "counts": {a.value: self.count(a) for a in Action},
            "items": [i.to_dict() for i in self.items],
        }


def _parse_list(kv: KeyValue | None) -> tuple[list[str], str | None, list[str]]:
    """(serial numbers, problem, notes) of the v2 list key."""
    if kv is None:
        return [], None, []
    try:
        value = json.loads(kv.value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return [], "the server list is not valid JSON", []
    if not isinstance(value, list):
        return [], f"the server list is a JSON {type(value).__name__}, not a list", []
    sns: list[str] = []
    notes: list[str] = []
    problem = None
    seen: set[str] = set()
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            problem = f"server list entry [{i}] is not a string: {json.dumps(entry)[:60]}"
            continue
        if entry in seen:
            notes.append(f"{entry!r} is listed more than once")
            continue
        seen.add(entry)
        sns.append(entry)
    return sns, problem, notes


def _ordered(*groups: Iterable[str]) -> list[str]:
    out: dict[str, None] = {}
    for g in groups:
        for sn in g:
            out.setdefault(sn, None)
    return list(out)


def make_plan(snap: Snapshot) -> Plan:
    """Classify every server of the snapshot (see the module docstring)."""
    idc = snap.idc
    listed, list_problem, list_notes = _parse_list(snap.list_kv)
    listed_set = set(listed)
    prefix = v2.machines_prefix(idc).encode()
    docs: dict[str, dict[str, KeyValue]] = {}
    v3_tasks: dict[str, KeyValue] = {}
    for kv in snap.machines:
        found = v2.machine_doc_kind(kv.key, prefix)
        if found is not None:
            kind, sn = found
            docs.setdefault(sn, {})[kind] = kv
            continue
        parsed = schema.parse_key(kv.key)
        if parsed is not None and parsed.kind == "task":
            v3_tasks[parsed.sn] = kv
    servers = {_last(kv.key): kv for kv in snap.servers}
    records = {_last(kv.key): kv for kv in snap.records}
    order = _ordered(listed, sorted(docs), sorted(records))
    items = []
    for sn in order:
        d = docs.get(sn, {})
        items.append(
            _classify(
                idc,
                sn,
                listed=sn in listed_set,
                list_usable=snap.list_kv is not None and list_problem is None,
                tasks=d.get("tasks"),
                state=d.get("state"),
                server=servers.get(sn),
                task=v3_tasks.get(sn),
                record=records.get(sn),
            )
        )
    return Plan(
        idc=idc,
        revision=snap.revision,
        list_kv=snap.list_kv,
        listed=tuple(listed),
        list_problem=list_problem,
        items=tuple(items),
        list_notes=tuple(list_notes),
    )


def _last(key: bytes) -> str:
    return key.rsplit(b"/", 1)[-1].decode("utf-8", errors="replace")


def _classify(
    idc: str,
    sn: str,
    *,
    listed: bool,
    list_usable: bool,
    tasks: KeyValue | None,
    state: KeyValue | None,
    server: KeyValue | None,
    task: KeyValue | None,
    record: KeyValue | None,
) -> Item:
    def item(
        action: Action, reason: str = "", notes: tuple[str, ...] = (), merged: Merged | None = None
    ) -> Item:
        return Item(sn, action, reason, notes, listed, tasks, state, merged)

    has_v2 = tasks is not None or state is not None
    try:
        schema.validate_sn(sn)
    except ValidationError as exc:
        what = "" if has_v2 else "; it has no documents either"
        return item(Action.SKIP, f"not a valid v3 serial number: {exc.message}{what}")
    if not has_v2:
        if record is not None:
            return item(Action.DONE, "already migrated")
        if task is not None or server is not None:
            return item(Action.DONE, "already in v3 (no migration record)")
        return item(
            Action.SKIP,
            f"listed in {v2.list_key(idc)} but has no tasks or state document",
        )
    if record is not None:
        return item(
            Action.CONFLICT,
            f"already migrated (record at revision {record.mod_revision}), but v2 "
            "documents were written again since: stop the v2 writers and resolve by hand",
        )
    present = [k.key.decode(errors="replace") for k in (server, task) if k is not None]
    if present:
        return item(
            Action.CONFLICT,
            f"v3 key already exists: {', '.join(present)} (not overwritten)",
        )
    if tasks is None:
        return item(Action.SKIP, "has a state document but no tasks document")
    try:
        merged = merge_task_and_state(idc, sn, tasks.value, state.value if state else None)
    except Malformed as exc:
        return item(Action.SKIP, exc.reason)
    # The record repeats the v2 documents as JSON strings (escaped): count them that way.
    size = sum(len(json.dumps(kv.value.decode())) for kv in (tasks, state) if kv is not None)
    size += len(merged.task.to_json()) + len(merged.server.to_json()) + 1024
    if size > MAX_REQUEST_BYTES:
        return item(
            Action.SKIP,
            f"too large for one etcd request (~{size} bytes with its record)",
        )
    notes = merged.notes
    if not listed and list_usable:
        notes = (f"not in {v2.list_key(idc)} (lost by the v2 list race?)", *notes)
    return item(Action.MIGRATE, notes=notes, merged=merged)
