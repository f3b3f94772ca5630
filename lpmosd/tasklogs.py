"""Task log lines outside the task document: one append-only key per written batch.

Every task write used to rewrite the whole document, log lines included (29 of a finished
install's 32 KB), and etcd keeps every revision until compaction. Now a write that adds
lines puts them once, in a chunk key ``/os/{idc}/machines/{sn}/logs/{seq:06d}``; the
document keeps only the bookkeeping (:attr:`~lpmosd.documents.Task.log_seq`,
``log_chunks``, ``log_skip``, ``logs_dropped``). :func:`split` turns the task a write
function returned into that stored form plus the ops for the same Txn — the chunk put,
and deletes of the oldest chunks the cap drops — so the append, the cap and the
document's operation id commit together (exactly once). :func:`assemble` puts the lines
back into :attr:`~lpmosd.documents.Task.logs` for readers, so the API and the dashboard
see the same task as before.

The cap is the same as before in lines (:data:`~lpmosd.documents.MAX_LOG_LINES`, the
newest kept, the oldest chunk partly hidden by ``log_skip``) and in bytes
(:data:`~lpmosd.documents.MAX_LOG_BYTES`), where whole chunks are dropped (a chunk's
lines are not in the document to measure one by one), and at most
:data:`~lpmosd.documents.MAX_LOG_CHUNKS` chunks are kept.

A chunk's value is the JSON list of its lines, zlib-compressed when that is smaller
(installer output compresses 3-4x; a finished task's lines are most of what stays in etcd).
JSON starts with ``[``, zlib never does, so both read.

A document written before this (lines inline in ``logs``, no chunks) still reads as it
is; its next log write moves the inline lines into the first chunk.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from lpmosd import schema
from lpmosd.documents import MAX_LOG_BYTES, MAX_LOG_CHUNKS, MAX_LOG_LINES, LogChunk, Task
from lpmosd.etcd import KeyValue, Op, delete, put
from lpmosd.fields import SURROGATE_RE, dump_json, json_len

__all__ = ["assemble", "chunk_lines", "chunk_value", "chunks_of", "split", "stored_form"]

log = logging.getLogger("lpmosd.tasklogs")

#: Chunks smaller than this are stored as plain JSON (a line or two gain nothing).
_COMPRESS_FROM = 256
#: A stored chunk never expands beyond this (one batch is capped at MAX_LOG_BYTES of
#: lines): a larger value is not one of ours, and is not inflated further.
_MAX_CHUNK_JSON = 4 * MAX_LOG_BYTES


def _size(lines: Sequence[str]) -> int:
    # The cap's measure (lifecycle.cap_logs): each line's JSON string plus its comma.
    return sum(json_len(line) + 1 for line in lines)


def split(idc: str, sn: str, old: Task, new: Task) -> tuple[Task, tuple[Op, ...]]:
    """The stored form of ``new`` (what a write function made of the stored ``old``) and
    the ops writing its new log lines, for the Txn that writes the document.

    ``old`` is a stored document (no chunk lines in ``logs``), so every line in
    ``new.logs`` is one this write adds, after any still inline from an old document.
    """
    if new.logs == old.logs:
        return new, ()
    lines = new.logs
    seq = new.log_seq + 1
    chunks = [*new.log_chunks, LogChunk(seq, len(lines), _size(lines))]
    skip, dropped = new.log_skip, new.logs_dropped
    gone: list[LogChunk] = []

    def drop_oldest() -> int:
        nonlocal skip
        chunk = chunks.pop(0)
        gone.append(chunk)
        visible, skip = chunk.lines - skip, 0
        return visible

    while len(chunks) > 1 and (
        len(chunks) > MAX_LOG_CHUNKS or 2 + sum(c.size for c in chunks) > MAX_LOG_BYTES
    ):
        dropped += drop_oldest()
    excess = sum(c.lines for c in chunks) - skip - MAX_LOG_LINES
    while excess > 0 and len(chunks) > 1 and chunks[0].lines - skip <= excess:
        n = drop_oldest()
        excess -= n
        dropped += n
    if excess > 0:  # part of the oldest chunk: hidden until the whole chunk goes
        skip += excess
        dropped += excess
    doc = replace(
        new,
        logs=(),
        logs_dropped=dropped,
        log_seq=seq,
        log_chunks=tuple(chunks),
        log_skip=skip,
    )
    ops: list[Op] = [put(schema.log_chunk_key(idc, sn, seq), chunk_value(lines))]
    ops.extend(delete(schema.log_chunk_key(idc, sn, c.seq)) for c in gone)
    return doc, tuple(ops)


def stored_form(idc: str, sn: str, task: Task) -> tuple[Task, tuple[Op, ...]]:
    """A whole task (lines in ``logs``, none in chunks yet: a migrated one) as a first
    write stores it: the document and the put of its lines as chunk 1. Deterministic, so
    a verifier can compare the stored bytes."""
    return split(idc, sn, replace(task, logs=()), task)


def chunk_value(lines: Sequence[str]) -> bytes:
    """What a chunk key holds: the lines as a JSON list, compressed when that is smaller."""
    raw = dump_json(list(lines))
    if len(raw) >= _COMPRESS_FROM:
        packed = zlib.compress(raw, 6)
        if len(packed) < len(raw):
            return packed
    return raw


def chunk_lines(value: bytes) -> tuple[str, ...] | None:
    """The lines stored in a chunk key's value; None when it is not a list of strings."""
    if value[:1] != b"[":
        inflate = zlib.decompressobj()
        try:
            value = inflate.decompress(value, _MAX_CHUNK_JSON)
        except zlib.error:
            return None
        if not inflate.eof or inflate.unconsumed_tail:
            return None  # truncated, or larger than any chunk we write
    try:
        raw = json.loads(value)
    except ValueError:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(x, str) and not SURROGATE_RE.search(x) for x in raw
    ):
        return None
    return tuple(raw)


def chunks_of(kvs: Iterable[KeyValue]) -> dict[int, tuple[str, ...]]:
    """The readable chunk keys among ``kvs`` (one machine's), by sequence number."""
    out: dict[int, tuple[str, ...]] = {}
    for kv in kvs:
        parsed = schema.parse_key(kv.key)
        if parsed is None or parsed.kind != "logs":
            continue
        lines = chunk_lines(kv.value)
        if lines is None:
            log.warning(
                "unreadable log chunk skipped", extra={"key": kv.key.decode(errors="replace")}
            )
            continue
        out[parsed.seq] = lines
    return out


def assemble(doc: Task, chunks: Mapping[int, Sequence[str]]) -> Task:
    """``doc`` with its chunks' lines in ``logs`` (what the API shows).

    The result is for reading: it no longer lists chunks, so writing it back as a
    document could only orphan chunk keys, never duplicate lines. A chunk missing from
    ``chunks`` (a view that has not seen it yet) is left out.
    """
    if not doc.log_chunks:
        return doc
    lines = list(doc.logs)
    for i, chunk in enumerate(doc.log_chunks):
        got = chunks.get(chunk.seq)
        if got is None:
            continue
        lines.extend(got[doc.log_skip :] if i == 0 else got)
    return replace(doc, logs=tuple(lines), log_chunks=(), log_skip=0)
