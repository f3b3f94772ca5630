"""The LPMOS v2.x etcd format, and a small v2 writer for tests and benchmarks.

The v3 guide shows only the shape of v2 ("Schema Comparison", "Migration from v2.x"); the
document fields below are what lpmosd accepts as v2 data and what :class:`V2Writer` writes.

Keys (``{idc}`` must be a valid v3 name; ``{sn}`` is whatever v2 wrote)::

    /os/{idc}/servers                JSON list of serial numbers: ["sn-001", "sn-002"]
    /os/{idc}/machines/{sn}/tasks    the task document: what the operator asked for
    /os/{idc}/machines/{sn}/state    the state document: what the regional/agent reported

v2 adds a server by reading the list, appending and writing it back with no guard, so two
concurrent adds can lose one of them: a machine may have documents but be missing from the
list. The migration therefore migrates every machine that has documents, listed or not.

``tasks`` (one JSON object)::

    task_id         string, required, non-empty
    sn              string, required, equal to the key's {sn}
    mac             string, required; any form v3 accepts (00:1a:.., 00-1A-.., 001a.2b3c.4d5e)
    os_type         string, required
    os_version      string, default ""
    disk_layout     string, default "auto"
    network_config  string, default "dhcp"
    created_at      RFC 3339 timestamp, required
    created_by      string, default ""
    approval        null or {"approved": bool, "approved_by": str, "approved_at": ts,
                    "notes": str}, default null

``state`` (one JSON object; the key may be absent for a task nobody has touched yet)::

    status          required: pending | approved | installing | completed | failed | cancelled
    progress        list of {"step", "percent" 0..100, "timestamp", "message"}, default [];
                    v2 appended one entry per report, so a step may appear several times
    logs            list of strings, default []
    status_history  list of {"status", "timestamp", "actor"?, "reason"?} (v2.1+); optional
    error           string or null, default null (the last failure reason)
    updated_at      RFC 3339 timestamp, required

Unknown fields in either document are tolerated (v2 writers were loose): they are not carried
into the v3 task, the plan lists them, and the migration record keeps the original documents.
How the two documents become one v3 task is :func:`lpmosd.migrate.merge.merge_task_and_state`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from lpmosd.etcd import EtcdClient, Op, put
from lpmosd.etcd.txn import MAX_TXN_OPS
from lpmosd.schema import ROOT, validate_idc
from lpmosd.timestamps import format_ts

__all__ = [
    "V2Kind",
    "V2Server",
    "V2Writer",
    "example_server",
    "list_key",
    "machine_doc_kind",
    "machines_prefix",
    "state_doc",
    "state_key",
    "task_doc",
    "tasks_key",
]

V2Kind = Literal["tasks", "state"]
_KINDS: Final[frozenset[str]] = frozenset({"tasks", "state"})

Doc = Mapping[str, Any] | bytes


def list_key(idc: str) -> str:
    """``/os/{idc}/servers``: the v2 server list (note: no trailing slash)."""
    return f"{ROOT}{validate_idc(idc)}/servers"


def machines_prefix(idc: str) -> str:
    """``/os/{idc}/machines/``: v2 documents live here next to v3's task/meta/lease."""
    return f"{ROOT}{validate_idc(idc)}/machines/"


def tasks_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/tasks``. ``sn`` is not validated: v2 never did."""
    return f"{machines_prefix(idc)}{sn}/tasks"


def state_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/state``. ``sn`` is not validated: v2 never did."""
    return f"{machines_prefix(idc)}{sn}/state"


def machine_doc_kind(key: bytes, prefix: bytes) -> tuple[V2Kind, str] | None:
    """``(kind, sn)`` when ``key`` (under machines ``prefix``) is a v2 document, else None.

    ``sn`` is returned raw (it may contain anything, even ``/``); callers validate it.
    """
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :].decode("utf-8", errors="surrogateescape")
    sn, sep, leaf = rest.rpartition("/")
    if not sep or not sn or leaf not in _KINDS:
        return None
    return ("tasks" if leaf == "tasks" else "state"), sn


def _encode(doc: Doc) -> bytes:
    if isinstance(doc, bytes):
        return doc  # tests write malformed documents verbatim
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- documents


def task_doc(
    sn: str,
    *,
    task_id: str,
    mac: str,
    os_type: str = "Ubuntu 22.04",
    os_version: str = "22.04",
    disk_layout: str = "auto",
    network_config: str = "dhcp",
    created_at: datetime,
    created_by: str = "admin@example.com",
    approval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A v2 ``tasks`` document."""
    return {
        "task_id": task_id,
        "sn": sn,
        "mac": mac,
        "os_type": os_type,
        "os_version": os_version,
        "disk_layout": disk_layout,
        "network_config": network_config,
        "created_at": format_ts(created_at),
        "created_by": created_by,
        "approval": None if approval is None else dict(approval),
    }


def state_doc(
    status: str,
    *,
    updated_at: datetime,
    progress: Sequence[Mapping[str, Any]] = (),
    logs: Sequence[str] = (),
    status_history: Sequence[Mapping[str, Any]] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A v2 ``state`` document (``status_history`` only when given: v2.0 had none)."""
    doc: dict[str, Any] = {
        "status": status,
        "progress": [dict(p) for p in progress],
        "logs": list(logs),
        "updated_at": format_ts(updated_at),
    }
    if status_history is not None:
        doc["status_history"] = [dict(h) for h in status_history]
    if error is not None:
        doc["error"] = error
    return doc


@dataclass(frozen=True, slots=True)
class V2Server:
    """One machine's v2 data; ``state`` None leaves the state key absent."""

    sn: str
    task: Doc | None
    state: Doc | None
    listed: bool = True


_STEPS: Final = ("hardware_collect", "partitioning", "os_install", "post_config")
_STATUSES: Final = ("pending", "approved", "installing", "completed", "failed", "cancelled")
_MAC_STYLES: Final[tuple[Callable[[str], str], ...]] = (
    lambda h: ":".join(h[i : i + 2] for i in range(0, 12, 2)),
    lambda h: "-".join(h[i : i + 2] for i in range(0, 12, 2)).upper(),
    lambda h: ".".join(h[i : i + 4] for i in range(0, 12, 4)),
)


def example_server(n: int, *, base: datetime, prefix: str = "sn-") -> V2Server:
    """A realistic, deterministic v2 machine number ``n`` (statuses, progress, logs vary).

    Used by the tests and the benchmark; ``base`` is the creation time of machine 0.
    """
    sn = f"{prefix}{n:05d}"
    created = base + timedelta(minutes=n)
    status = _STATUSES[n % len(_STATUSES)]
    approval = None
    if status != "pending" and not (status == "cancelled" and n % 2):
        approval = {
            "approved": True,
            "approved_by": "ops@example.com",
            "approved_at": format_ts(created + timedelta(minutes=1)),
            "notes": f"batch {n // 50}",
        }
    progress: list[dict[str, Any]] = []
    logs = [f"{format_ts(created)} [INFO] Task created"]
    t = created + timedelta(minutes=2)
    if status in ("installing", "completed", "failed"):
        steps = _STEPS if status != "installing" else _STEPS[: 1 + n % 3]
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            done = 100 if status == "completed" or not last else 40 + n % 50
            # v2 appended each report: an unfinished step appears at 0 % and again later.
            if done < 100:
                progress.append(_step(step, 0, t, "started"))
                t += timedelta(seconds=30)
            progress.append(_step(step, done, t, f"{step} at {done}%"))
            logs.append(f"{format_ts(t)} [INFO] {step}: {done}%")
            t += timedelta(seconds=30)
    error = None
    if status == "failed":
        error = "disk /dev/sda not found"
        logs.append(f"{format_ts(t)} [ERROR] {error}")
    history = None
    if n % 3 == 0:  # a v2.1 writer: it kept a history
        history = [{"status": "pending", "timestamp": format_ts(created), "actor": "admin"}]
        if status != "pending":
            history.append({"status": status, "timestamp": format_ts(t)})
    mac = _MAC_STYLES[n % len(_MAC_STYLES)](f"02{n:010x}")
    task = task_doc(
        sn,
        task_id=f"task-{n:06x}",
        mac=mac,
        os_type=("Ubuntu 22.04", "Debian 12", "Rocky 9")[n % 3],
        os_version=("22.04", "12", "9.3")[n % 3],
        created_at=created,
        approval=approval,
    )
    state = state_doc(
        status, updated_at=t, progress=progress, logs=logs, status_history=history, error=error
    )
    return V2Server(sn, task, state)


def _step(step: str, percent: int, ts: datetime, message: str) -> dict[str, Any]:
    return {"step": step, "percent": percent, "timestamp": format_ts(ts), "message": message}


# ------------------------------------------------------------------------------- writer


class V2Writer:
    """Writes one IDC's data the way LPMOS v2.x did (for tests, demos and benchmarks).

    :meth:`add_server` and :meth:`update_state` are deliberately unguarded
    read-modify-writes, the races v3 removes. :meth:`load` bulk-writes many machines in
    Txns of up to 128 ops and then the list once, to set up large data sets quickly.
    """

    def __init__(self, client: EtcdClient, idc: str) -> None:
        self.client = client
        self.idc = validate_idc(idc)

    async def read_list(self) -> list[Any]:
        """The current server list (``[]`` when the key is absent)."""
        kv = await self.client.get(list_key(self.idc))
        if kv is None:
            return []
        value = json.loads(kv.value)
        return value if isinstance(value, list) else []

    async def add_server(self, sn: str) -> None:
        """The guide's v2 add: read list → append → write (two adds may race; one is lost)."""
        servers = await self.read_list()
        if sn not in servers:
            servers.append(sn)
        await self.client.put(list_key(self.idc), json.dumps(servers))

    async def write_task(self, sn: str, doc: Doc) -> int:
        """Put the ``tasks`` document; returns the revision."""
        return (await self.client.put(tasks_key(self.idc, sn), _encode(doc))).revision

    async def write_state(self, sn: str, doc: Doc) -> int:
        """Put the ``state`` document; returns the revision."""
        return (await self.client.put(state_key(self.idc, sn), _encode(doc))).revision

    async def update_state(
        self, sn: str, fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """The guide's "Bad (v2.x)" update: read state, change it, write it back unguarded."""
        kv = await self.client.get(state_key(self.idc, sn))
        state: dict[str, Any] = json.loads(kv.value) if kv else {}
        state = fn(state)
        await self.write_state(sn, state)
        return state

    async def report_progress(
        self, sn: str, step: str, percent: int, message: str, *, now: datetime
    ) -> dict[str, Any]:
        """An agent's v2 progress report: append a step entry and a log line to ``state``."""

        def change(state: dict[str, Any]) -> dict[str, Any]:
            state.setdefault("progress", []).append(_step(step, percent, now, message))
            state.setdefault("logs", []).append(f"{format_ts(now)} [INFO] {step}: {percent}%")
            state["status"] = "installing"
            state["updated_at"] = format_ts(now)
            return state

        return await self.update_state(sn, change)

    async def create(self, server: V2Server) -> None:
        """Create one machine as v2 did: documents first, then the racy list append."""
        if server.task is not None:
            await self.write_task(server.sn, server.task)
        if server.state is not None:
            await self.write_state(server.sn, server.state)
        if server.listed:
            await self.add_server(server.sn)

    async def load(self, servers: Iterable[V2Server]) -> int:
        """Bulk-write ``servers`` (documents in big Txns, then the list once); returns count."""
        ops: list[Op] = []
        listed: list[str] = []
        count = 0
        for s in servers:
            count += 1
            if s.task is not None:
                ops.append(put(tasks_key(self.idc, s.sn), _encode(s.task)))
            if s.state is not None:
                ops.append(put(state_key(self.idc, s.sn), _encode(s.state)))
            if s.listed:
                listed.append(s.sn)
            if len(ops) >= MAX_TXN_OPS - 1:
                await self.client.txn([], ops, [])
                ops = []
        if ops:
            await self.client.txn([], ops, [])
        if listed:
            current = await self.read_list()
            seen = set(map(str, current))
            current.extend(sn for sn in listed if sn not in seen)
            await self.client.put(list_key(self.idc), json.dumps(current))
        return count
