"""Plain result types of the etcd client: what callers see instead of generated messages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key at one revision."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        """From a generated ``mvccpb.KeyValue``."""
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class RangeResult:
    """The answer to a range read: the keys, the store revision it was read at, the count."""

    kvs: list[KeyValue]
    revision: int
    count: int
    more: bool


@dataclass(frozen=True, slots=True)
class PutResult:
    """Revision after a put, and the previous value when asked for."""

    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """How many keys a delete removed, and their values when asked for."""

    revision: int
    deleted: int
    prev_kvs: list[KeyValue]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of a transaction; ``responses`` hold one result per executed op."""

    succeeded: bool
    revision: int
    responses: list[RangeResult | PutResult | DeleteResult]


class EventType(Enum):
    """Kinds of watch event."""

    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watch. For a delete, ``kv.value`` is empty."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """The events of one watch response, all at or below ``revision``.

    A batch with no events is a progress notification: the watch has seen everything up to
    ``revision``.
    """

    revision: int
    events: list[WatchEvent]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as etcd reports it; ``ttl`` is the remaining seconds (-1: gone)."""

    id: int
    ttl: int
    granted_ttl: int
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """What ``atomic_update`` committed: the new value and its revision, and the attempts.

    ``kv`` is the key as it now stands (for caches); ``guard_failed`` says an extra compare
    of the :class:`~lpmosd.etcd.client.Write` did not hold, so nothing was written.
    """

    value: bytes | None
    revision: int
    attempts: int
    changed: bool
    kv: KeyValue | None = None
    guard_failed: bool = False


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """Answer of Maintenance.Status for the member we talk to."""

    endpoint: str
    version: str
    db_size: int
    leader: int
    member_id: int
    raft_term: int
    revision: int
    errors: list[str]
    #: Bytes of the backend database in use (db_size minus free pages a defrag would return).
    db_size_in_use: int = 0
