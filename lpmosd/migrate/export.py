"""``lpmosd migrate export`` / ``import``: a re-importable JSON snapshot of the v2 keys.

File format (``"format": "lpmosd-v2-export/1"``)::

    {
      "format": "lpmosd-v2-export/1",
      "exported_at": "2026-01-30T12:00:00Z",
      "endpoints": ["http://10.0.0.1:2379"],
      "idcs": {"dc1": {"revision": 1234, "keys": 1001}},
      "keys": [
        {"key": "/os/dc1/servers", "value": "[\\"sn-001\\"]",
         "create_revision": 5, "mod_revision": 900, "version": 12, "lease": 0},
        {"key": "/os/dc1/machines/sn-001/tasks", "value_b64": "...", ...}
      ]
    }

Each IDC is read at one revision (``idcs.*.revision``); every key keeps its revisions, so
``verify --against`` can tell whether a server changed after the export. A value is stored
as text when it is UTF-8, else base64 (``value_b64``): the bytes round-trip exactly.

``import`` writes each v2 key back only where it is absent (one guarded Txn per key), so it
never overwrites anything; it reports keys that exist with other content. etcd assigns new
revisions on import, and keys bound to a lease are restored without it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

import trio

from lpmosd import timestamps
from lpmosd.errors import LpmosdError
from lpmosd.etcd import Compare, EtcdClient, KeyValue, get, put
from lpmosd.etcd.types import RangeResult
from lpmosd.migrate import v2
from lpmosd.migrate.plan import read_snapshot
from lpmosd.schema import NAME_RE, ROOT

__all__ = [
    "EXPORT_FORMAT",
    "Export",
    "ExportError",
    "ExportedKey",
    "ImportReport",
    "discover_idcs",
    "export_v2",
    "import_v2",
    "read_export",
    "write_export",
]

EXPORT_FORMAT: Final = "lpmosd-v2-export/1"


class ExportError(LpmosdError):
    """An export file that cannot be read or is not an lpmosd v2 export."""


@dataclass(frozen=True, slots=True)
class ExportedKey:
    """One key of an export."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Self:
        """From a KeyValue read from etcd."""
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the value as text when it is UTF-8, else base64."""
        d: dict[str, Any] = {"key": self.key.decode("utf-8", errors="surrogateescape")}
        try:
            d["value"] = self.value.decode("utf-8")
        except UnicodeDecodeError:
            d["value_b64"] = base64.b64encode(self.value).decode("ascii")
        d |= {
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
            "lease": self.lease,
        }
        return d

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Self:
        """Parse one entry of ``keys``; ExportError naming ``where`` when it is bad."""
        try:
            key = str(obj["key"]).encode("utf-8", errors="surrogateescape")
            if "value_b64" in obj:
                value = base64.b64decode(obj["value_b64"], validate=True)
            else:
                value = str(obj["value"]).encode("utf-8")
            return cls(
                key,
                value,
                int(obj["create_revision"]),
                int(obj["mod_revision"]),
                int(obj["version"]),
                int(obj.get("lease", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise ExportError(f"{where}: bad key entry: {exc}") from None


def _v2_kind(key: bytes) -> tuple[str, str, str] | None:
    """``(idc, kind, sn)`` for a v2 key (kind "list", "tasks" or "state"), else None."""
    text = key.decode("utf-8", errors="surrogateescape")
    if not text.startswith(ROOT):
        return None
    idc, sep, rest = text[len(ROOT) :].partition("/")
    if not sep or NAME_RE.fullmatch(idc) is None:
        return None
    if rest == "servers":
        return idc, "list", ""
    found = v2.machine_doc_kind(key, v2.machines_prefix(idc).encode())
    if found is None:
        return None
    kind, sn = found
    return idc, kind, sn


@dataclass(frozen=True, slots=True)
class Export:
    """A loaded (or freshly made) export."""

    keys: tuple[ExportedKey, ...]
    idcs: dict[str, int] = field(default_factory=dict)  # idc → revision
    exported_at: str = ""
    endpoints: tuple[str, ...] = ()

    def has_idc(self, idc: str) -> bool:
        """The export covers ``idc`` (even if it had no keys)."""
        return idc in self.idcs

    def keys_of(self, idc: str) -> list[ExportedKey]:
        """The exported keys of one IDC."""
        out = []
        for k in self.keys:
            kind = _v2_kind(k.key)
            if kind is not None and kind[0] == idc:
                out.append(k)
        return out

    def servers(self, idc: str) -> dict[str, dict[str, ExportedKey]]:
        """sn → {"tasks": key, "state": key} of one IDC's machine documents."""
        out: dict[str, dict[str, ExportedKey]] = {}
        for k in self.keys:
            kind = _v2_kind(k.key)
            if kind is not None and kind[0] == idc and kind[1] != "list":
                out.setdefault(kind[2], {})[kind[1]] = k
        return out

    def listed(self, idc: str) -> list[str]:
        """The serial numbers of the exported list key (``[]`` if absent or malformed)."""
        for k in self.keys_of(idc):
            if k.key == v2.list_key(idc).encode():
                try:
                    value = json.loads(k.value)
                except ValueError:
                    return []
                return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []
        return []

    def to_dict(self) -> dict[str, Any]:
        """JSON form (see the module docstring)."""
        return {
            "format": EXPORT_FORMAT,
            "exported_at": self.exported_at,
            "endpoints": list(self.endpoints),
            "idcs": {
                idc: {"revision": rev, "keys": len(self.keys_of(idc))}
                for idc, rev in sorted(self.idcs.items())
            },
            "keys": [k.to_dict() for k in self.keys],
        }


async def discover_idcs(client: EtcdClient) -> list[str]:
    """IDCs that have v2 keys or migration records (one keys-only scan of ``/os/``)."""
    from lpmosd.migrate.record import RECORDS_ROOT

    found: set[str] = set()
    start = ROOT.encode()
    end = b"/os0"  # prefix_end(b"/os/")
    while True:
        r = await client.range(start, range_end=end, limit=2000, keys_only=True)
        for kv in r.kvs:
            kind = _v2_kind(kv.key)
            if kind is not None:
                found.add(kind[0])
            elif kv.key.startswith(RECORDS_ROOT.encode()):
                idc = kv.key[len(RECORDS_ROOT) :].split(b"/", 1)[0].decode(errors="replace")
                if NAME_RE.fullmatch(idc):
                    found.add(idc)
        if not r.more or not r.kvs:
            return sorted(found)
        start = r.kvs[-1].key + b"\0"


async def export_v2(client: EtcdClient, idcs: Sequence[str]) -> Export:
    """Snapshot the v2 keys of ``idcs`` (each IDC at one revision)."""
    keys: list[ExportedKey] = []
    revs: dict[str, int] = {}
    for idc in idcs:
        snap = await read_snapshot(client, idc)
        revs[idc] = snap.revision
        if snap.list_kv is not None:
            keys.append(ExportedKey.from_kv(snap.list_kv))
        keys.extend(ExportedKey.from_kv(kv) for kv in snap.machines if _v2_kind(kv.key))
    return Export(
        keys=tuple(keys),
        idcs=revs,
        exported_at=timestamps.format_ts(timestamps.utcnow()),
        endpoints=tuple(client.endpoints),
    )


def write_export(export: Export, path: str | Path) -> None:
    """Write ``export`` to ``path`` (``-``: stdout) atomically, readable by the owner only."""
    text = json.dumps(export.to_dict(), indent=1, ensure_ascii=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path)
    # Same directory, then rename: a crash never leaves a half-written backup in place.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # v2 documents name machines and people
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_export(path: str | Path) -> Export:
    """Load an export file; ExportError with the reason when it is not a valid one."""
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
        obj = json.loads(text)
    except OSError as exc:
        raise ExportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not an lpmosd v2 export (format {EXPORT_FORMAT!r})")
    raw_keys = obj.get("keys")
    raw_idcs = obj.get("idcs")
    if not isinstance(raw_keys, list) or not isinstance(raw_idcs, dict):
        raise ExportError(f"{path}: 'keys' must be a list and 'idcs' an object")
    keys = tuple(ExportedKey.from_dict(k, f"{path}: keys[{i}]") for i, k in enumerate(raw_keys))
    for i, k in enumerate(keys):
        if _v2_kind(k.key) is None:
            # Refuse rather than write arbitrary keys from a hand-edited file.
            raise ExportError(f"{path}: keys[{i}] {k.key!r} is not a v2 key")
    idcs: dict[str, int] = {}
    for idc, meta in raw_idcs.items():
        rev = meta.get("revision", 0) if isinstance(meta, dict) else 0
        idcs[str(idc)] = int(rev) if isinstance(rev, int) else 0
    return Export(
        keys=keys,
        idcs=idcs,
        exported_at=str(obj.get("exported_at", "")),
        endpoints=tuple(str(e) for e in obj.get("endpoints", []) if isinstance(e, str)),
    )


@dataclass(slots=True)
class ImportReport:
    """What ``import`` did, per key."""

    restored: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No key was in the way."""
        return not self.conflicts


async def import_v2(
    client: EtcdClient,
    export: Export,
    *,
    idcs: Iterable[str] | None = None,
    dry_run: bool = False,
    concurrency: int = 8,
    on_key: Callable[[str, str], None] | None = None,
) -> ImportReport:
    """Write the export's v2 keys back where they are absent (see the module docstring)."""
    wanted = set(idcs) if idcs is not None else set(export.idcs)
    report = ImportReport()
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def one(k: ExportedKey) -> None:
        name = k.key.decode("utf-8", errors="replace")
        async with limiter:
            if dry_run:
                current = await client.get(k.key)
                ok = current is None
            else:
                r = await client.txn([Compare.absent(k.key)], [put(k.key, k.value)], [get(k.key)])
                ok = r.succeeded
                current = None
                if not ok:
                    got = r.responses[0]
                    assert isinstance(got, RangeResult)
                    current = got.kvs[0] if got.kvs else None
        if ok:
            status = "would restore" if dry_run else "restored"
            report.restored.append(name)
        elif current is not None and current.value == k.value:
            status = "unchanged"
            report.unchanged.append(name)
        else:
            status = "exists with other content (not overwritten)"
            report.conflicts.append(name)
        if on_key is not None:
            on_key(name, status)

    async with trio.open_nursery() as nursery:
        for k in export.keys:
            kind = _v2_kind(k.key)
            if kind is not None and kind[0] in wanted:
                nursery.start_soon(one, k)
    return report
