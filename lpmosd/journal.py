"""The regional's durable journal of agent reports it could not commit to etcd.

While etcd is unreachable from the regional (a WAN cut, etcd down) the agents keep
installing and reporting. Their reports (progress, logs, complete, fail) are appended here,
one JSON line each, fsynced before the agent is told "journaled" (202), and applied in order
— each still a compare-and-swap on the task — once etcd answers again. The file lives under
the state directory and survives a restart of the regional: what a crashed regional had
journaled is applied by the next one.

Files: ``journal-{idc}.jsonl`` (entries, each with a sequence number), ``journal-{idc}.done``
(sequence numbers applied, one a line: entries of different agents are applied in parallel,
so not in file order) and ``journal-{idc}.applied`` (the highest number ever used, kept when
both are emptied once everything is applied). An entry applied but not yet marked when the
regional dies is applied again: each carries the operation id of the agent's request, so
etcd's copy recognises it and it is not applied twice. Order is kept per agent.
The journal is bounded (``max_entries``): when full, reports are refused (503) and the agents
keep retrying them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lpmosd.errors import UnavailableError

log = logging.getLogger("lpmosd.journal")

Op = Literal["progress", "logs", "complete", "fail"]
OPS: frozenset[str] = frozenset({"progress", "logs", "complete", "fail"})


class JournalFullError(UnavailableError):
    """The journal holds ``max_entries`` reports: refuse (503) until etcd takes them."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One journaled report of agent ``sn``."""

    seq: int
    sn: str
    op: Op
    args: dict[str, Any]

    def to_line(self) -> bytes:
        doc = {"seq": self.seq, "sn": self.sn, "op": self.op, "args": self.args}
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


class ReportJournal:
    """Append-only, fsynced, bounded; entries leave once applied (in order per agent)."""

    def __init__(self, directory: Path, idc: str, *, max_entries: int = 100_000) -> None:
        self.directory = directory
        self.path = directory / f"journal-{idc}.jsonl"
        self.done_path = directory / f"journal-{idc}.done"
        self.applied_path = directory / f"journal-{idc}.applied"
        self.max_entries = max_entries
        #: seq -> entry, in journal order.
        self.entries: dict[int, Entry] = {}
        self._per_sn: dict[str, int] = {}
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self.entries)

    def has(self, sn: str) -> bool:
        """Whether reports of ``sn`` wait in the journal (later ones must queue behind)."""
        return self._per_sn.get(sn, 0) > 0

    def load(self) -> None:
        """Read what a previous run left (entries not yet applied)."""
        try:
            self._next_seq = int(self.applied_path.read_text().strip() or "0") + 1
        except FileNotFoundError:
            self._next_seq = 1
        except ValueError:
            log.error("journal marker unreadable", extra={"path": str(self.applied_path)})
        done: set[int] = set()
        try:
            for word in self.done_path.read_text().split():
                if word.isdigit():
                    done.add(int(word))
        except FileNotFoundError:
            pass
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        if raw and not raw.endswith(b"\n"):
            # A torn last line (crash mid-append, never acknowledged): cut it off, so the
            # next append starts a line of its own.
            raw = raw[: raw.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(raw))
                os.fsync(f.fileno())
        for number, line in enumerate(raw.splitlines(), start=1):
            try:
                doc = json.loads(line)
                entry = Entry(int(doc["seq"]), str(doc["sn"]), doc["op"], dict(doc["args"]))
                if entry.op not in OPS:
                    raise ValueError(entry.op)
            except (ValueError, KeyError, TypeError):
                log.warning("journal line unreadable; skipped", extra={"line": number})
                continue
            self._next_seq = max(self._next_seq, entry.seq + 1)
            if entry.seq not in done:
                self._push(entry)
        if self.entries:
            log.warning(
                "journal holds reports from before the restart",
                extra={"entries": len(self.entries), "path": str(self.path)},
            )

    def _push(self, entry: Entry) -> None:
        self.entries[entry.seq] = entry
        self._per_sn[entry.sn] = self._per_sn.get(entry.sn, 0) + 1

    def append(self, sn: str, op: Op, args: dict[str, Any]) -> Entry:
        """Write one report durably (fsync) and queue it; JournalFullError when full."""
        if len(self.entries) >= self.max_entries:
            raise JournalFullError(
                f"the regional's report journal is full ({self.max_entries} reports waiting "
                "for etcd); retry later"
            )
        entry = Entry(self._next_seq, sn, op, args)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, entry.to_line())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._next_seq += 1
        self._push(entry)
        return entry

    def by_agent(self) -> list[list[Entry]]:
        """The entries waiting, grouped per agent, each group in journal order."""
        groups: dict[str, list[Entry]] = {}
        for entry in self.entries.values():
            groups.setdefault(entry.sn, []).append(entry)
        return list(groups.values())

    def applied(self, entry: Entry) -> None:
        """``entry`` is in etcd (or can never be): take it out, durably enough."""
        if self.entries.pop(entry.seq, None) is None:
            return
        left = self._per_sn[entry.sn] - 1
        if left:
            self._per_sn[entry.sn] = left
        else:
            del self._per_sn[entry.sn]
        if self.entries:
            with self.done_path.open("a") as f:
                f.write(f"{entry.seq}\n")
            return
        # Everything applied: start afresh (the marker keeps the numbering going).
        tmp = self.applied_path.with_suffix(".tmp")
        tmp.write_text(f"{self._next_seq - 1}\n")
        os.replace(tmp, self.applied_path)
        for path in (self.path, self.done_path):
            with path.open("wb") as f:
                os.fsync(f.fileno())
