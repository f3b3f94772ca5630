"""Secrets and their stored (hashed) forms: operator API tokens, agent enrolment secrets and
agent tokens.

Every secret lpmosd hands out is 32 random bytes (``secrets.token_urlsafe``) behind a short
prefix that says what it is (``lpm_`` operator token, ``lpe_`` enrolment secret, ``lpa_``
agent token), so a leaked one is recognisable by secret scanners and in support tickets.
etcd only ever holds ``sha256`` of a secret: with 256 bits of entropy a plain hash is as good
as a slow KDF (nobody can enumerate the input space), and it keeps verification cheap.
Comparisons use :func:`hmac.compare_digest`.

Agent credentials live beside the task they belong to (see :mod:`lpmosd.schema`)::

    /os/{idc}/machines/{sn}/enrolment    Enrolment  (issued on task create/retry/reissue)
    /os/{idc}/machines/{sn}/agent-token  AgentToken (issued by the regional on register)
    /os/{idc}/machines/{sn}/first-boot   FirstBootCredential (issued to the agent during the
                                         install; the installed system presents it once)

Both are bound to the task's ``task_id``: a credential of an earlier task of the same server
is worthless even if its key survived somehow.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, Self

from lpmosd.errors import ValidationError
from lpmosd.timestamps import format_ts, parse_ts

__all__ = [
    "AGENT_TOKEN_PREFIX",
    "ENROLMENT_PREFIX",
    "FIRST_BOOT_PREFIX",
    "MAX_SECRET_CHARS",
    "OPERATOR_TOKEN_PREFIX",
    "AgentToken",
    "Enrolment",
    "FirstBootCredential",
    "hash_secret",
    "new_secret",
    "secret_matches",
]

OPERATOR_TOKEN_PREFIX: Final = "lpm_"
ENROLMENT_PREFIX: Final = "lpe_"
AGENT_TOKEN_PREFIX: Final = "lpa_"
FIRST_BOOT_PREFIX: Final = "lpf_"
#: Longer presented secrets are refused before hashing (ours are 47 characters).
MAX_SECRET_CHARS: Final = 256
_SECRET_BYTES: Final = 32


def new_secret(prefix: str) -> str:
    """A fresh secret: ``prefix`` + 32 random bytes, base64url (43 characters)."""
    return prefix + secrets.token_urlsafe(_SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """What is stored for ``secret``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.encode())


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _loads(data: bytes | str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError(f"stored {what} is not JSON", field=what) from None
    if not isinstance(obj, dict):
        raise ValidationError(f"stored {what} is not an object", field=what)
    return obj


def _str(obj: dict[str, Any], name: str, what: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"stored {what} lacks {name}", field=what)
    return value


def _ts(obj: dict[str, Any], name: str, what: str) -> datetime | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"stored {what} has a bad {name}", field=what)
    return parse_ts(value, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrolment:
    """A task's enrolment secret, as stored: bound to (idc, sn) by its key and to the task
    and MAC by its fields. ``used_at`` is set by the first successful register."""

    task_id: str
    mac: str
    secret_hash: str = ""
    issued_at: datetime
    issued_by: str
    used_at: datetime | None = None

    @classmethod
    def issue(cls, *, task_id: str, mac: str, actor: str, now: datetime) -> tuple[Self, str]:
        """A new enrolment and its secret (to be shown once, never stored)."""
        secret = new_secret(ENROLMENT_PREFIX)
        enrolment = cls(
            task_id=task_id,
            mac=mac,
            secret_hash=hash_secret(secret),
            issued_at=now,
            issued_by=actor,
        )
        return enrolment, secret

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this enrolment's secret (constant time)."""
        return secret_matches(secret, self.secret_hash)

    def used(self, now: datetime) -> Self:
        """This enrolment marked used (the first use is kept)."""
        return self if self.used_at is not None else replace(self, used_at=now)

    def to_json(self) -> str:
        """The stored JSON."""
        return _dumps(
            {
                "task_id": self.task_id,
                "mac": self.mac,
                "secret_hash": self.secret_hash,
                "issued_at": format_ts(self.issued_at),
                "issued_by": self.issued_by,
                "used_at": format_ts(self.used_at) if self.used_at else None,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a stored enrolment; ValidationError when it is not one."""
        obj = _loads(data, "enrolment")
        issued_at = _ts(obj, "issued_at", "enrolment")
        if issued_at is None:
            raise ValidationError("stored enrolment lacks issued_at", field="enrolment")
        return cls(
            task_id=_str(obj, "task_id", "enrolment"),
            mac=_str(obj, "mac", "enrolment"),
            secret_hash=_str(obj, "secret_hash", "enrolment"),
            issued_at=issued_at,
            issued_by=_str(obj, "issued_by", "enrolment"),
            used_at=_ts(obj, "used_at", "enrolment"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentToken:
    """The bearer token of the agent enrolled for one task, as stored."""

    task_id: str
    mac: str
    token_hash: str = ""
    issued_at: datetime

    @classmethod
    def issue(cls, *, task_id: str, mac: str, now: datetime) -> tuple[Self, str]:
        """A new agent token record and the token itself (returned once to the agent)."""
        token = new_secret(AGENT_TOKEN_PREFIX)
        return cls(task_id=task_id, mac=mac, token_hash=hash_secret(token), issued_at=now), token

    def matches(self, token: str) -> bool:
        """Whether ``token`` is this record's token (constant time)."""
        return secret_matches(token, self.token_hash)

    def to_json(self) -> str:
        """The stored JSON."""
        return _dumps(
            {
                "task_id": self.task_id,
                "mac": self.mac,
                "token_hash": self.token_hash,
                "issued_at": format_ts(self.issued_at),
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a stored agent token; ValidationError when it is not one."""
        obj = _loads(data, "agent_token")
        issued_at = _ts(obj, "issued_at", "agent_token")
        if issued_at is None:
            raise ValidationError("stored agent token lacks issued_at", field="agent_token")
        return cls(
            task_id=_str(obj, "task_id", "agent_token"),
            mac=_str(obj, "mac", "agent_token"),
            token_hash=_str(obj, "token_hash", "agent_token"),
            issued_at=issued_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstBootCredential:
    """The one-time credential the installed system presents on its first boot, as stored.

    The agent asks for it during post_install and writes it onto the new system; the first
    boot call deletes it in the Txn that records ``first_boot_at``.
    """

    task_id: str
    credential_hash: str = ""
    issued_at: datetime

    @classmethod
    def issue(cls, *, task_id: str, now: datetime) -> tuple[Self, str]:
        """A new record and the credential itself (returned once to the agent)."""
        credential = new_secret(FIRST_BOOT_PREFIX)
        return cls(task_id=task_id, credential_hash=hash_secret(credential), issued_at=now), (
            credential
        )

    def matches(self, credential: str) -> bool:
        """Whether ``credential`` is this record's (constant time)."""
        return secret_matches(credential, self.credential_hash)

    def to_json(self) -> str:
        """The stored JSON."""
        return _dumps(
            {
                "task_id": self.task_id,
                "credential_hash": self.credential_hash,
                "issued_at": format_ts(self.issued_at),
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a stored record; ValidationError when it is not one."""
        obj = _loads(data, "first_boot")
        issued_at = _ts(obj, "issued_at", "first_boot")
        if issued_at is None:
            raise ValidationError(
                "stored first-boot credential lacks issued_at", field="first_boot"
            )
        return cls(
            task_id=_str(obj, "task_id", "first_boot"),
            credential_hash=_str(obj, "credential_hash", "first_boot"),
            issued_at=issued_at,
        )
