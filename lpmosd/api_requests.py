"""Parsers of the API request bodies: strict, each error naming the field.

Both HTTP APIs (and the dashboard's forms) turn their JSON bodies into these before any
core code sees them; text fields come out sanitised (control characters removed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Self

from lpmosd.credentials import MAX_SECRET_CHARS
from lpmosd.documents import (
    MAX_ACTOR_CHARS,
    MAX_FIELD_CHARS,
    MAX_LOG_LINE_CHARS,
    MAX_TEXT_CHARS,
    MachineMeta,
    parse_ssh_keys,
)
from lpmosd.errors import ValidationError
from lpmosd.fields import Fields, sanitize_text
from lpmosd.schema import STEP_RE, normalize_mac, validate_idc, validate_sn

__all__ = [
    "LOG_LEVELS",
    "MAX_LOG_REQUEST_LINES",
    "ApproveRequest",
    "CreateTaskRequest",
    "FailRequest",
    "FirstBootRequest",
    "LogLevel",
    "LogRequest",
    "ProgressRequest",
    "RegisterRequest",
    "parse_level",
    "parse_step",
]

#: Lines one log call may carry.
MAX_LOG_REQUEST_LINES: Final = 100

LogLevel = Literal["INFO", "WARN", "ERROR", "DEBUG"]
_LEVELS: Final[Mapping[str, LogLevel]] = {
    "INFO": "INFO",
    "WARN": "WARN",
    "ERROR": "ERROR",
    "DEBUG": "DEBUG",
}
LOG_LEVELS: Final[frozenset[str]] = frozenset(_LEVELS)


def parse_level(value: object, field: str | None = "level") -> LogLevel:
    if not isinstance(value, str) or value not in _LEVELS:
        raise ValidationError(f"level must be one of {', '.join(_LEVELS)}", field=field)
    return _LEVELS[value]


def parse_step(value: object, field: str = "step") -> str:
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
        f = Fields(
            obj,
            "",
            required=("idc", "sn", "mac", "os_type"),
            optional=("os_version", "disk_layout", "network_config", "ssh_authorized_keys"),
        )
        return cls(
            idc=validate_idc(f.raw("idc")),
            sn=validate_sn(f.raw("sn")),
            mac=normalize_mac(f.raw("mac")),
            os_type=f.get_str("os_type", max_len=MAX_FIELD_CHARS, nonempty=True, ident=True),
            os_version=f.get_str("os_version", default="", max_len=MAX_FIELD_CHARS, ident=True),
            disk_layout=f.get_str(
                "disk_layout", default="auto", max_len=MAX_FIELD_CHARS, nonempty=True, ident=True
            ),
            network_config=f.get_str(
                "network_config", default="dhcp", max_len=MAX_FIELD_CHARS, nonempty=True, ident=True
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
        f = Fields(obj, "", required=(), optional=("hostname",))
        return cls(hostname=f.get_str("hostname", default="", max_len=253, ident=True))


@dataclass(frozen=True, slots=True)
class ApproveRequest:
    """Body of an approve call; ``approved_by`` None means "the authenticated user"."""

    approved_by: str | None = None
    notes: str = ""

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly (see :meth:`CreateTaskRequest.from_obj`)."""
        f = Fields(obj, "", required=(), optional=("approved_by", "notes"))
        approved_by = None
        if f.get_opt_str("approved_by") is not None:
            approved_by = f.get_str(
                "approved_by", max_len=MAX_ACTOR_CHARS, nonempty=True, ident=True
            )
        return cls(
            approved_by=approved_by,
            notes=sanitize_text(
                f.get_str("notes", default="", max_len=MAX_TEXT_CHARS), MAX_TEXT_CHARS
            ),
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
        f = Fields(obj, "", required=("step", "percent"), optional=("message",))
        return cls(
            step=parse_step(f.raw("step")),
            percent=f.get_int("percent", lo=0, hi=100),
            message=sanitize_text(
                f.get_str("message", default="", max_len=MAX_TEXT_CHARS), MAX_TEXT_CHARS
            ),
        )


@dataclass(frozen=True, slots=True)
class LogRequest:
    """Body of an agent log call: ``{"line": str}`` or ``{"lines": [str, ...]}``."""

    lines: tuple[str, ...]
    level: LogLevel = "INFO"

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; exactly one of ``line``/``lines``, at most 100 lines."""
        f = Fields(obj, "", required=(), optional=("line", "lines", "level"))
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
        level = parse_level(f.raw("level")) if f.has("level") else "INFO"
        return cls(
            lines=tuple(sanitize_text(line, MAX_LOG_LINE_CHARS) for line in lines), level=level
        )


@dataclass(frozen=True, slots=True)
class FailRequest:
    """Body of an agent failure report."""

    reason: str

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse strictly; ``reason`` must be non-empty."""
        f = Fields(obj, "", required=("reason",))
        reason = sanitize_text(
            f.get_str("reason", max_len=MAX_TEXT_CHARS, nonempty=True), MAX_TEXT_CHARS
        )
        if not reason.strip():
            raise ValidationError("reason must not be blank", field="reason")
        return cls(reason=reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterRequest:
    """Body of an agent's register call; ``enrollment_secret`` None when it sent none."""

    sn: str
    mac: str
    enrollment_secret: str | None
    hardware: MachineMeta

    @classmethod
    def from_obj(cls, obj: object, *, now: datetime) -> Self:
        """Parse strictly; the hardware's ``reported_at`` is ``now`` (see
        :meth:`MachineMeta.from_report`) and its errors name ``hardware.<field>``."""
        f = Fields(obj, "", required=(), optional=("sn", "mac", "hardware", "enrollment_secret"))
        sn = validate_sn(f.raw("sn") if f.has("sn") else None)
        mac = normalize_mac(f.raw("mac") if f.has("mac") else None)
        secret = f.raw("enrollment_secret") if f.has("enrollment_secret") else None
        if secret is not None and (not isinstance(secret, str) or len(secret) > MAX_SECRET_CHARS):
            raise ValidationError(
                f"enrollment_secret must be a string of at most {MAX_SECRET_CHARS} characters",
                field="enrollment_secret",
            )
        if not f.has("hardware"):
            raise ValidationError("hardware is required", field="hardware")
        try:
            meta = MachineMeta.from_report(f.raw("hardware"), now=now)
        except ValidationError as exc:
            # Name the field as the client spelled it: hardware.disks[0].size_bytes.
            where = f"hardware.{exc.field}" if exc.field else "hardware"
            raise ValidationError(f"{where}: {exc.message}", field=where) from None
        return cls(sn=sn, mac=mac, enrollment_secret=secret, hardware=meta)
