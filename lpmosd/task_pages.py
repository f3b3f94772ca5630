"""Task lists in pages, each list consistent at one etcd revision (Kubernetes' limit + continue).

The first page is read at etcd's current revision; its continue token carries that revision
and the last task key examined, and every later page reads ``key > last`` *as of that
revision*, so a client walking the pages sees every task exactly once, as the whole list
stood when it started, however much is written meanwhile. When etcd has compacted that
revision the list cannot be continued: :class:`~lpmosd.errors.GoneError` (410), the client
starts again without a token — the same contract as the Kubernetes API's.

Reads go to etcd, not to the control plane's watched view: the view holds only the present,
so it could not answer page 2 as of page 1's revision. A page costs a keys-only range scan
(cheap: task keys are interleaved with each machine's meta, lease and credential keys,
whose values a list has no use for) and one read-only Txn of point reads at the list's
revision per :data:`~lpmosd.etcd.txn.MAX_TXN_OPS` tasks.

A token is opaque to clients but never trusted: it is decoded into validated names and a
revision, the start key is rebuilt from the names with :mod:`lpmosd.schema`, and it must
belong to a list with the same filters, so no token can move a read outside the request's
prefix (``/os/`` or ``/os/{idc}/machines/``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Final

from lpmosd import schema, tasklogs
from lpmosd.documents import Task, TaskStatus
from lpmosd.errors import (
    CompactedError,
    FutureRevisionError,
    GoneError,
    ValidationError,
)
from lpmosd.etcd import EtcdClient, KeyValue, get
from lpmosd.etcd.txn import MAX_TXN_OPS, key_range, prefix_end

log = logging.getLogger("lpmosd.store")

#: The largest page a client may ask for.
MAX_LIMIT: Final = 1000
#: The page size of a request that continues a list without naming a limit.
DEFAULT_LIMIT: Final = 500
#: A filtered page examines at most this many times ``limit`` tasks, then answers what it
#: found with a continue token (possibly none at all: a client keeps going while there is a
#: token, as with Kubernetes), so one request's work stays bounded however rare the match.
SCAN_FACTOR: Final = 10
#: At most this many keys per keys-only range read.
KEY_CHUNK: Final = 4096
#: Keys read per task wanted: a machine has its task, meta, lease, a few credentials and
#: its log chunks (about 25 for an install; up to MAX_LOG_CHUNKS).
KEYS_PER_MACHINE: Final = 32
#: The longest token accepted (real ones are about 100 characters).
MAX_TOKEN_CHARS: Final = 1024
_TOKEN_VERSION: Final = 1
_TOKEN_FIELDS: Final = frozenset({"v", "rev", "idc", "sn", "f_idc", "f_status"})


@dataclass(frozen=True, slots=True)
class ContinueToken:
    """Where a list stopped: its revision, the last task examined and the list's filters."""

    revision: int
    idc: str
    sn: str
    filter_idc: str | None
    filter_status: str | None

    def encode(self) -> str:
        """The opaque text handed to the client (URL-safe base64 of a small JSON)."""
        doc = {
            "v": _TOKEN_VERSION,
            "rev": self.revision,
            "idc": self.idc,
            "sn": self.sn,
            "f_idc": self.filter_idc,
            "f_status": self.filter_status,
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> ContinueToken:
        """Parse and validate a client's token; ValidationError naming ``continue``."""
        if len(text) > MAX_TOKEN_CHARS or not text.isascii():
            raise _bad_token("is not a token this server issued")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            doc = json.loads(raw)
        except (binascii.Error, ValueError):
            raise _bad_token("is not a token this server issued") from None
        if not isinstance(doc, dict) or set(doc) != _TOKEN_FIELDS:
            raise _bad_token("is not a token this server issued")
        if doc["v"] != _TOKEN_VERSION:
            raise _bad_token("is of an unknown version")
        rev = doc["rev"]
        if isinstance(rev, bool) or not isinstance(rev, int) or rev < 1:
            raise _bad_token("has a bad revision")
        status = doc["f_status"]
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise _bad_token("has a bad status filter")
        try:
            idc, sn = schema.validate_idc(doc["idc"]), schema.validate_sn(doc["sn"])
            f_idc = None if doc["f_idc"] is None else schema.validate_idc(doc["f_idc"])
        except ValidationError:
            raise _bad_token("names no valid task key") from None
        return cls(rev, idc, sn, f_idc, status)


def _bad_token(why: str) -> ValidationError:
    return ValidationError(
        f"continue {why}; pass the metadata.continue of the previous page unchanged, "
        "or start the list again without it",
        field="continue",
    )


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task list: the tasks, the list's revision, the next page's token."""

    tasks: list[Task]
    revision: int
    continue_token: str | None


def parse_limit(value: str | None, *, continuing: bool) -> int | None:
    """The ``limit`` query argument: None (no paging) when absent and not continuing."""
    if value is None or value == "":
        return DEFAULT_LIMIT if continuing else None
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    return int(value)


async def read_task_page(
    client: EtcdClient,
    *,
    idc: str | None,
    status: TaskStatus | None,
    limit: int,
    continue_token: str | None,
) -> TaskPage:
    """One page of at most ``limit`` tasks (of ``idc``, of ``status``), sorted by key.

    Raises ValidationError (``continue``) for a token that is malformed, forged or of a
    list with other filters, and GoneError (410) when the list's revision was compacted.
    """
    prefix = schema.machines_prefix(idc) if idc else schema.ROOT
    start, end = key_range(prefix, prefix=True)
    revision = 0
    f_status = status.value if status else None
    if continue_token is not None:
        token = ContinueToken.decode(continue_token)
        if token.filter_idc != idc or token.filter_status != f_status:
            raise ValidationError(
                "continue belongs to a list with other filters "
                f"(idc={token.filter_idc or ''}, status={token.filter_status or ''}); "
                "pass the same idc and status as the first page",
                field="continue",
            )
        # Rebuilt from validated names, and inside the prefix: the token's IDC is the
        # filter's (checked above) or the prefix is all of /os/.
        start = schema.task_key(token.idc, token.sn).encode() + b"\0"
        revision = token.revision
    try:
        return await _scan(client, start, end, revision, status, limit, idc)
    except CompactedError:
        raise GoneError(
            f"the list's revision {revision} has been compacted, so it cannot be continued "
            "consistently; start the list again without continue",
            field="continue",
        ) from None
    except FutureRevisionError:
        raise _bad_token("names a revision etcd has not reached") from None


async def _scan(
    client: EtcdClient,
    start: bytes,
    end: bytes,
    revision: int,
    status: TaskStatus | None,
    limit: int,
    idc: str | None,
) -> TaskPage:
    budget = limit * SCAN_FACTOR if status is not None else limit
    tasks: list[Task] = []
    examined = 0
    last: schema.ParsedKey | None = None
    # Task keys found by the key scan and not yet examined, in key order.
    pending: list[tuple[bytes, schema.ParsedKey]] = []
    cursor: bytes | None = start  # where the key scan goes on; None: nothing left
    while len(tasks) < limit and examined < budget:
        if not pending:
            if cursor is None:
                break
            chunk = await _task_keys(client, cursor, end, revision, budget - examined)
            revision, cursor, pending = chunk.revision, chunk.cursor, chunk.keys
            continue
        batch = pending[: min(MAX_TXN_OPS // 2, budget - examined)]
        for kv, (_, parsed) in zip(await _read(client, batch, revision), batch, strict=True):
            # Examine the batch in order, stopping at a full page: the rest stays pending.
            if len(tasks) >= limit:
                break
            examined += 1
            del pending[0]
            last = parsed
            task = _load(*kv) if kv is not None else None
            if task is not None and (status is None or task.status is status):
                tasks.append(task)
    if last is None or not (pending or await _any_task(client, cursor, end, revision)):
        return TaskPage(tasks, revision, None)
    token = ContinueToken(revision, last.idc, last.sn, idc, status.value if status else None)
    return TaskPage(tasks, revision, token.encode())


@dataclass(frozen=True, slots=True)
class _Chunk:
    revision: int
    #: Where the next scan starts; None when the range is exhausted.
    cursor: bytes | None
    keys: list[tuple[bytes, schema.ParsedKey]]


_ROOT: Final = schema.ROOT.encode()
_MACHINES: Final = b"machines/"


async def _task_keys(
    client: EtcdClient, start: bytes, end: bytes, revision: int, wanted: int
) -> _Chunk:
    """The task keys of one keys-only range read from ``start``, as of ``revision`` (0: now).

    Every value decoded costs CPU (pure-Python protobuf), so the read is sized to about
    what ``wanted`` tasks need (a machine has a handful of keys besides its task), and it
    jumps over whatever lies outside ``/os/{idc}/machines/`` — an IDC's server directory,
    with one key per machine, would otherwise be scanned key by key for nothing.
    """
    size = max(64, min(KEY_CHUNK, wanted * KEYS_PER_MACHINE))
    r = await client.range(start, range_end=end, limit=size, revision=revision, keys_only=True)
    keys: list[tuple[bytes, schema.ParsedKey]] = []
    cursor: bytes | None = r.kvs[-1].key + b"\0" if r.more and r.kvs else None
    for kv in r.kvs:
        if (jump := _outside_machines(kv.key)) is not None:
            # Resume at the jump unless it leads past the range's end.
            cursor = jump if jump < end else None
            break
        if (parsed := _task_key(kv)) is not None:
            keys.append((kv.key, parsed))
    return _Chunk(revision or r.revision, cursor, keys)


def _outside_machines(key: bytes) -> bytes | None:
    """None for a key under some ``/os/{idc}/machines/``; else where the next one may be."""
    rest = key[len(_ROOT) :] if key.startswith(_ROOT) else b""
    idc, slash, tail = rest.partition(b"/")
    if not slash:
        return key + b"\0"
    if tail.startswith(_MACHINES):
        return None
    directory = _ROOT + idc + b"/"
    return directory + _MACHINES if tail < _MACHINES else prefix_end(directory)


def _task_key(kv: KeyValue) -> schema.ParsedKey | None:
    parsed = schema.parse_key(kv.key)
    return parsed if parsed is not None and parsed.kind == "task" else None


async def _read(
    client: EtcdClient, batch: list[tuple[bytes, schema.ParsedKey]], revision: int
) -> list[tuple[KeyValue, list[KeyValue]] | None]:
    """The values of ``batch``'s keys, each with its log chunks, as of ``revision``: one
    read-only Txn (two reads per task)."""
    ops = []
    for key, parsed in batch:
        ops.append(get(key, revision=revision))
        ops.append(get(schema.logs_prefix(parsed.idc, parsed.sn), prefix=True, revision=revision))
    r = await client.txn([], ops)
    out: list[tuple[KeyValue, list[KeyValue]] | None] = []
    for doc, chunks in zip(r.responses[0::2], r.responses[1::2], strict=True):
        kvs = getattr(doc, "kvs", None)
        out.append((kvs[0], list(getattr(chunks, "kvs", []))) if kvs else None)
    return out


async def _any_task(client: EtcdClient, cursor: bytes | None, end: bytes, revision: int) -> bool:
    """Whether a task key lies at or after ``cursor`` (so a full page is not the last)."""
    while cursor is not None:
        chunk = await _task_keys(client, cursor, end, revision, 1)
        if chunk.keys:
            return True
        cursor = chunk.cursor
    return False


def _load(kv: KeyValue, chunks: list[KeyValue]) -> Task | None:
    try:
        return tasklogs.assemble(Task.from_json(kv.value), tasklogs.chunks_of(chunks))
    except ValidationError as exc:
        # As in Store.list_tasks: one bad document must not take the listing down.
        log.warning(
            "invalid task document skipped",
            extra={"key": kv.key.decode(errors="replace"), "error": exc.message},
        )
        return None
