"""mergeTaskAndState: one machine's v2 ``tasks`` + ``state`` documents → one v3 task.

The function is pure and deterministic (no clock), so ``lpmosd migrate verify`` can recompute
the expected v3 task from the migration record and compare it byte for byte.

Rules (v2 fields are described in :mod:`lpmosd.migrate.v2`):

- identity and request fields (task_id, sn, mac, os_*, disk_layout, network_config,
  created_at, created_by, approval) come from ``tasks``; ``mac`` is normalised;
- status, progress, logs, status_history, error and updated_at come from ``state``; without a
  ``state`` key the task is ``pending`` with no progress or logs, updated at creation;
- progress: v2 appended one entry per report, v3 keeps one entry per step: the *last* entry
  of each step wins, in the order the steps first appeared;
- logs are kept as they are, trimmed to the newest within the v3 caps (the number dropped
  goes to ``logs_dropped``), exactly as the daemon trims on every write;
- status_history is taken as is (trimmed like the daemon's) or, for v2.0 data without one,
  rebuilt: pending at ``created_at`` by ``created_by``, approved at ``approval.approved_at``
  by ``approval.approved_by``, then the current status at ``updated_at``;
- the server entry is ``ServerEntry.for_task`` (``added_at`` = the task's ``created_at``).

Anything that does not fit raises :class:`Malformed` with a reason naming the document and
field (``state.progress[3]: percent must be between 0 and 100``). Unknown fields are dropped
with a note, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from lpmosd import lifecycle
from lpmosd.documents import (
    MAX_PROGRESS_STEPS,
    Approval,
    ProgressStep,
    ServerEntry,
    StatusChange,
    Task,
    TaskStatus,
)
from lpmosd.errors import ValidationError
from lpmosd.schema import normalize_mac, validate_idc, validate_sn
from lpmosd.timestamps import parse_ts

__all__ = ["Malformed", "Merged", "merge_task_and_state"]

_TASK_FIELDS: Final = frozenset(
    {
        "task_id",
        "sn",
        "mac",
        "os_type",
        "os_version",
        "disk_layout",
        "network_config",
        "created_at",
        "created_by",
        "approval",
    }
)
_STATE_FIELDS: Final = frozenset(
    {"status", "progress", "logs", "status_history", "error", "updated_at"}
)
# Which v2 document a v3 task field came from, to name it in a reason.
_SOURCE: Final[Mapping[str, str]] = {
    **{f: "tasks" for f in _TASK_FIELDS},
    **{f: "state" for f in _STATE_FIELDS},
}
_STATUS_VALUES: Final = frozenset(s.value for s in TaskStatus)


class Malformed(Exception):
    """A v2 machine that cannot become a v3 task; ``reason`` says why, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Merged:
    """The v3 documents of one machine, and notes on what the merge changed or dropped."""

    task: Task
    server: ServerEntry
    notes: tuple[str, ...] = ()


def _load(raw: bytes, name: str) -> dict[str, Any]:
    try:
        # Strict UTF-8 first: json.loads(bytes) would also guess UTF-16/32.
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Malformed(f"{name}: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        detail = f" ({exc})" if isinstance(exc, json.JSONDecodeError) else ""
        raise Malformed(f"{name}: not valid JSON{detail}") from None
    if not isinstance(value, dict):
        raise Malformed(f"{name}: must be a JSON object, not {type(value).__name__}")
    return value


def _str(doc: Mapping[str, Any], name: str, key: str, default: str | None = None) -> str:
    if key not in doc:
        if default is None:
            raise Malformed(f"{name}: missing field {key!r}")
        return default
    value = doc[key]
    if not isinstance(value, str):
        raise Malformed(f"{name}.{key}: must be a string")
    return value


def _ts(doc: Mapping[str, Any], name: str, key: str) -> datetime:
    if key not in doc:
        raise Malformed(f"{name}: missing field {key!r}")
    try:
        return parse_ts(doc[key], f"{name}.{key}")
    except ValidationError as exc:
        raise Malformed(exc.message) from None


def _list(doc: Mapping[str, Any], name: str, key: str) -> list[Any]:
    value = doc.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise Malformed(f"{name}.{key}: must be a list")
    return value


def _unknown(doc: Mapping[str, Any], known: frozenset[str], name: str) -> list[str]:
    extra = sorted(k for k in doc if k not in known)
    if not extra:
        return []
    shown = ", ".join(extra[:8]) + (", ..." if len(extra) > 8 else "")
    return [f"{name}: unknown fields not carried into v3: {shown}"]


def _sub(
    cls: type[ProgressStep] | type[StatusChange] | type[Approval], obj: object, where: str
) -> Any:
    """Parse a nested v3 document, re-labelling its errors with the v2 location."""
    try:
        return cls.from_dict(obj)
    except ValidationError as exc:
        raise Malformed(f"{where}: {exc.message}") from None


def merge_task_and_state(idc: str, sn: str, tasks: bytes, state: bytes | None) -> Merged:
    """Merge one machine's raw v2 documents into its v3 task and server entry.

    ``idc`` and ``sn`` come from the keys and must already be valid v3 names.
    """
    validate_idc(idc)
    validate_sn(sn)
    notes: list[str] = []
    t = _load(tasks, "tasks")
    s = _load(state, "state") if state is not None else None
    notes += _unknown(t, _TASK_FIELDS, "tasks")
    if s is not None:
        notes += _unknown(s, _STATE_FIELDS, "state")
    else:
        notes.append("no state document: migrated as pending")

    doc_sn = _str(t, "tasks", "sn")
    if doc_sn != sn:
        raise Malformed(f"tasks.sn is {doc_sn[:80]!r} but the key names {sn!r}")
    try:
        mac = normalize_mac(_str(t, "tasks", "mac"))
    except ValidationError as exc:
        raise Malformed(f"tasks.mac: {exc.message}") from None
    created_at = _ts(t, "tasks", "created_at")
    created_by = _str(t, "tasks", "created_by", "")
    approval_raw = t.get("approval")
    approval: Approval | None = (
        None if approval_raw is None else _sub(Approval, approval_raw, "tasks.approval")
    )

    if s is None:
        status = TaskStatus.PENDING
        updated_at = created_at
        raw_progress: list[Any] = []
        raw_logs: list[Any] = []
        raw_history: list[Any] | None = None
        error: str | None = None
    else:
        raw_status = s.get("status")
        if raw_status not in _STATUS_VALUES:
            if "status" not in s:
                raise Malformed("state: missing field 'status'")
            raise Malformed(f"state.status: unknown status {str(raw_status)[:40]!r}")
        status = TaskStatus(raw_status)
        updated_at = _ts(s, "state", "updated_at")
        raw_progress = _list(s, "state", "progress")
        raw_logs = _list(s, "state", "logs")
        raw_history = _list(s, "state", "status_history") if "status_history" in s else None
        err = s.get("error")
        if err is not None and not isinstance(err, str):
            raise Malformed("state.error: must be a string or null")
        error = err or None

    progress = _collapse_progress(raw_progress, notes)
    logs: list[str] = []
    for i, line in enumerate(raw_logs):
        if not isinstance(line, str):
            raise Malformed(f"state.logs[{i}]: must be a string")
        logs.append(line)
    # The daemon's own caps: one definition of the limits.
    kept_logs, dropped = lifecycle.cap_logs(tuple(logs), 0)
    if dropped:
        notes.append(f"state.logs: {dropped} oldest lines over the v3 cap counted as dropped")
    if raw_history is None:
        history = _rebuild_history(status, created_at, created_by, approval, updated_at)
    else:
        history = tuple(
            _sub(StatusChange, h, f"state.status_history[{i}]") for i, h in enumerate(raw_history)
        )
        capped = lifecycle.cap_history(history)
        if len(capped) != len(history):
            notes.append(f"state.status_history: trimmed to the v3 cap of {len(capped)} entries")
        history = capped

    task = Task(
        task_id=_str(t, "tasks", "task_id"),
        idc=idc,
        sn=sn,
        mac=mac,
        os_type=_str(t, "tasks", "os_type"),
        os_version=_str(t, "tasks", "os_version", ""),
        disk_layout=_str(t, "tasks", "disk_layout", "auto"),
        network_config=_str(t, "tasks", "network_config", "dhcp"),
        status=status,
        status_history=history,
        progress=progress,
        logs=kept_logs,
        logs_dropped=dropped,
        approval=approval,
        created_at=created_at,
        updated_at=updated_at,
        created_by=created_by,
        error=error,
    )
    _check_v3(task)
    return Merged(task, ServerEntry.for_task(task), tuple(notes))


def _collapse_progress(raw: list[Any], notes: list[str]) -> tuple[ProgressStep, ...]:
    """One entry per step: the last report of each, in first-appearance order."""
    latest: dict[str, ProgressStep] = {}
    for i, entry in enumerate(raw):
        where = f"state.progress[{i}]"
        if not isinstance(entry, dict):
            raise Malformed(f"{where}: must be a JSON object")
        known = {k: entry[k] for k in ("step", "percent", "timestamp", "message") if k in entry}
        known.setdefault("message", "")
        step: ProgressStep = _sub(ProgressStep, known, where)
        latest[step.step] = step  # dict keeps first-insertion order
    if len(latest) > MAX_PROGRESS_STEPS:
        raise Malformed(f"state.progress: {len(latest)} steps, v3 allows {MAX_PROGRESS_STEPS}")
    if len(latest) != len(raw):
        notes.append(
            f"state.progress: {len(raw)} reports collapsed into {len(latest)} steps "
            "(latest report per step kept)"
        )
    return tuple(latest.values())


def _rebuild_history(
    status: TaskStatus,
    created_at: datetime,
    created_by: str,
    approval: Approval | None,
    updated_at: datetime,
) -> tuple[StatusChange, ...]:
    """A v2.0 machine has no history: rebuild what the documents prove."""
    history = [StatusChange(TaskStatus.PENDING, created_at, created_by)]
    if approval is not None and approval.approved and status is not TaskStatus.PENDING:
        history.append(
            StatusChange(TaskStatus.APPROVED, approval.approved_at, approval.approved_by)
        )
    if history[-1].status is not status:
        history.append(StatusChange(status, updated_at, "", "reconstructed from v2 state"))
    return tuple(history)


def _check_v3(task: Task) -> None:
    """The daemon must be able to read what we write: round-trip through its parser."""
    try:
        Task.from_json(task.to_json())
    except ValidationError as exc:
        field = exc.field or ""
        root = field.split(".", 1)[0].split("[", 1)[0]
        source = _SOURCE.get(root, "v3 task")
        raise Malformed(f"{source}: {exc.message}") from None
