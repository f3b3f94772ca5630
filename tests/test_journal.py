"""The regional's report journal: durable, bounded, ordered per agent, survives restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpmosd.journal import JournalFullError, ReportJournal


def test_entries_survive_a_restart_and_leave_once_applied(tmp_path: Path) -> None:
    journal = ReportJournal(tmp_path, "dc1")
    a1 = journal.append("sn-a", "progress", {"step": "s1", "percent": 50, "message": ""})
    b1 = journal.append("sn-b", "logs", {"lines": ["x"], "level": "INFO"})
    a2 = journal.append("sn-a", "complete", {"reason": ""})
    assert [[e.seq for e in g] for g in journal.by_agent()] == [[a1.seq, a2.seq], [b1.seq]]
    journal.applied(b1)  # agents are applied in parallel: not in file order

    # A new process (the regional restarted) finds what was not applied, in order.
    again = ReportJournal(tmp_path, "dc1")
    again.load()
    assert [(e.sn, e.op) for e in again.entries.values()] == [
        ("sn-a", "progress"),
        ("sn-a", "complete"),
    ]
    assert again.has("sn-a") and not again.has("sn-b")
    first, second = again.by_agent()[0]
    again.applied(first)
    again.applied(second)
    assert len(again) == 0 and not again.has("sn-a")
    # All applied: the files start afresh, the numbering goes on.
    assert (tmp_path / "journal-dc1.jsonl").read_bytes() == b""
    later = again.append("sn-c", "fail", {"reason": "boom"})
    assert later.seq == a2.seq + 1
    third = ReportJournal(tmp_path, "dc1")
    third.load()
    assert [e.seq for e in third.entries.values()] == [later.seq]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = ReportJournal(tmp_path, "dc1")
    journal.append("sn-a", "progress", {"step": "s1", "percent": 1, "message": ""})
    with (tmp_path / "journal-dc1.jsonl").open("ab") as f:
        f.write(b'{"seq": 2, "sn": "sn-a", "op": "pro')  # crashed mid-append
    again = ReportJournal(tmp_path, "dc1")
    again.load()
    assert [e.seq for e in again.entries.values()] == [1]
    # The torn report was never acknowledged: its number is used again, on a line of its own.
    assert again.append("sn-a", "logs", {"lines": [], "level": "INFO"}).seq == 2
    third = ReportJournal(tmp_path, "dc1")
    third.load()
    assert [(e.seq, e.op) for e in third.entries.values()] == [(1, "progress"), (2, "logs")]


def test_the_journal_is_bounded(tmp_path: Path) -> None:
    journal = ReportJournal(tmp_path, "dc1", max_entries=2)
    journal.append("sn-a", "progress", {"step": "s", "percent": 1, "message": ""})
    entry = journal.append("sn-a", "progress", {"step": "s", "percent": 2, "message": ""})
    with pytest.raises(JournalFullError, match="full"):
        journal.append("sn-a", "progress", {"step": "s", "percent": 3, "message": ""})
    journal.applied(entry)
    journal.append("sn-a", "progress", {"step": "s", "percent": 3, "message": ""})
