"""Migration records: what each server was migrated from, kept in etcd.

``/os/_migrate-v2/{idc}/{sn}`` is written in the same Txn that creates the v3 keys and deletes
the v2 documents. It holds the v2 documents verbatim with their revisions, so:

- a re-run tells "already migrated" apart from "listed but never had documents";
- ``verify`` recomputes the expected v3 task from it and compares byte for byte (the record
  and the v3 task share one mod_revision until the daemon next updates the task);
- nothing of v2 is lost, even fields v3 has no place for.

``_migrate-v2`` cannot be an IDC name (names start with a letter or digit), so the records
never collide with the v3 layout, and they stay under ``/os/``, which the daemon's etcd user
may already access. They are small and can be deleted (``lpmosd migrate purge-records``)
once the migration has been verified and the v2 backup archived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Self

from lpmosd.errors import ValidationError
from lpmosd.etcd import KeyValue
from lpmosd.schema import ROOT, validate_idc, validate_sn
from lpmosd.timestamps import format_ts, parse_ts

__all__ = ["FORMAT", "RECORDS_ROOT", "MigrationRecord", "RawDoc", "record_key", "records_prefix"]

RECORDS_ROOT: Final = f"{ROOT}_migrate-v2/"
FORMAT: Final = "lpmosd-migrate-v2/1"


def records_prefix(idc: str) -> str:
    """``/os/_migrate-v2/{idc}/``."""
    return f"{RECORDS_ROOT}{validate_idc(idc)}/"


def record_key(idc: str, sn: str) -> str:
    """``/os/_migrate-v2/{idc}/{sn}``."""
    return f"{records_prefix(idc)}{validate_sn(sn)}"


@dataclass(frozen=True, slots=True)
class RawDoc:
    """A v2 document as it was in etcd."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Self:
        """From the KeyValue the migration read."""
        return cls(kv.value, kv.create_revision, kv.mod_revision, kv.version)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the value is text (the merge has checked it is UTF-8 JSON)."""
        return {
            "value": self.value.decode("utf-8"),
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> Self:
        """Inverse of :meth:`to_dict` (ValueError/KeyError/TypeError on a bad record)."""
        return cls(
            str(obj["value"]).encode("utf-8"),
            int(obj["create_revision"]),
            int(obj["mod_revision"]),
            int(obj["version"]),
        )


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    """One migrated server: its v2 documents, whether it was listed, when, and by what."""

    idc: str
    sn: str
    tasks: RawDoc
    state: RawDoc | None
    listed: bool
    migrated_at: datetime
    list_mod_revision: int = 0

    def to_json(self) -> bytes:
        """Compact JSON."""
        doc = {
            "format": FORMAT,
            "idc": self.idc,
            "sn": self.sn,
            "migrated_at": format_ts(self.migrated_at),
            "listed": self.listed,
            "list_mod_revision": self.list_mod_revision,
            "tasks": self.tasks.to_dict(),
            "state": None if self.state is None else self.state.to_dict(),
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """Parse a record; ValueError when it is not one."""
        try:
            obj = json.loads(data)
            if obj.get("format") != FORMAT:
                raise ValueError(f"unknown record format {obj.get('format')!r}")
            return cls(
                idc=str(obj["idc"]),
                sn=str(obj["sn"]),
                tasks=RawDoc.from_dict(obj["tasks"]),
                state=None if obj["state"] is None else RawDoc.from_dict(obj["state"]),
                listed=bool(obj["listed"]),
                migrated_at=parse_ts(obj["migrated_at"], "migrated_at"),
                list_mod_revision=int(obj.get("list_mod_revision", 0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError, ValidationError) as exc:
            raise ValueError(f"not a migration record: {exc}") from None
