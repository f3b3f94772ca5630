"""The etcd key layout (LPMOS v3) and validation of the parts that go into keys.

::

    /os/{idc}/servers/{sn}          ServerEntry JSON (one key per server)
    /os/{idc}/machines/{sn}/task    Task JSON (task, progress, logs, approval merged)
    /os/{idc}/machines/{sn}/meta    MachineMeta JSON (hardware facts)
    /os/{idc}/machines/{sn}/lease   "lease-<id>", attached to the agent's lease
    /os/{idc}/machines/{sn}/enrolment    the task's enrolment secret, hashed
    /os/{idc}/machines/{sn}/agent-token  the enrolled agent's bearer token, hashed
    /os/{idc}/machines/{sn}/first-boot   the installed system's first-boot credential, hashed
    /os/{idc}/machines/{sn}/logs/{seq}   one batch of the task's log lines (JSON list),
                                    seq = 6+ decimal digits (see :mod:`lpmosd.tasklogs`)
    /os/{idc}/os-types              the OS types the IDC's regional can install (JSON)

(The last two: see :mod:`lpmosd.credentials`.)

Every builder validates its parts, so no caller can make a key that escapes its prefix
(``..``, ``/``, NUL, look-alike characters are all refused). :func:`parse_key` is the inverse
and returns ``None`` for anything outside the layout, so watchers can route events safely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from lpmosd.errors import ValidationError

__all__ = [
    "NAME_RE",
    "ROOT",
    "STEP_RE",
    "KeyKind",
    "ParsedKey",
    "agent_token_key",
    "enrolment_key",
    "first_boot_key",
    "idc_prefix",
    "lease_key",
    "log_chunk_key",
    "logs_prefix",
    "machine_prefix",
    "machines_prefix",
    "meta_key",
    "normalize_mac",
    "os_types_key",
    "parse_key",
    "server_key",
    "servers_prefix",
    "task_key",
    "validate_idc",
    "validate_sn",
]

ROOT: Final = "/os/"

#: An IDC or serial number: ASCII only, at most 64 characters. The first character must be
#: alphanumeric, which also refuses "." and "..".
NAME_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)

#: An install step name (plan steps, progress reports): lower-case, at most 64 characters.
STEP_RE: Final[re.Pattern[str]] = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}", re.ASCII)

_HEX2 = "[0-9A-Fa-f]{2}"
_HEX4 = "[0-9A-Fa-f]{4}"
_MAC_RES: Final = (
    re.compile(rf"{_HEX2}(?::{_HEX2}){{5}}", re.ASCII),
    re.compile(rf"{_HEX2}(?:-{_HEX2}){{5}}", re.ASCII),
    re.compile(rf"{_HEX4}\.{_HEX4}\.{_HEX4}", re.ASCII),
    re.compile(r"[0-9A-Fa-f]{12}", re.ASCII),
)

KeyKind = Literal[
    "server", "task", "meta", "lease", "enrolment", "agent_token", "first_boot", "logs"
]
#: A log chunk's sequence number in its key: at least 6 decimal digits (zero-padded, so
#: keys sort in append order up to 999,999), no sign, no spaces.
_SEQ_RE: Final[re.Pattern[str]] = re.compile(r"[0-9]{6,19}", re.ASCII)
_MAX_SEQ: Final = 2**63 - 1
#: Key name under a machine's prefix -> its kind ("agent-token" reads better in etcdctl
#: output; the kind is a Python-friendly identifier).
_MACHINE_KINDS: Final[dict[str, KeyKind]] = {
    "task": "task",
    "meta": "meta",
    "lease": "lease",
    "enrolment": "enrolment",
    "agent-token": "agent_token",
    "first-boot": "first_boot",
}


def _validate_name(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    # fullmatch, not match + "$": "$" would accept a trailing newline.
    if NAME_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{field} must be 1-64 ASCII letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (got {value[:80]!r})",
            field=field,
        )
    return value


def validate_idc(value: object) -> str:
    """Return ``value`` if it is a valid IDC name, else raise ValidationError(field="idc")."""
    return _validate_name(value, "idc")


def validate_sn(value: object) -> str:
    """Return ``value`` if it is a valid serial number, else raise ValidationError(field="sn")."""
    return _validate_name(value, "sn")


def normalize_mac(value: object) -> str:
    """Return a MAC address in lower-case colon form (``00:1a:2b:3c:4d:5e``).

    Accepts colon, dash, bare-hex and Cisco dotted forms; anything else raises
    ValidationError(field="mac").
    """
    if not isinstance(value, str):
        raise ValidationError("mac must be a string", field="mac")
    if not any(p.fullmatch(value) for p in _MAC_RES):
        raise ValidationError(
            f"mac must be a 48-bit MAC address such as 00:1a:2b:3c:4d:5e (got {value[:80]!r})",
            field="mac",
        )
    digits = re.sub(r"[:.-]", "", value).lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def idc_prefix(idc: str) -> str:
    """``/os/{idc}/``: everything belonging to one IDC."""
    return f"{ROOT}{validate_idc(idc)}/"


def servers_prefix(idc: str) -> str:
    """``/os/{idc}/servers/``: the per-server directory keys of one IDC."""
    return f"{idc_prefix(idc)}servers/"


def server_key(idc: str, sn: str) -> str:
    """``/os/{idc}/servers/{sn}``: the ServerEntry of one server."""
    return f"{servers_prefix(idc)}{validate_sn(sn)}"


def os_types_key(idc: str) -> str:
    """``/os/{idc}/os-types``: the OS types (plans) the IDC's regional publishes."""
    return f"{idc_prefix(idc)}os-types"


def machines_prefix(idc: str) -> str:
    """``/os/{idc}/machines/``: task, meta and lease keys of every machine in one IDC."""
    return f"{idc_prefix(idc)}machines/"


def machine_prefix(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/``: the keys of one machine."""
    return f"{machines_prefix(idc)}{validate_sn(sn)}/"


def task_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/task``: the merged Task document."""
    return f"{machine_prefix(idc, sn)}task"


def meta_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/meta``: the MachineMeta document."""
    return f"{machine_prefix(idc, sn)}meta"


def lease_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/lease``: the agent heartbeat key, bound to an etcd lease."""
    return f"{machine_prefix(idc, sn)}lease"


def enrolment_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/enrolment``: the task's one-time enrolment secret, hashed."""
    return f"{machine_prefix(idc, sn)}enrolment"


def first_boot_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/first-boot``: the installed system's one-time credential."""
    return f"{machine_prefix(idc, sn)}first-boot"


def logs_prefix(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/logs/``: the task's log chunks."""
    return f"{machine_prefix(idc, sn)}logs/"


def log_chunk_key(idc: str, sn: str, seq: int) -> str:
    """``/os/{idc}/machines/{sn}/logs/{seq:06d}``: one appended batch of log lines."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= _MAX_SEQ:
        raise ValidationError(f"log chunk seq must be 1..{_MAX_SEQ} (got {seq!r})", field="seq")
    return f"{logs_prefix(idc, sn)}{seq:06d}"


def regional_election_prefix(idc: str) -> str:
    """Where the IDC's regionals stand for election (``.../regional/{lease-hex}``, bound to
    the session lease, holding the regional's URL); the lowest create revision is active."""
    return idc_prefix(idc) + "regional/"


#: The control planes' election, beside the IDCs under a name no IDC can have.
CONTROL_PLANE_ELECTION: Final = ROOT + "_control-plane/"


def agent_token_key(idc: str, sn: str) -> str:
    """``/os/{idc}/machines/{sn}/agent-token``: the enrolled agent's bearer token, hashed."""
    return f"{machine_prefix(idc, sn)}agent-token"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key of the v3 layout, taken apart."""

    idc: str
    kind: KeyKind
    sn: str
    #: A log chunk's sequence number (kind ``logs``); 0 for every other kind.
    seq: int = 0


def parse_key(key: str | bytes) -> ParsedKey | None:
    """Take a key apart; ``None`` unless it is exactly one of the v3 layout's keys.

    Accepts bytes too, as etcd hands them out; bytes that are not ASCII give ``None``.
    """
    if isinstance(key, bytes):
        try:
            key = key.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not key.startswith(ROOT):
        return None
    parts = key[len(ROOT) :].split("/")
    seq = 0
    if len(parts) == 3 and parts[1] == "servers":
        idc, _, sn = parts
        kind: KeyKind = "server"
    elif len(parts) == 4 and parts[1] == "machines" and parts[3] in _MACHINE_KINDS:
        idc, _, sn, raw_kind = parts
        kind = _MACHINE_KINDS[raw_kind]
    elif (
        len(parts) == 5
        and parts[1] == "machines"
        and parts[3] == "logs"
        and _SEQ_RE.fullmatch(parts[4])
    ):
        idc, _, sn, _, raw_seq = parts
        kind, seq = "logs", int(raw_seq)
        if not 0 < seq <= _MAX_SEQ or raw_seq != f"{seq:06d}":
            return None  # not a key log_chunk_key makes (zero seq, extra padding)
    else:
        return None
    if NAME_RE.fullmatch(idc) is None or NAME_RE.fullmatch(sn) is None:
        return None
    return ParsedKey(idc=idc, kind=kind, sn=sn, seq=seq)
