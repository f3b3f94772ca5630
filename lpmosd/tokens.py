"""Operator API tokens: roles, hashed records in etcd, a watched cache, authentication.

Each token is a record at ``/lpmosd/tokens/{name}``::

    {"name": "alice", "role": "operator", "token_hash": "sha256:…",
     "created_at": "…Z", "created_by": "cli:root", "expires_at": "…Z" | null,
     "revoked_at": null, "revoked_by": null}

The token itself (``lpm_`` + 32 random bytes) is shown once, when it is created, and never
stored. Revoking keeps the record (marked ``revoked_at``) for the audit trail; a name whose
token is revoked or expired may be created again.

The control plane keeps the records in a :class:`~lpmosd.view.PrefixView` (relist + watch),
so a revocation or a new token takes effect as soon as etcd's watch delivers it (milliseconds),
and authenticating costs no etcd round trip. While the view is not running (the role's
session is restarting) lookups go to etcd directly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any, Final, Self

import trio

from lpmosd.credentials import (
    MAX_SECRET_CHARS,
    OPERATOR_TOKEN_PREFIX,
    hash_secret,
    new_secret,
    secret_matches,
)
from lpmosd.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from lpmosd.etcd import Compare, EtcdClient, KeyValue, put
from lpmosd.timestamps import format_ts, parse_ts, utcnow
from lpmosd.view import Change, PrefixView
from lpmosd.web.ratelimit import RateLimiter

__all__ = [
    "MAX_TOKEN_LIFETIME",
    "TOKENS_PREFIX",
    "TOKEN_NAME_RE",
    "Role",
    "TokenRecord",
    "TokenStore",
    "expires_label",
    "parse_duration",
    "parse_expiry",
    "token_key",
    "validate_token_name",
]

log = logging.getLogger("lpmosd.tokens")

TOKENS_PREFIX: Final = "/lpmosd/tokens/"
#: A token's name (the principal recorded as approver and actor): like an IDC name, plus '@'
#: so e-mail addresses work. No '/', so it cannot leave its key prefix.
TOKEN_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", re.ASCII)
MAX_TOKEN_LIFETIME: Final = timedelta(days=3650)
_DURATION_RE: Final = re.compile(r"([1-9][0-9]{0,6})([smhdw])", re.ASCII)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Role(IntEnum):
    """What a token may do; each role includes the ones below it."""

    VIEWER = 1  #: read tasks and servers
    OPERATOR = 2  #: create, approve, cancel, retry tasks; issue enrolment secrets
    ADMIN = 3  #: delete tasks, manage tokens

    @property
    def label(self) -> str:
        """The lower-case name used in JSON, the CLI and etcd (``"operator"``)."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: object, field: str = "role") -> Role:
        """``"viewer" | "operator" | "admin"`` -> Role; ValidationError otherwise."""
        if isinstance(value, str):
            for role in cls:
                if role.label == value:
                    return role
        raise ValidationError(
            f"{field} must be one of {', '.join(r.label for r in cls)}", field=field
        )


def validate_token_name(value: object, field: str = "name") -> str:
    """A token name, or ValidationError naming ``field``."""
    if not isinstance(value, str) or TOKEN_NAME_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{field} must be 1-64 ASCII letters, digits, '.', '_', '@' or '-', starting with "
            "a letter or digit",
            field=field,
        )
    return value


def token_key(name: str) -> str:
    """``/lpmosd/tokens/{name}``."""
    return TOKENS_PREFIX + validate_token_name(name)


def parse_duration(text: str, field: str = "expires") -> timedelta:
    """``"90s" | "30m" | "12h" | "30d" | "2w"`` -> timedelta (at most ten years)."""
    m = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValidationError(
            f"{field} must be a number with a unit s, m, h, d or w (e.g. 30d)", field=field
        )
    value = timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    if value > MAX_TOKEN_LIFETIME:
        raise ValidationError(f"{field} must be at most {MAX_TOKEN_LIFETIME.days}d", field=field)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    """One operator token as stored (never the token itself)."""

    name: str
    role: Role
    token_hash: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def state(self, now: datetime) -> str:
        """``"active" | "expired" | "revoked"``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def matches(self, token: str) -> bool:
        """Whether ``token`` is this record's token (constant time)."""
        return secret_matches(token, self.token_hash)

    def public_dict(self, now: datetime) -> dict[str, Any]:
        """What the API and CLI show: everything but the hash."""
        return {
            "name": self.name,
            "role": self.role.label,
            "state": self.state(now),
            "created_at": format_ts(self.created_at),
            "created_by": self.created_by,
            "expires_at": format_ts(self.expires_at) if self.expires_at else None,
            "revoked_at": format_ts(self.revoked_at) if self.revoked_at else None,
            "revoked_by": self.revoked_by,
        }

    def to_json(self) -> str:
        """The stored JSON."""
        obj = {**self.public_dict(self.created_at), "token_hash": self.token_hash}
        del obj["state"]  # derived, never stored
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a stored record; ValidationError when it is not one."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("token record is not JSON", field="token") from None
        if not isinstance(obj, dict):
            raise ValidationError("token record is not an object", field="token")

        def ts(name: str) -> datetime | None:
            value = obj.get(name)
            return None if value is None else parse_ts(value, name)

        created_at = ts("created_at")
        token_hash = obj.get("token_hash")
        created_by = obj.get("created_by")
        revoked_by = obj.get("revoked_by")
        if created_at is None or not isinstance(token_hash, str) or not token_hash:
            raise ValidationError("token record lacks created_at or token_hash", field="token")
        if not isinstance(created_by, str) or not (
            revoked_by is None or isinstance(revoked_by, str)
        ):
            raise ValidationError("token record has bad actor fields", field="token")
        return cls(
            name=validate_token_name(obj.get("name")),
            role=Role.parse(obj.get("role")),
            token_hash=token_hash,
            created_at=created_at,
            created_by=created_by,
            expires_at=ts("expires_at"),
            revoked_at=ts("revoked_at"),
            revoked_by=revoked_by,
        )


def _record_of(kv: KeyValue) -> TokenRecord | None:
    try:
        return TokenRecord.from_json(kv.value)
    except ValidationError:
        log.error("unreadable token record ignored", extra={"key": kv.key.decode(errors="replace")})
        return None


class TokenStore:
    """Operator tokens in etcd, with a watched cache for authentication."""

    def __init__(self, client: EtcdClient, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.client = client
        self.clock = clock
        self.view: PrefixView | None = None
        self._by_hash: dict[str, str] = {}  # token hash -> name, from the view
        # Unknown tokens are looked up in etcd (a token created a moment ago must work), but
        # at a bounded rate: a flood of made-up tokens must not become a flood of reads.
        self._misses = RateLimiter(20.0, 40)

    # --- the cache ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the cache current until cancelled (started in the control plane's session)."""
        view = PrefixView(self.client, TOKENS_PREFIX)
        view.listeners.append(self._on_change)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(view.run)
                self.view = view
                task_status.started()
        finally:
            self.view = None
            self._by_hash.clear()

    def _on_change(self, change: Change) -> None:
        if change.prev is not None:
            old = _record_of(change.prev)
            if old is not None and self._by_hash.get(old.token_hash) == old.name:
                del self._by_hash[old.token_hash]
        if change.kv is not None:
            new = _record_of(change.kv)
            if new is not None:
                self._by_hash[new.token_hash] = new.name

    async def get(self, name: str) -> TokenRecord | None:
        """The record of ``name`` (from the cache when it has it, else etcd), or None."""
        key = token_key(name)
        view = self.view
        kv = view.get(key) if view is not None else None
        if kv is None:
            kv = await self.client.get(key)  # cache down, or lagging a fresh token
        return _record_of(kv) if kv is not None else None

    async def authenticate(self, token: str) -> TokenRecord:
        """The active record of ``token``; AuthenticationError (401) when there is none.

        The lookup is by the token's hash (timing reveals nothing about the token); the final
        comparison is constant-time anyway.
        """
        if (
            not token.startswith(OPERATOR_TOKEN_PREFIX)
            or len(token) > MAX_SECRET_CHARS
            or not token.isascii()
        ):
            raise AuthenticationError("invalid token", field="authorization")
        digest = hash_secret(token)
        record: TokenRecord | None = None
        name = self._by_hash.get(digest) if self.view is not None else None
        if name is not None:
            record = await self.get(name)
        elif self.view is not None and self._misses.take("etcd") > 0:
            record = None  # the cache is current within milliseconds: unknown it is
        else:
            # Not cached: the cache is down, or the token was created a moment ago and the
            # watch has not delivered it yet. Ask etcd, so a new token works at once.
            for candidate in await self.list():
                if candidate.matches(token):
                    record = candidate
                    break
        if record is None or not record.matches(token):
            raise AuthenticationError("invalid token", field="authorization")
        state = record.state(self.clock())
        if state != "active":
            raise AuthenticationError(f"token {state}", field="authorization")
        return record

    # --- management -----------------------------------------------------------------------

    async def list(self) -> list[TokenRecord]:
        """Every record (active, expired and revoked), by name, read from etcd."""
        result = await self.client.get_prefix(TOKENS_PREFIX)
        records = [r for kv in result.kvs if (r := _record_of(kv)) is not None]
        return sorted(records, key=lambda r: r.name)

    async def create(
        self,
        name: str,
        role: Role,
        *,
        actor: str,
        expires_in: timedelta | None = None,
        replace_active: bool = False,
    ) -> tuple[TokenRecord, str]:
        """Create a token; returns its record and the token (to be shown once).

        A name whose token is revoked or expired is reused; an active one is a ConflictError
        unless ``replace_active`` (``lpmosd dev`` re-creating its admin token).
        """
        key = token_key(name)
        now = self.clock()
        token = new_secret(OPERATOR_TOKEN_PREFIX)
        record = TokenRecord(
            name=name,
            role=role,
            token_hash=hash_secret(token),
            created_at=now,
            created_by=actor,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        old = await self.client.get(key)
        if old is None:
            guard = Compare.absent(key)
        else:
            previous = _record_of(old)
            if previous is not None and previous.state(now) == "active" and not replace_active:
                raise ConflictError(
                    f"token {name} exists and is active; revoke it first", field="name"
                )
            guard = Compare.mod_revision(key, "==", old.mod_revision)
        r = await self.client.txn([guard], [put(key, record.to_json())], [])
        if not r.succeeded:
            raise ConflictError(f"token {name} changed concurrently; try again", field="name")
        log.info(
            "token created",
            extra={"token_name": name, "role": role.label, "actor": actor},
        )
        return record, token

    async def revoke(self, name: str, *, actor: str) -> TokenRecord:
        """Mark a token revoked (it stops working at once); NotFoundError when unknown."""
        key = token_key(name)
        for _ in range(5):
            kv = await self.client.get(key)
            record = _record_of(kv) if kv is not None else None
            if kv is None or record is None:
                raise NotFoundError(f"no token named {name}", field="name")
            if record.revoked_at is not None:
                return record
            revoked = replace(record, revoked_at=self.clock(), revoked_by=actor)
            r = await self.client.txn(
                [Compare.mod_revision(key, "==", kv.mod_revision)],
                [put(key, revoked.to_json())],
                [],
            )
            if r.succeeded:
                log.info("token revoked", extra={"token_name": name, "actor": actor})
                return revoked
        raise ConflictError(f"token {name} changed concurrently; try again", field="name")


def parse_expiry(value: object, field: str = "expires") -> timedelta | None:
    """An optional ``expires`` value of the API (``"30d"`` or null)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a duration such as 30d, or null", field=field)
    return parse_duration(value, field)


def expires_label(record: TokenRecord) -> str:
    """``never`` or the expiry timestamp, for the CLI."""
    return format_ts(record.expires_at) if record.expires_at else "never"
