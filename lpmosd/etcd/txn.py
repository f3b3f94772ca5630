"""Transaction building blocks: compares and operations, independent of generated stubs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Target = Literal["value", "version", "create_revision", "mod_revision", "lease"]
Operator = Literal["==", "!=", ">", "<"]

#: etcd's default limit on operations in one transaction (--max-txn-ops).
MAX_TXN_OPS = 128


def to_bytes(value: str | bytes) -> bytes:
    """Keys and values may be given as str (UTF-8) or bytes."""
    return value.encode() if isinstance(value, str) else value


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes ``[prefix, end)`` cover every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # every key


def key_range(key: str | bytes, *, prefix: bool) -> tuple[bytes, bytes]:
    """``(key, range_end)`` for one key, or with ``prefix`` for every key under it.

    The empty prefix means every key: etcd wants ``key=b"\\0"`` for that (an empty key is
    refused as "key is not provided").
    """
    k = to_bytes(key)
    if not prefix:
        return k, b""
    return (k or b"\0"), prefix_end(k)


@dataclass(frozen=True, slots=True)
class Compare:
    """One guard of a transaction: ``target(key) operator value``."""

    key: bytes
    target: Target
    op: Operator
    value: int | bytes

    @classmethod
    def value_is(cls, key: str | bytes, op: Operator, value: str | bytes) -> Compare:
        """Compare the key's value."""
        return cls(to_bytes(key), "value", op, to_bytes(value))

    @classmethod
    def version(cls, key: str | bytes, op: Operator, version: int) -> Compare:
        """Compare the key's version (0: absent)."""
        return cls(to_bytes(key), "version", op, version)

    @classmethod
    def create_revision(cls, key: str | bytes, op: Operator, rev: int) -> Compare:
        """Compare the key's create revision (0: absent)."""
        return cls(to_bytes(key), "create_revision", op, rev)

    @classmethod
    def mod_revision(cls, key: str | bytes, op: Operator, rev: int) -> Compare:
        """Compare the key's last modification revision."""
        return cls(to_bytes(key), "mod_revision", op, rev)

    @classmethod
    def lease(cls, key: str | bytes, op: Operator, lease_id: int) -> Compare:
        """Compare the lease the key is attached to (0: none)."""
        return cls(to_bytes(key), "lease", op, lease_id)

    @classmethod
    def absent(cls, key: str | bytes) -> Compare:
        """The key does not exist."""
        return cls.create_revision(key, "==", 0)


@dataclass(frozen=True, slots=True)
class Put:
    """Put ``value`` at ``key`` (optionally bound to a lease)."""

    key: bytes
    value: bytes
    lease: int = 0
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``, or every key in ``[key, range_end)``."""

    key: bytes
    range_end: bytes = b""
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    """Read ``key``, or every key in ``[key, range_end)``."""

    key: bytes
    range_end: bytes = b""
    keys_only: bool = False
    limit: int = 0
    #: Read as of this revision (0: the latest); etcd checks it like a plain Range's.
    revision: int = 0


Op = Put | Delete | Get


def put(key: str | bytes, value: str | bytes, *, lease: int = 0, prev_kv: bool = False) -> Put:
    """A put operation."""
    return Put(to_bytes(key), to_bytes(value), lease, prev_kv)


def delete(key: str | bytes, *, prefix: bool = False, prev_kv: bool = False) -> Delete:
    """A delete operation; ``prefix`` deletes every key starting with ``key``."""
    return Delete(*key_range(key, prefix=prefix), prev_kv)


def get(
    key: str | bytes,
    *,
    prefix: bool = False,
    keys_only: bool = False,
    limit: int = 0,
    revision: int = 0,
) -> Get:
    """A range (read) operation; ``prefix`` reads every key starting with ``key``."""
    return Get(*key_range(key, prefix=prefix), keys_only, limit, revision)
