"""The JSON documents of LPMOS v3, the task state machine, and request parsers.

Everything here is pure: no I/O, no clock reads except :func:`utcnow`. Task operations
(:func:`approve`, :func:`record_progress`, ...) return a *new* :class:`Task` and never mutate
their input, because they run inside a read → fn → compare-and-swap loop that may call them
several times.

State machine (anything else raises ConflictError)::

    pending    -> approved, cancelled
    approved   -> installing, cancelled, failed
    installing -> completed, failed, cancelled
    failed     -> approved               (retry; resumes from the first unfinished step)

Size budget. Every rewrite of the task key is kept by etcd until compaction and a request is
limited to 1.5 MiB, so the task document must stay small whatever clients send: logs are
capped by line count *and* encoded bytes, history by entries *and* bytes, progress by step
count and message length. The worst case stays under 256 KiB (a test checks it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from json.encoder import encode_basestring
from typing import Any, Final, Literal, Self, TypeVar

from lpmosd.errors import ConflictError, ValidationError
from lpmosd.schema import normalize_mac, validate_idc, validate_sn

__all__ = [
    "ACTIVE_AGENT",
    "LOG_LEVELS",
    "MAX_HISTORY",
    "MAX_HISTORY_BYTES",
    "MAX_LOG_BYTES",
    "MAX_LOG_LINES",
    "MAX_LOG_LINE_CHARS",
    "MAX_PROGRESS_MESSAGE_CHARS",
    "MAX_PROGRESS_STEPS",
    "MAX_TASK_OPS",
    "STEP_RE",
    "TERMINAL",
    "TRANSITIONS",
    "Approval",
    "ApproveRequest",
    "CreateTaskRequest",
    "Disk",
    "Dmi",
    "FailRequest",
    "FirstBootRequest",
    "LogLevel",
    "LogRequest",
    "MachineMeta",
    "Nic",
    "ProgressRequest",
    "ProgressStep",
    "ServerEntry",
    "StatusChange",
    "Task",
    "TaskStatus",
    "append_logs",
    "approve",
    "cancel",
    "check_transition",
    "complete",
    "fail",
    "first_boot",
    "format_ts",
    "new_task",
    "parse_ssh_keys",
    "parse_ts",
    "record_progress",
    "retry",
    "sanitize_text",
    "transition",
    "utcnow",
    "valid_op_id",
]

# --------------------------------------------------------------------------- limits

MAX_LOG_LINES: Final = 500
#: Encoded (JSON, UTF-8) bytes all log lines may take; older lines are dropped first.
MAX_LOG_BYTES: Final = 96 * 1024
#: Characters of text in one log line (before the timestamp and level are added).
MAX_LOG_LINE_CHARS: Final = 2000
MAX_HISTORY: Final = 200
MAX_HISTORY_BYTES: Final = 32 * 1024
MAX_PROGRESS_STEPS: Final = 64
#: Progress messages are status-bar text; longer ones are truncated when stored.
MAX_PROGRESS_MESSAGE_CHARS: Final = 256
MAX_LOG_REQUEST_LINES: Final = 100
_MAX_TEXT: Final = 2000  # notes, reasons, request messages and log lines
_MAX_FIELD: Final = 128  # os_type, os_version, disk_layout, network_config, task_id
_MAX_ACTOR: Final = 128
_MAX_HISTORY_REASON: Final = 256
_MAX_META_STR: Final = 256
_MAX_META_ITEMS: Final = 256
_MAX_U63: Final = 2**63 - 1

STEP_RE: Final[re.Pattern[str]] = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}", re.ASCII)

# C0/C1 controls (tab kept), line/paragraph separators, and lone surrogates (which cannot
# be encoded as UTF-8 and would make to_json() fail later).
_STRIP_RE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Single-line identifiers refuse all of the above and tab too.
_BAD_IDENT_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

# ----------------------------------------------------------------------- timestamps

_TS_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def utcnow() -> datetime:
    """The current time, aware UTC, truncated to whole seconds (the stored precision)."""
    return datetime.now(UTC).replace(microsecond=0)


def format_ts(value: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with second precision: ``2026-01-30T12:00:00Z``.

    Raises ValueError for a naive datetime (a programming error, not bad input).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("format_ts needs an aware datetime")
    v = value.astimezone(UTC)
    # f-string, not strftime: %Y does not zero-pad years < 1000 on glibc.
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}Z"


def parse_ts(value: str, field: str = "timestamp") -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime, truncated to seconds.

    Any offset is accepted (and converted); fractions of a second are dropped, since Go
    writers may send nanoseconds. Anything else raises ValidationError naming ``field``.
    """
    m = _TS_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValidationError(
            f"{field} must be an RFC 3339 timestamp like 2026-01-30T12:00:00Z", field=field
        )
    y, mo, d, h, mi, s, z, sign, oh, om = m.groups()
    try:
        if z:
            tz: timezone = UTC
        else:
            if int(oh) > 23 or int(om) > 59:
                raise ValueError("offset out of range")
            off = timedelta(hours=int(oh), minutes=int(om))
            tz = timezone(-off if sign == "-" else off)
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationError(f"{field} is not a valid date and time", field=field) from None


def _norm_now(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


# ------------------------------------------------------------------------- text


def sanitize_text(text: str, max_chars: int = MAX_LOG_LINE_CHARS) -> str:
    """Remove control characters (tab kept) and truncate to ``max_chars`` (ending in '…')."""
    text = _STRIP_RE.sub("", text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def _json_len(text: str) -> int:
    """Bytes ``text`` takes as a JSON string (quotes included) in our UTF-8 output."""
    return len(encode_basestring(text).encode())


# ------------------------------------------------------------------ strict reading

_MISSING: Final[Any] = object()
_T = TypeVar("_T")


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Fields:
    """Reads one JSON object strictly, naming the full field path in every error."""

    def __init__(
        self,
        obj: object,
        where: str,
        *,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> None:
        if not isinstance(obj, Mapping):
            what = where or "body"
            raise ValidationError(f"{what} must be a JSON object", field=where or None)
        required = tuple(required)
        known = set(required) | set(optional)
        for key in obj:
            if key not in known:
                name = key if isinstance(key, str) else repr(key)
                raise ValidationError(f"unknown field {name!r}", field=_path(where, name))
        for key in required:
            if key not in obj:
                raise ValidationError(f"missing field {key!r}", field=_path(where, key))
        self._obj: Mapping[Any, object] = obj
        self._where = where

    def path(self, key: str) -> str:
        return _path(self._where, key)

    def _absent(self, key: str, default: _T) -> _T:
        if default is _MISSING:
            raise ValidationError(f"missing field {key!r}", field=self.path(key))
        return default

    def has(self, key: str) -> bool:
        return key in self._obj

    def raw(self, key: str) -> object:
        return self._obj[key]

    def get_str(
        self,
        key: str,
        *,
        default: str = _MISSING,
        max_len: int | None = None,
        nonempty: bool = False,
        ident: bool = False,
    ) -> str:
        """A string; ``ident`` refuses control characters (for single-line names)."""
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, str):
            raise ValidationError(f"{p} must be a string", field=p)
        if max_len is not None and len(value) > max_len:
            raise ValidationError(f"{p} must be at most {max_len} characters", field=p)
        if nonempty and not value:
            raise ValidationError(f"{p} must not be empty", field=p)
        bad = _BAD_IDENT_RE if ident else _SURROGATE_RE
        if bad.search(value):
            raise ValidationError(f"{p} contains forbidden characters", field=p)
        return value

    def get_opt_str(self, key: str, *, max_len: int | None = None) -> str | None:
        """A string or null (missing counts as null)."""
        if self._obj.get(key) is None:
            return None
        return self.get_str(key, max_len=max_len)

    def get_int(self, key: str, *, lo: int, hi: int, default: int = _MISSING) -> int:
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        p = self.path(key)
        # bool is an int subclass; true is not 1 here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{p} must be an integer", field=p)
        if not lo <= value <= hi:
            raise ValidationError(f"{p} must be between {lo} and {hi}", field=p)
        return value

    def get_opt_int(self, key: str, *, lo: int, hi: int) -> int | None:
        if self._obj.get(key) is None:
            return None
        return self.get_int(key, lo=lo, hi=hi)

    def get_bool(self, key: str, *, default: bool = _MISSING) -> bool:
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        if not isinstance(value, bool):
            raise ValidationError(f"{self.path(key)} must be true or false", field=self.path(key))
        return value

    def get_ts(self, key: str) -> datetime:
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, str):
            raise ValidationError(f"{p} must be an RFC 3339 timestamp string", field=p)
        return parse_ts(value, p)

    def get_list(self, key: str, *, max_items: int | None = None) -> list[object]:
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, list):
            raise ValidationError(f"{p} must be a list", field=p)
        if max_items is not None and len(value) > max_items:
            raise ValidationError(f"{p} must have at most {max_items} items", field=p)
        return value

    def get_status(self, key: str) -> TaskStatus:
        value = self._obj[key]
        if isinstance(value, str) and value in _STATUS_VALUES:
            return TaskStatus(value)
        p = self.path(key)
        raise ValidationError(f"{p} must be one of {', '.join(_STATUS_VALUES)}", field=p)

    def rename(self, key: str, fn: Callable[[object], str]) -> str:
        """Run a schema validator on a field, re-labelling its error with our path."""
        try:
            return fn(self._obj[key])
        except ValidationError as exc:
            raise ValidationError(exc.message, field=self.path(key)) from None


def _load_json(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers.
        raise ValidationError("body is not valid JSON", field=None) from None


def _dump_json(obj: object) -> bytes:
    # ensure_ascii=False: UTF-8 bytes, so sizes measured here are the stored sizes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _Document:
    """JSON (bytes) in and out for the document dataclasses."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped dict of this document."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """Parse a JSON-shaped object strictly; ValidationError names the bad field."""
        raise NotImplementedError

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON."""
        return _dump_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse JSON text strictly (see :meth:`from_dict`)."""
        return cls.from_dict(_load_json(data))


# -------------------------------------------------------------------- state machine


class TaskStatus(StrEnum):
    """The status of a task (and of its server entry)."""

    PENDING = "pending"
    APPROVED = "approved"
    INSTALLING = "installing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_S = TaskStatus
_STATUS_VALUES: Final = tuple(s.value for s in TaskStatus)
TRANSITIONS: Final[Mapping[TaskStatus, frozenset[TaskStatus]]] = {
    _S.PENDING: frozenset({_S.APPROVED, _S.CANCELLED}),
    _S.APPROVED: frozenset({_S.INSTALLING, _S.CANCELLED, _S.FAILED}),
    _S.INSTALLING: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.FAILED: frozenset({_S.APPROVED}),  # retry
    _S.COMPLETED: frozenset(),
    _S.CANCELLED: frozenset(),
}
#: Finished tasks: they may be deleted, or replaced by a new create.
TERMINAL: Final[frozenset[TaskStatus]] = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
#: Statuses in which the agent's lease matters: losing it fails the task.
ACTIVE_AGENT: Final[frozenset[TaskStatus]] = frozenset({_S.APPROVED, _S.INSTALLING})


def check_transition(frm: TaskStatus, to: TaskStatus) -> None:
    """Raise ConflictError(field="status") unless ``frm → to`` is allowed."""
    if to not in TRANSITIONS[frm]:
        raise ConflictError(f"cannot change task status from {frm} to {to}", field="status")


# ------------------------------------------------------------------------ documents


@dataclass(frozen=True, slots=True)
class ProgressStep(_Document):
    """Progress of one named install step (one entry per step name)."""

    step: str
    percent: int
    timestamp: datetime
    message: str

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {
            "step": self.step,
            "percent": self.percent,
            "timestamp": format_ts(self.timestamp),
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=("step", "percent", "timestamp", "message"))
        return cls(
            step=f.get_str("step", max_len=64, nonempty=True, ident=True),
            percent=f.get_int("percent", lo=0, hi=100),
            timestamp=f.get_ts("timestamp"),
            message=f.get_str("message"),
        )


@dataclass(frozen=True, slots=True)
class StatusChange(_Document):
    """One entry of a task's status history; actor and reason are emitted only when set."""

    status: TaskStatus
    timestamp: datetime
    actor: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        d: dict[str, Any] = {"status": self.status.value, "timestamp": format_ts(self.timestamp)}
        if self.actor:
            d["actor"] = self.actor
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=("status", "timestamp"), optional=("actor", "reason"))
        return cls(
            status=f.get_status("status"),
            timestamp=f.get_ts("timestamp"),
            actor=f.get_str("actor", default=""),
            reason=f.get_str("reason", default=""),
        )

    def _json_size(self) -> int:
        # Exact size of to_json() without building it; history trimming runs this for
        # every entry on every write. A test pins it to the real encoding.
        n = 28 + len(self.status.value) + 20  # {"status":"","timestamp":""} + values
        if self.actor:
            n += 9 + _json_len(self.actor)  # ,"actor":
        if self.reason:
            n += 10 + _json_len(self.reason)  # ,"reason":
        return n


@dataclass(frozen=True, slots=True)
class Approval(_Document):
    """Who approved a task, when, and why."""

    approved: bool
    approved_by: str
    approved_at: datetime
    notes: str

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {
            "approved": self.approved,
            "approved_by": self.approved_by,
            "approved_at": format_ts(self.approved_at),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=("approved", "approved_by", "approved_at", "notes"))
        return cls(
            approved=f.get_bool("approved"),
            approved_by=f.get_str("approved_by"),
            approved_at=f.get_ts("approved_at"),
            notes=f.get_str("notes"),
        )


_TASK_REQUIRED: Final = (
    "task_id",
    "sn",
    "mac",
    "os_type",
    "os_version",
    "disk_layout",
    "network_config",
    "status",
    "status_history",
    "progress",
    "logs",
    "approval",
    "created_at",
    "updated_at",
    "created_by",
)
# Ours, not the guide's; optional on input so guide-shaped documents parse.
_TASK_EXTRAS: Final = (
    "idc",
    "logs_dropped",
    "resume_from",
    "error",
    "ops",
    "netboot",
    "ssh_authorized_keys",
    "first_boot_at",
)
#: At most this many keys for root, each one line of at most this many characters.
MAX_SSH_KEYS: Final = 32
MAX_SSH_KEY_CHARS: Final = 8192
_SSH_KEY_RE: Final = re.compile(
    r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
    r"@openssh\.com) [A-Za-z0-9+/]+=*( [^\r\n]*)?$"
)


def parse_ssh_keys(f: _Fields, key: str) -> tuple[str, ...]:
    """``ssh_authorized_keys``: a list of OpenSSH public key lines (absent = none)."""
    if not f.has(key) or f.raw(key) is None:
        return ()
    out: list[str] = []
    for i, item in enumerate(f.get_list(key, max_items=MAX_SSH_KEYS)):
        p = f"{f.path(key)}[{i}]"
        if not isinstance(item, str):
            raise ValidationError(f"{p} must be a string", field=p)
        line = item.strip()
        if len(line) > MAX_SSH_KEY_CHARS or not _SSH_KEY_RE.match(line):
            raise ValidationError(
                f"{p} must be one OpenSSH public key line ('ssh-ed25519 AAAA... comment')",
                field=p,
            )
        out.append(line)
    return tuple(out)


#: Operation ids a task document remembers (see :attr:`Task.ops`).
MAX_TASK_OPS: Final = 16
_OP_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Task(_Document):
    """The merged task document at ``/os/{idc}/machines/{sn}/task``.

    ``idc`` is empty when parsed from a guide-shaped document without it (the key has it).
    """

    task_id: str
    idc: str
    sn: str
    mac: str
    os_type: str
    os_version: str = ""
    disk_layout: str = "auto"
    network_config: str = "dhcp"
    status: TaskStatus
    status_history: tuple[StatusChange, ...] = ()
    progress: tuple[ProgressStep, ...] = ()
    logs: tuple[str, ...] = ()
    logs_dropped: int = 0
    approval: Approval | None = None
    created_at: datetime
    updated_at: datetime
    created_by: str = ""
    #: After a retry: the step the agent should resume from (the first unfinished one).
    resume_from: str | None = None
    #: The last failure reason.
    error: str | None = None
    #: Public keys for root on the installed system (built-in plans).
    ssh_authorized_keys: tuple[str, ...] = ()
    #: When the installed system reported its first boot ("deployed means booted").
    first_boot_at: datetime | None = None
    #: Ids of the latest writes applied to this document (oldest first, at most
    #: MAX_TASK_OPS). A writer whose outcome was ambiguous looks for its id here rather
    #: than comparing values, so a write is never applied twice. Stored, not shown by
    #: the API (:meth:`to_dict`).
    ops: tuple[str, ...] = ()
    #: Whether the machine PXE-boots the installer: true on create and retry; the Txn that
    #: completes the task turns it off, so an installed machine boots its disk.
    netboot: bool = True

    def with_op(self, op_id: str) -> Self:
        """This task with ``op_id`` remembered as applied."""
        return replace(self, ops=(*self.ops, op_id)[-MAX_TASK_OPS:])

    def to_json(self) -> bytes:
        """The stored document: the API's fields plus the operation ids."""
        d = self.to_dict()
        if self.ops:
            d["ops"] = list(self.ops)
        return _dump_json(d)

    def to_dict(self) -> dict[str, Any]:
        """The guide's field order, then our extras."""
        return {
            "task_id": self.task_id,
            "sn": self.sn,
            "mac": self.mac,
            "os_type": self.os_type,
            "os_version": self.os_version,
            "disk_layout": self.disk_layout,
            "network_config": self.network_config,
            "status": self.status.value,
            "status_history": [c.to_dict() for c in self.status_history],
            "progress": [p.to_dict() for p in self.progress],
            "logs": list(self.logs),
            "approval": None if self.approval is None else self.approval.to_dict(),
            "created_at": format_ts(self.created_at),
            "updated_at": format_ts(self.updated_at),
            "created_by": self.created_by,
            "idc": self.idc,
            "logs_dropped": self.logs_dropped,
            "resume_from": self.resume_from,
            "error": self.error,
            "netboot": self.netboot,
            "ssh_authorized_keys": list(self.ssh_authorized_keys),
            "first_boot_at": None if self.first_boot_at is None else format_ts(self.first_boot_at),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`; the guide's example task parses as is."""
        f = _Fields(obj, "", required=_TASK_REQUIRED, optional=_TASK_EXTRAS)
        idc = f.get_str("idc", default="")
        if idc:
            validate_idc(idc)
        logs: list[str] = []
        for i, line in enumerate(f.get_list("logs")):
            if not isinstance(line, str) or _SURROGATE_RE.search(line):
                raise ValidationError(f"logs[{i}] must be a string", field=f"logs[{i}]")
            logs.append(line)
        approval_raw = f.raw("approval")
        first_boot_raw = f.raw("first_boot_at") if f.has("first_boot_at") else None
        status = f.get_status("status")
        return cls(
            task_id=f.get_str("task_id", nonempty=True, ident=True),
            idc=idc,
            sn=f.rename("sn", validate_sn),
            mac=f.rename("mac", normalize_mac),
            os_type=f.get_str("os_type"),
            os_version=f.get_str("os_version"),
            disk_layout=f.get_str("disk_layout"),
            network_config=f.get_str("network_config"),
            status=status,
            status_history=tuple(
                StatusChange._parse(c, f"status_history[{i}]")
                for i, c in enumerate(f.get_list("status_history"))
            ),
            progress=tuple(
                ProgressStep._parse(p, f"progress[{i}]")
                for i, p in enumerate(f.get_list("progress"))
            ),
            logs=tuple(logs),
            logs_dropped=f.get_int("logs_dropped", lo=0, hi=_MAX_U63, default=0),
            approval=None if approval_raw is None else Approval._parse(approval_raw, "approval"),
            created_at=f.get_ts("created_at"),
            updated_at=f.get_ts("updated_at"),
            created_by=f.get_str("created_by"),
            resume_from=f.get_opt_str("resume_from"),
            error=f.get_opt_str("error"),
            ssh_authorized_keys=parse_ssh_keys(f, "ssh_authorized_keys"),
            first_boot_at=None if first_boot_raw is None else f.get_ts("first_boot_at"),
            ops=_parse_ops(f.get_list("ops", max_items=MAX_TASK_OPS) if f.has("ops") else []),
            # Documents written before the flag existed: a completed task boots its disk.
            netboot=f.get_bool("netboot", default=status is not TaskStatus.COMPLETED),
        )


def _parse_ops(raw: list[object]) -> tuple[str, ...]:
    ops: list[str] = []
    for i, op in enumerate(raw):
        if not isinstance(op, str) or not _OP_ID_RE.fullmatch(op):
            raise ValidationError(f"ops[{i}] must be an operation id", field=f"ops[{i}]")
        ops.append(op)
    return tuple(ops)


def valid_op_id(value: str) -> bool:
    """Whether ``value`` can be an operation id (1-80 of letters, digits, ``_.:-``)."""
    return _OP_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerEntry(_Document):
    """The value of ``/os/{idc}/servers/{sn}``: one server of the IDC directory.

    The guide's minimal value (``{"status": ..., "added_at": ...}``) parses; missing fields
    default to empty, and ``updated_at`` to ``added_at``.
    """

    sn: str
    mac: str
    status: TaskStatus
    added_at: datetime
    updated_at: datetime
    task_id: str

    @classmethod
    def for_task(cls, task: Task, *, added_at: datetime | None = None) -> Self:
        """The entry mirroring ``task`` (``added_at`` defaults to the task's creation)."""
        return cls(
            sn=task.sn,
            mac=task.mac,
            status=task.status,
            added_at=task.created_at if added_at is None else added_at,
            updated_at=task.updated_at,
            task_id=task.task_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {
            "sn": self.sn,
            "mac": self.mac,
            "status": self.status.value,
            "added_at": format_ts(self.added_at),
            "updated_at": format_ts(self.updated_at),
            "task_id": self.task_id,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        f = _Fields(
            obj,
            "",
            required=("status", "added_at"),
            optional=("sn", "mac", "updated_at", "task_id"),
        )
        sn = f.get_str("sn", default="")
        if sn:
            sn = f.rename("sn", validate_sn)
        mac = f.get_str("mac", default="")
        if mac:
            mac = f.rename("mac", normalize_mac)
        added_at = f.get_ts("added_at")
        return cls(
            sn=sn,
            mac=mac,
            status=f.get_status("status"),
            added_at=added_at,
            updated_at=f.get_ts("updated_at") if f.has("updated_at") else added_at,
            task_id=f.get_str("task_id", default="", ident=True),
        )


@dataclass(frozen=True, slots=True)
class Disk(_Document):
    """One block device reported by the agent."""

    name: str
    size_bytes: int
    model: str
    rotational: bool

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "model": self.model,
            "rotational": self.rotational,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=("name", "size_bytes", "model", "rotational"))
        return cls(
            name=f.get_str("name", max_len=_MAX_META_STR, nonempty=True, ident=True),
            size_bytes=f.get_int("size_bytes", lo=0, hi=_MAX_U63),
            model=f.get_str("model", max_len=_MAX_META_STR, ident=True),
            rotational=f.get_bool("rotational"),
        )


@dataclass(frozen=True, slots=True)
class Nic(_Document):
    """One network interface reported by the agent (``speed_mbps`` None when unknown)."""

    name: str
    mac: str
    speed_mbps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {"name": self.name, "mac": self.mac, "speed_mbps": self.speed_mbps}

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=("name", "mac"), optional=("speed_mbps",))
        return cls(
            name=f.get_str("name", max_len=_MAX_META_STR, nonempty=True, ident=True),
            mac=f.rename("mac", normalize_mac),
            speed_mbps=f.get_opt_int("speed_mbps", lo=0, hi=10_000_000),
        )


@dataclass(frozen=True, slots=True)
class Dmi(_Document):
    """DMI/SMBIOS identity of the machine; each part None when unknown."""

    vendor: str | None = None
    product: str | None = None
    serial: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {"vendor": self.vendor, "product": self.product, "serial": self.serial}

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = _Fields(obj, where, required=(), optional=("vendor", "product", "serial"))
        return cls(
            vendor=f.get_opt_str("vendor", max_len=_MAX_META_STR),
            product=f.get_opt_str("product", max_len=_MAX_META_STR),
            serial=f.get_opt_str("serial", max_len=_MAX_META_STR),
        )


_META_FIELDS: Final = ("cpu_model", "cpu_cores", "memory_bytes", "disks", "nics")


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineMeta(_Document):
    """Hardware facts reported by the agent: the value of ``/os/{idc}/machines/{sn}/meta``."""

    cpu_model: str
    cpu_cores: int
    memory_bytes: int
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    dmi: Dmi = Dmi()
    reported_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """See :class:`_Document`."""
        return {
            "cpu_model": self.cpu_model,
            "cpu_cores": self.cpu_cores,
            "memory_bytes": self.memory_bytes,
            "disks": [d.to_dict() for d in self.disks],
            "nics": [n.to_dict() for n in self.nics],
            "dmi": self.dmi.to_dict(),
            "reported_at": format_ts(self.reported_at),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`_Document`; ``dmi`` may be missing."""
        return cls._parse(obj, None)

    @classmethod
    def from_report(cls, obj: object, *, now: datetime) -> Self:
        """Parse an agent's report: as :meth:`from_dict`, but ``reported_at`` is ours (``now``).

        The agent's clock is not trusted, so a ``reported_at`` field is refused.
        """
        return cls._parse(obj, _norm_now(now))

    @classmethod
    def _parse(cls, obj: object, reported_at: datetime | None) -> Self:
        optional = ("dmi",) if reported_at is not None else ("dmi", "reported_at")
        required = _META_FIELDS if reported_at is not None else (*_META_FIELDS, "reported_at")
        f = _Fields(obj, "", required=required, optional=optional)
        disks = f.get_list("disks", max_items=_MAX_META_ITEMS)
        nics = f.get_list("nics", max_items=_MAX_META_ITEMS)
        return cls(
            cpu_model=f.get_str("cpu_model", max_len=_MAX_META_STR, ident=True),
            cpu_cores=f.get_int("cpu_cores", lo=0, hi=1_000_000),
            memory_bytes=f.get_int("memory_bytes", lo=0, hi=_MAX_U63),
            disks=tuple(Disk._parse(d, f"disks[{i}]") for i, d in enumerate(disks)),
            nics=tuple(Nic._parse(n, f"nics[{i}]") for i, n in enumerate(nics)),
            dmi=Dmi._parse(f.raw("dmi"), "dmi") if f.has("dmi") else Dmi(),
            reported_at=f.get_ts("reported_at") if reported_at is None else reported_at,
        )


# ------------------------------------------------------------------------- requests

LogLevel = Literal["INFO", "WARN", "ERROR", "DEBUG"]
_LEVELS: Final[Mapping[str, LogLevel]] = {
    "INFO": "INFO",
    "WARN": "WARN",
    "ERROR": "ERROR",
    "DEBUG": "DEBUG",
}
LOG_LEVELS: Final[frozenset[str]] = frozenset(_LEVELS)


def _level(value: object, field: str | None = "level") -> LogLevel:
    if not isinstance(value, str) or value not in _LEVELS:
        raise ValidationError(f"level must be one of {', '.join(_LEVELS)}", field=field)
    return _LEVELS[value]


def _step(value: object, field: str = "step") -> str:
    if not isinstance(value, str) or STEP_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{field} must be 1-64 of a-z, 0-9, '_', '.', '-', starting with a-z or 0-9",
            field=field,
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTaskRequest:
    """Body of ``POST /api/v1/tasks``; ``mac`` is normalised to lower-case colon form."""

    idc: str
    sn: str
    mac: str
    os_type: str
    os_version: str = ""
    disk_layout: str = "auto"
    network_config: str = "dhcp"
    ssh_authorized_keys: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly: unknown fields, wrong types and bad values raise ValidationError."""
        f = _Fields(
            obj,
            "",
            required=("idc", "sn", "mac", "os_type"),
            optional=("os_version", "disk_layout", "network_config", "ssh_authorized_keys"),
        )
        return cls(
            idc=validate_idc(f.raw("idc")),
            sn=validate_sn(f.raw("sn")),
            mac=normalize_mac(f.raw("mac")),
            os_type=f.get_str("os_type", max_len=_MAX_FIELD, nonempty=True, ident=True),
            os_version=f.get_str("os_version", default="", max_len=_MAX_FIELD, ident=True),
            disk_layout=f.get_str(
                "disk_layout", default="auto", max_len=_MAX_FIELD, nonempty=True, ident=True
            ),
            network_config=f.get_str(
                "network_config", default="dhcp", max_len=_MAX_FIELD, nonempty=True, ident=True
            ),
            ssh_authorized_keys=parse_ssh_keys(f, "ssh_authorized_keys"),
        )


@dataclass(frozen=True, slots=True)
class FirstBootRequest:
    """Body of the installed system's first-boot call: its hostname (optional)."""

    hostname: str = ""

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; ValidationError names the field."""
        f = _Fields(obj, "", required=(), optional=("hostname",))
        return cls(hostname=f.get_str("hostname", default="", max_len=253, ident=True))


@dataclass(frozen=True, slots=True)
class ApproveRequest:
    """Body of an approve call; ``approved_by`` None means "the authenticated user"."""

    approved_by: str | None = None
    notes: str = ""

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly (see :meth:`CreateTaskRequest.from_obj`)."""
        f = _Fields(obj, "", required=(), optional=("approved_by", "notes"))
        approved_by = None
        if f.get_opt_str("approved_by") is not None:
            approved_by = f.get_str("approved_by", max_len=_MAX_ACTOR, nonempty=True, ident=True)
        return cls(
            approved_by=approved_by,
            notes=sanitize_text(f.get_str("notes", default="", max_len=_MAX_TEXT), _MAX_TEXT),
        )


@dataclass(frozen=True, slots=True)
class ProgressRequest:
    """Body of an agent progress report."""

    step: str
    percent: int
    message: str = ""

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; ``message`` has control characters removed."""
        f = _Fields(obj, "", required=("step", "percent"), optional=("message",))
        return cls(
            step=_step(f.raw("step")),
            percent=f.get_int("percent", lo=0, hi=100),
            message=sanitize_text(f.get_str("message", default="", max_len=_MAX_TEXT), _MAX_TEXT),
        )


@dataclass(frozen=True, slots=True)
class LogRequest:
    """Body of an agent log call: ``{"line": str}`` or ``{"lines": [str, ...]}``."""

    lines: tuple[str, ...]
    level: LogLevel = "INFO"

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; exactly one of ``line``/``lines``, at most 100 lines."""
        f = _Fields(obj, "", required=(), optional=("line", "lines", "level"))
        if f.has("line") == f.has("lines"):
            raise ValidationError("give exactly one of 'line' or 'lines'", field="lines")
        if f.has("line"):
            lines = [f.get_str("line", max_len=MAX_LOG_LINE_CHARS)]
        else:
            raw = f.get_list("lines", max_items=MAX_LOG_REQUEST_LINES)
            if not raw:
                raise ValidationError("lines must not be empty", field="lines")
            lines = []
            for i, line in enumerate(raw):
                p = f"lines[{i}]"
                if not isinstance(line, str):
                    raise ValidationError(f"{p} must be a string", field=p)
                if len(line) > MAX_LOG_LINE_CHARS:
                    raise ValidationError(
                        f"{p} must be at most {MAX_LOG_LINE_CHARS} characters", field=p
                    )
                lines.append(line)
        level = _level(f.raw("level")) if f.has("level") else "INFO"
        return cls(lines=tuple(sanitize_text(line) for line in lines), level=level)


@dataclass(frozen=True, slots=True)
class FailRequest:
    """Body of an agent failure report."""

    reason: str

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; ``reason`` must be non-empty."""
        f = _Fields(obj, "", required=("reason",))
        reason = sanitize_text(f.get_str("reason", max_len=_MAX_TEXT, nonempty=True), _MAX_TEXT)
        if not reason.strip():
            raise ValidationError("reason must not be blank", field="reason")
        return cls(reason=reason)


# ----------------------------------------------------------------------- operations


def _actor(actor: str) -> str:
    return sanitize_text(actor, _MAX_ACTOR)


def _cap_logs(logs: tuple[str, ...], dropped: int) -> tuple[tuple[str, ...], int]:
    """Keep the newest lines within MAX_LOG_LINES and MAX_LOG_BYTES; count the rest."""
    keep = 0
    size = 2  # []
    for line in reversed(logs):
        cost = _json_len(line) + 1  # the comma
        if keep == MAX_LOG_LINES or size + cost > MAX_LOG_BYTES:
            break
        keep += 1
        size += cost
    if keep == len(logs):
        return logs, dropped
    return logs[len(logs) - keep :], dropped + len(logs) - keep


def _cap_history(history: tuple[StatusChange, ...]) -> tuple[StatusChange, ...]:
    """Keep the first entry (creation) and the newest, within MAX_HISTORY and its byte cap."""
    if len(history) <= 1:
        return history
    first, rest = history[0], history[1:]
    size = 2 + first._json_size() + 1
    keep = 0
    for entry in reversed(rest):
        cost = entry._json_size() + 1
        if keep == MAX_HISTORY - 1 or size + cost > MAX_HISTORY_BYTES:
            break
        keep += 1
        size += cost
    if keep == len(rest):
        return history
    return (first, *rest[len(rest) - keep :])


def _with_logs(task: Task, texts: Iterable[str], level: LogLevel, now: datetime) -> Task:
    ts = format_ts(now)
    new = tuple(f"{ts} [{level}] {sanitize_text(t)}" for t in texts)
    logs, dropped = _cap_logs(task.logs + new, task.logs_dropped)
    return replace(task, logs=logs, logs_dropped=dropped, updated_at=now)


def _transition(
    task: Task,
    to: TaskStatus,
    *,
    now: datetime,
    actor: str,
    reason: str,
    log: str | None = None,
    level: LogLevel = "INFO",
    **changes: Any,
) -> Task:
    check_transition(task.status, to)
    now = _norm_now(now)
    actor = _actor(actor)
    reason = sanitize_text(reason, _MAX_TEXT)
    change = StatusChange(to, now, actor, sanitize_text(reason, _MAX_HISTORY_REASON))
    if log is None:
        log = f"Status {task.status} -> {to}"
        if actor:
            log += f" by {actor}"
        if reason:
            log += f": {reason}"
    task = replace(
        task, status=to, status_history=_cap_history((*task.status_history, change)), **changes
    )
    return _with_logs(task, [log], level, now)


def new_task(req: CreateTaskRequest, *, task_id: str, now: datetime, actor: str) -> Task:
    """A new pending task for ``req``, created by ``actor``."""
    now = _norm_now(now)
    actor = _actor(actor)
    task = Task(
        task_id=task_id,
        idc=req.idc,
        sn=req.sn,
        mac=req.mac,
        os_type=req.os_type,
        os_version=req.os_version,
        disk_layout=req.disk_layout,
        network_config=req.network_config,
        ssh_authorized_keys=req.ssh_authorized_keys,
        status=TaskStatus.PENDING,
        status_history=(StatusChange(TaskStatus.PENDING, now, actor),),
        created_at=now,
        updated_at=now,
        created_by=actor,
    )
    return _with_logs(task, [f"Task created for {req.sn}"], "INFO", now)


def transition(task: Task, to: TaskStatus, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Move ``task`` to ``to`` (ConflictError if not allowed), recording history and a log."""
    return _transition(task, TaskStatus(to), now=now, actor=actor, reason=reason)


def approve(task: Task, *, approved_by: str, notes: str = "", now: datetime) -> Task:
    """Approve a pending task (a failed one goes through :func:`retry` instead)."""
    if task.status is not TaskStatus.PENDING:
        raise ConflictError(
            f"cannot change task status from {task.status} to approved: only a pending task "
            "can be approved (retry a failed one)",
            field="status",
        )
    now = _norm_now(now)
    approval = Approval(True, _actor(approved_by), now, sanitize_text(notes, _MAX_TEXT))
    return _transition(
        task, TaskStatus.APPROVED, now=now, actor=approved_by, reason="", approval=approval
    )


def cancel(task: Task, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Cancel a task that has not finished."""
    return _transition(task, TaskStatus.CANCELLED, now=now, actor=actor, reason=reason)


def _first_unfinished(progress: tuple[ProgressStep, ...]) -> str | None:
    return next((p.step for p in progress if p.percent < 100), None)


def retry(task: Task, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Re-approve a failed task; it resumes from its first unfinished step."""
    return _transition(
        task,
        TaskStatus.APPROVED,
        now=now,
        actor=actor,
        reason=reason or "retry",
        resume_from=_first_unfinished(task.progress),
        error=None,
        netboot=True,
    )


def record_progress(
    task: Task,
    step: str,
    percent: int,
    message: str = "",
    *,
    now: datetime,
    actor: str = "agent",
) -> Task:
    """Record ``percent`` for ``step`` (one entry per step, updated in place).

    The first progress on an approved task moves it to installing. A step at 100 % does not
    complete the task; :func:`complete` does. Only a step's start and its reaching 100 %
    are logged, so frequent reports do not push real log lines out of the capped log.
    """
    if task.status not in ACTIVE_AGENT:
        raise ConflictError(
            f"cannot record progress on a task in status {task.status}", field="status"
        )
    _step(step)
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValidationError("percent must be an integer between 0 and 100", field="percent")
    now = _norm_now(now)
    entry = ProgressStep(step, percent, now, sanitize_text(message, MAX_PROGRESS_MESSAGE_CHARS))
    index = next((i for i, p in enumerate(task.progress) if p.step == step), None)
    if index is None:
        if len(task.progress) >= MAX_PROGRESS_STEPS:
            raise ValidationError(
                f"a task has at most {MAX_PROGRESS_STEPS} progress steps", field="step"
            )
        progress = (*task.progress, entry)
        log: str | None = f"{step} {'done' if percent >= 100 else 'started'} ({percent}%)"
    else:
        progress = (*task.progress[:index], entry, *task.progress[index + 1 :])
        done_now = percent >= 100 and task.progress[index].percent < 100
        log = f"{step} done ({percent}%)" if done_now else None
    if log is not None and entry.message:
        log += f": {entry.message}"
    if task.status is TaskStatus.APPROVED:
        task = _transition(task, TaskStatus.INSTALLING, now=now, actor=actor, reason="")
    task = replace(task, progress=progress, updated_at=now)
    return task if log is None else _with_logs(task, [log], "INFO", now)


def append_logs(
    task: Task, lines: Iterable[str], *, level: LogLevel = "INFO", now: datetime
) -> Task:
    """Append sanitised lines as ``"<ts> [LEVEL] text"``, keeping the newest within the caps."""
    return _with_logs(task, list(lines), _level(level, None), _norm_now(now))


def complete(task: Task, *, now: datetime, actor: str = "agent") -> Task:
    """Mark an installing task completed."""
    return _transition(
        task,
        TaskStatus.COMPLETED,
        now=now,
        actor=actor,
        reason="",
        log="Installation completed",
        resume_from=None,
        netboot=False,
    )


def first_boot(task: Task, *, now: datetime, hostname: str = "") -> Task:
    """Record that the installed system booted (once, on a completed task)."""
    if task.status is not TaskStatus.COMPLETED:
        raise ConflictError(
            f"task is {task.status}: only a completed install can report its first boot",
            field="status",
        )
    if task.first_boot_at is not None:
        raise ConflictError("the first boot was already reported", field="first_boot_at")
    now = _norm_now(now)
    line = "First boot of the installed system"
    if hostname:
        line += f" (hostname {hostname})"
    return _with_logs(replace(task, first_boot_at=now), [line], "INFO", now)


def _last_step(progress: tuple[ProgressStep, ...]) -> str | None:
    """The most recently updated step (the later one on a timestamp tie)."""
    best: ProgressStep | None = None
    for p in progress:
        if best is None or p.timestamp >= best.timestamp:
            best = p
    return None if best is None else best.step


def fail(task: Task, reason: str, *, now: datetime, actor: str) -> Task:
    """Fail an approved or installing task, keeping ``reason`` in ``error`` and the log."""
    reason = sanitize_text(reason, _MAX_TEXT) or "no reason given"
    step = _last_step(task.progress)
    at = f" at step {step}" if step else ""
    by = f" by {_actor(actor)}" if actor else ""
    return _transition(
        task,
        TaskStatus.FAILED,
        now=now,
        actor=actor,
        reason=reason,
        log=f"Task failed{at}{by}: {reason}",
        level="ERROR",
        error=reason,
    )
