"""The JSON documents of LPMOS v3: task, server entry, machine meta, and their size limits.

Everything here is pure. Size budget: every rewrite of the task key is kept by etcd until
compaction and a request is limited to 1.5 MiB, so the task document must stay small whatever
clients send: logs are capped by line count *and* encoded bytes, history by entries *and*
bytes, progress by step count and message length (:mod:`lpmosd.lifecycle` applies the caps).
The worst case stays under 256 KiB (a test checks it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Self

from lpmosd.errors import ValidationError
from lpmosd.fields import SURROGATE_RE, Document, Fields, dump_json, json_len
from lpmosd.schema import normalize_mac, validate_idc, validate_sn
from lpmosd.timestamps import format_ts, norm_now

__all__ = [
    "MAX_ACTOR_CHARS",
    "MAX_FIELD_CHARS",
    "MAX_HISTORY",
    "MAX_HISTORY_BYTES",
    "MAX_HISTORY_REASON_CHARS",
    "MAX_LOG_BYTES",
    "MAX_LOG_CHUNKS",
    "MAX_LOG_LINES",
    "MAX_LOG_LINE_CHARS",
    "MAX_META_ITEMS",
    "MAX_META_STR",
    "MAX_PROGRESS_MESSAGE_CHARS",
    "MAX_PROGRESS_STEPS",
    "MAX_SPEED_MBPS",
    "MAX_SSH_KEYS",
    "MAX_SSH_KEY_CHARS",
    "MAX_TASK_OPS",
    "MAX_TEXT_CHARS",
    "Approval",
    "Disk",
    "Dmi",
    "LogChunk",
    "MachineMeta",
    "Nic",
    "ProgressStep",
    "ServerEntry",
    "StatusChange",
    "Task",
    "TaskStatus",
    "parse_ssh_keys",
    "valid_op_id",
]

# --------------------------------------------------------------------------- limits

MAX_LOG_LINES: Final = 500
#: Encoded (JSON, UTF-8) bytes all log lines may take; older lines are dropped first.
MAX_LOG_BYTES: Final = 96 * 1024
#: Log chunks (appended batches, see :mod:`lpmosd.tasklogs`) a task keeps: bounds the
#: chunk list in the task document (~16 bytes each) when agents send one line at a time,
#: and the deletes one write may make (with its other ops, within etcd's 128 per Txn).
MAX_LOG_CHUNKS: Final = 100
#: Characters of text in one log line (before the timestamp and level are added).
MAX_LOG_LINE_CHARS: Final = 2000
MAX_HISTORY: Final = 200
MAX_HISTORY_BYTES: Final = 32 * 1024
MAX_PROGRESS_STEPS: Final = 64
#: Progress messages are status-bar text; longer ones are truncated when stored.
MAX_PROGRESS_MESSAGE_CHARS: Final = 256
MAX_TEXT_CHARS: Final = 2000  # notes, reasons, request messages and log lines
MAX_FIELD_CHARS: Final = 128  # os_type, os_version, disk_layout, network_config, task_id
MAX_ACTOR_CHARS: Final = 128
MAX_HISTORY_REASON_CHARS: Final = 256
MAX_META_STR: Final = 256
MAX_META_ITEMS: Final = 256
MAX_SPEED_MBPS: Final = 10_000_000
_MAX_U63: Final = 2**63 - 1


class TaskStatus(StrEnum):
    """The status of a task (and of its server entry); :mod:`lpmosd.lifecycle` moves it."""

    PENDING = "pending"
    APPROVED = "approved"
    INSTALLING = "installing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# ------------------------------------------------------------------------ documents


@dataclass(frozen=True, slots=True)
class ProgressStep(Document):
    """Progress of one named install step (one entry per step name)."""

    step: str
    percent: int
    timestamp: datetime
    message: str

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        return {
            "step": self.step,
            "percent": self.percent,
            "timestamp": format_ts(self.timestamp),
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=("step", "percent", "timestamp", "message"))
        return cls(
            step=f.get_str("step", max_len=64, nonempty=True, ident=True),
            percent=f.get_int("percent", lo=0, hi=100),
            timestamp=f.get_ts("timestamp"),
            message=f.get_str("message"),
        )


@dataclass(frozen=True, slots=True)
class LogChunk:
    """One appended batch of log lines, stored at ``.../logs/{seq:06d}``: its sequence
    number, how many lines it holds and their encoded size (the cap's measure: JSON
    string bytes plus one per line)."""

    seq: int
    lines: int
    size: int

    def to_list(self) -> list[int]:
        """Compact stored form: ``[seq, lines, size]``."""
        return [self.seq, self.lines, self.size]


def _parse_chunks(f: Fields, key: str) -> tuple[LogChunk, ...]:
    chunks: list[LogChunk] = []
    for i, item in enumerate(f.get_list(key, max_items=MAX_LOG_CHUNKS)):
        p = f"{f.path(key)}[{i}]"
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(type(v) is int for v in item)
            or not (0 < item[0] <= _MAX_U63 and item[1] > 0 and 0 <= item[2] <= _MAX_U63)
            or (chunks and item[0] <= chunks[-1].seq)
        ):
            raise ValidationError(
                f"{p} must be [seq, lines, size] with seq increasing and lines > 0", field=p
            )
        chunks.append(LogChunk(item[0], item[1], item[2]))
    return tuple(chunks)


@dataclass(frozen=True, slots=True)
class StatusChange(Document):
    """One entry of a task's status history; actor and reason are emitted only when set."""

    status: TaskStatus
    timestamp: datetime
    actor: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        d: dict[str, Any] = {"status": self.status.value, "timestamp": format_ts(self.timestamp)}
        if self.actor:
            d["actor"] = self.actor
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=("status", "timestamp"), optional=("actor", "reason"))
        return cls(
            status=f.get_choice("status", TaskStatus),
            timestamp=f.get_ts("timestamp"),
            actor=f.get_str("actor", default=""),
            reason=f.get_str("reason", default=""),
        )

    def json_size(self) -> int:
        """Exact size of :meth:`to_json` without building it.

        History trimming runs this for every entry on every write; a test pins it to the
        real encoding.
        """
        n = 28 + len(self.status.value) + 20  # {"status":"","timestamp":""} + values
        if self.actor:
            n += 9 + json_len(self.actor)  # ,"actor":
        if self.reason:
            n += 10 + json_len(self.reason)  # ,"reason":
        return n


@dataclass(frozen=True, slots=True)
class Approval(Document):
    """Who approved a task, when, and why."""

    approved: bool
    approved_by: str
    approved_at: datetime
    notes: str

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        return {
            "approved": self.approved,
            "approved_by": self.approved_by,
            "approved_at": format_ts(self.approved_at),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=("approved", "approved_by", "approved_at", "notes"))
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
    "log_seq",
    "log_chunks",
    "log_skip",
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


def parse_ssh_keys(f: Fields, key: str) -> tuple[str, ...]:
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
class Task(Document):
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
    #: Log storage (see :mod:`lpmosd.tasklogs`), stored, not shown by the API: the last
    #: chunk sequence number written, the live chunks oldest first, and how many of the
    #: oldest chunk's lines are dropped already. In a stored document ``logs`` holds only
    #: lines written before logs moved to chunks; :func:`lpmosd.tasklogs.assemble` puts
    #: the chunks' lines into ``logs`` for readers.
    log_seq: int = 0
    log_chunks: tuple[LogChunk, ...] = ()
    log_skip: int = 0

    def with_op(self, op_id: str) -> Self:
        """This task with ``op_id`` remembered as applied."""
        return replace(self, ops=(*self.ops, op_id)[-MAX_TASK_OPS:])

    def to_json(self) -> bytes:
        """The stored document: the API's fields plus the operation ids."""
        d = self.to_dict()
        if self.ops:
            d["ops"] = list(self.ops)
        if self.log_seq:
            d["log_seq"] = self.log_seq
            d["log_chunks"] = [c.to_list() for c in self.log_chunks]
            d["log_skip"] = self.log_skip
        return dump_json(d)

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
        """See :class:`Document`; the guide's example task parses as is."""
        f = Fields(obj, "", required=_TASK_REQUIRED, optional=_TASK_EXTRAS)
        idc = f.get_str("idc", default="")
        if idc:
            validate_idc(idc)
        logs: list[str] = []
        for i, line in enumerate(f.get_list("logs")):
            if not isinstance(line, str) or SURROGATE_RE.search(line):
                raise ValidationError(f"logs[{i}] must be a string", field=f"logs[{i}]")
            logs.append(line)
        log_seq = f.get_int("log_seq", lo=0, hi=_MAX_U63, default=0)
        chunks = _parse_chunks(f, "log_chunks") if f.has("log_chunks") else ()
        log_skip = f.get_int("log_skip", lo=0, hi=_MAX_U63, default=0)
        if chunks and chunks[-1].seq > log_seq:
            raise ValidationError("log_chunks: a chunk is newer than log_seq", field="log_chunks")
        if log_skip and (not chunks or log_skip >= chunks[0].lines):
            raise ValidationError(
                "log_skip must be less than the oldest chunk's lines", field="log_skip"
            )
        approval_raw = f.raw("approval")
        first_boot_raw = f.raw("first_boot_at") if f.has("first_boot_at") else None
        status = f.get_choice("status", TaskStatus)
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
            log_seq=log_seq,
            log_chunks=chunks,
            log_skip=log_skip,
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
class ServerEntry(Document):
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
        """See :class:`Document`."""
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
        """See :class:`Document`."""
        f = Fields(
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
            status=f.get_choice("status", TaskStatus),
            added_at=added_at,
            updated_at=f.get_ts("updated_at") if f.has("updated_at") else added_at,
            task_id=f.get_str("task_id", default="", ident=True),
        )


@dataclass(frozen=True, slots=True)
class Disk(Document):
    """One block device reported by the agent."""

    name: str
    size_bytes: int
    model: str
    rotational: bool

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        return {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "model": self.model,
            "rotational": self.rotational,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=("name", "size_bytes", "model", "rotational"))
        return cls(
            name=f.get_str("name", max_len=MAX_META_STR, nonempty=True, ident=True),
            size_bytes=f.get_int("size_bytes", lo=0, hi=_MAX_U63),
            model=f.get_str("model", max_len=MAX_META_STR, ident=True),
            rotational=f.get_bool("rotational"),
        )


@dataclass(frozen=True, slots=True)
class Nic(Document):
    """One network interface reported by the agent (``speed_mbps`` None when unknown)."""

    name: str
    mac: str
    speed_mbps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        return {"name": self.name, "mac": self.mac, "speed_mbps": self.speed_mbps}

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=("name", "mac"), optional=("speed_mbps",))
        return cls(
            name=f.get_str("name", max_len=MAX_META_STR, nonempty=True, ident=True),
            mac=f.rename("mac", normalize_mac),
            speed_mbps=f.get_opt_int("speed_mbps", lo=0, hi=MAX_SPEED_MBPS),
        )


@dataclass(frozen=True, slots=True)
class Dmi(Document):
    """DMI/SMBIOS identity of the machine; each part None when unknown."""

    vendor: str | None = None
    product: str | None = None
    serial: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
        return {"vendor": self.vendor, "product": self.product, "serial": self.serial}

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """See :class:`Document`."""
        return cls._parse(obj, "")

    @classmethod
    def _parse(cls, obj: object, where: str) -> Self:
        f = Fields(obj, where, required=(), optional=("vendor", "product", "serial"))
        return cls(
            vendor=f.get_opt_str("vendor", max_len=MAX_META_STR),
            product=f.get_opt_str("product", max_len=MAX_META_STR),
            serial=f.get_opt_str("serial", max_len=MAX_META_STR),
        )


_META_FIELDS: Final = ("cpu_model", "cpu_cores", "memory_bytes", "disks", "nics")


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineMeta(Document):
    """Hardware facts reported by the agent: the value of ``/os/{idc}/machines/{sn}/meta``."""

    cpu_model: str
    cpu_cores: int
    memory_bytes: int
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    dmi: Dmi = Dmi()
    reported_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """See :class:`Document`."""
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
        """See :class:`Document`; ``dmi`` may be missing."""
        return cls._parse(obj, None)

    @classmethod
    def from_report(cls, obj: object, *, now: datetime) -> Self:
        """Parse an agent's report: as :meth:`from_dict`, but ``reported_at`` is ours (``now``).

        The agent's clock is not trusted, so a ``reported_at`` field is refused.
        """
        return cls._parse(obj, norm_now(now))

    @classmethod
    def _parse(cls, obj: object, reported_at: datetime | None) -> Self:
        optional = ("dmi",) if reported_at is not None else ("dmi", "reported_at")
        required = _META_FIELDS if reported_at is not None else (*_META_FIELDS, "reported_at")
        f = Fields(obj, "", required=required, optional=optional)
        disks = f.get_list("disks", max_items=MAX_META_ITEMS)
        nics = f.get_list("nics", max_items=MAX_META_ITEMS)
        return cls(
            cpu_model=f.get_str("cpu_model", max_len=MAX_META_STR, ident=True),
            cpu_cores=f.get_int("cpu_cores", lo=0, hi=1_000_000),
            memory_bytes=f.get_int("memory_bytes", lo=0, hi=_MAX_U63),
            disks=tuple(Disk._parse(d, f"disks[{i}]") for i, d in enumerate(disks)),
            nics=tuple(Nic._parse(n, f"nics[{i}]") for i, n in enumerate(nics)),
            dmi=Dmi._parse(f.raw("dmi"), "dmi") if f.has("dmi") else Dmi(),
            reported_at=f.get_ts("reported_at") if reported_at is None else reported_at,
        )
