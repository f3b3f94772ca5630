"""mergeTaskAndState: v2 tasks + state → one v3 task (pure, no etcd)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from lpmosd.documents import MAX_LOG_LINES, ServerEntry, Task, TaskStatus
from lpmosd.migrate.merge import Malformed, merge_task_and_state
from lpmosd.migrate.v2 import example_server, state_doc, task_doc
from lpmosd.timestamps import format_ts

from .helpers import BASE

T0 = BASE
T1 = BASE + timedelta(minutes=1)
T2 = BASE + timedelta(minutes=2)


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def tasks(**changes: Any) -> dict[str, Any]:
    doc = task_doc("sn-001", task_id="task-001", mac="00-1A-2B-3C-4D-5E", created_at=T0)
    doc.update(changes)
    return doc


def step(name: str, percent: int, ts: Any = T1, message: str = "") -> dict[str, Any]:
    return {"step": name, "percent": percent, "timestamp": format_ts(ts), "message": message}


def test_guide_fields_and_state_merge() -> None:
    approval = {
        "approved": True,
        "approved_by": "admin@example.com",
        "approved_at": format_ts(T1),
        "notes": "Hardware verified",
    }
    state = state_doc(
        "installing",
        updated_at=T2,
        progress=[step("hardware_collect", 100), step("partitioning", 50, T2, "Creating...")],
        logs=["2026-01-30T12:00:00Z [INFO] Task created"],
    )
    m = merge_task_and_state("dc1", "sn-001", enc(tasks(approval=approval)), enc(state))
    t = m.task
    assert (t.task_id, t.idc, t.sn, t.mac) == ("task-001", "dc1", "sn-001", "00:1a:2b:3c:4d:5e")
    assert t.status is TaskStatus.INSTALLING
    assert [p.step for p in t.progress] == ["hardware_collect", "partitioning"]
    assert t.progress[1].percent == 50 and t.progress[1].message == "Creating..."
    assert t.logs == ("2026-01-30T12:00:00Z [INFO] Task created",)
    assert t.approval is not None and t.approval.notes == "Hardware verified"
    assert (t.created_at, t.updated_at, t.created_by) == (T0, T2, "admin@example.com")
    # v2.0 had no history: rebuilt from what the documents prove.
    assert [(c.status, c.timestamp, c.actor) for c in t.status_history] == [
        (TaskStatus.PENDING, T0, "admin@example.com"),
        (TaskStatus.APPROVED, T1, "admin@example.com"),
        (TaskStatus.INSTALLING, T2, ""),
    ]
    assert m.server == ServerEntry.for_task(t)
    # What the daemon will read back is exactly this task.
    assert Task.from_json(t.to_json()) == t


def test_progress_keeps_the_last_report_of_each_step_in_first_seen_order() -> None:
    state = state_doc(
        "installing",
        updated_at=T2,
        progress=[step("a", 0), step("b", 10), step("a", 60, T2), step("b", 100, T2)],
    )
    m = merge_task_and_state("dc1", "sn-001", enc(tasks()), enc(state))
    assert [(p.step, p.percent) for p in m.task.progress] == [("a", 60), ("b", 100)]
    assert any("4 reports collapsed into 2 steps" in n for n in m.notes)


def test_recorded_history_is_kept() -> None:
    history = [
        {"status": "pending", "timestamp": format_ts(T0), "actor": "alice"},
        {"status": "cancelled", "timestamp": format_ts(T2), "reason": "wrong rack"},
    ]
    state = state_doc("cancelled", updated_at=T2, status_history=history)
    m = merge_task_and_state("dc1", "sn-001", enc(tasks()), enc(state))
    assert [(c.status.value, c.actor, c.reason) for c in m.task.status_history] == [
        ("pending", "alice", ""),
        ("cancelled", "", "wrong rack"),
    ]


def test_no_state_document_means_pending() -> None:
    m = merge_task_and_state("dc1", "sn-001", enc(tasks()), None)
    assert m.task.status is TaskStatus.PENDING
    assert m.task.updated_at == T0 and m.task.progress == () and m.task.logs == ()
    assert "no state document" in m.notes[0]


def test_logs_are_capped_like_the_daemon_and_counted() -> None:
    logs = [f"line {i}" for i in range(MAX_LOG_LINES + 25)]
    m = merge_task_and_state(
        "dc1", "sn-001", enc(tasks()), enc(state_doc("failed", updated_at=T2, logs=logs))
    )
    assert len(m.task.logs) == MAX_LOG_LINES and m.task.logs_dropped == 25
    assert m.task.logs[-1] == logs[-1]


def test_unknown_fields_are_noted_not_fatal() -> None:
    m = merge_task_and_state(
        "dc1", "sn-001", enc(tasks(rack="r12", owner="x")), enc(state_doc("pending", updated_at=T0))
    )
    assert any("unknown fields not carried into v3: owner, rack" in n for n in m.notes)


def test_error_field_and_failed_status() -> None:
    state = state_doc("failed", updated_at=T2, error="disk gone")
    m = merge_task_and_state("dc1", "sn-001", enc(tasks()), enc(state))
    assert m.task.error == "disk gone" and m.task.status is TaskStatus.FAILED


def test_deterministic() -> None:
    s = example_server(7, base=BASE)
    a = merge_task_and_state("dc1", s.sn, enc(s.task), enc(s.state))
    b = merge_task_and_state("dc1", s.sn, enc(s.task), enc(s.state))
    assert a.task.to_json() == b.task.to_json()


@pytest.mark.parametrize(
    ("task_raw", "state_raw", "reason"),
    [
        (b"{nope", None, "tasks: not valid JSON"),
        (b"\xff\xfe{}", None, "tasks: not UTF-8"),
        (b"[1, 2]", None, "tasks: must be a JSON object, not list"),
        (enc(tasks(sn="sn-002")), None, "tasks.sn is 'sn-002' but the key names 'sn-001'"),
        (enc({k: v for k, v in tasks().items() if k != "os_type"}), None, "missing field"),
        (enc(tasks(mac="not-a-mac")), None, "tasks.mac: mac must be a 48-bit MAC"),
        (enc(tasks(created_at="yesterday")), None, "tasks.created_at must be an RFC 3339"),
        (enc(tasks(task_id="")), None, "tasks: task_id must not be empty"),
        (enc(tasks(approval={"approved": "yes"})), None, "tasks.approval:"),
        (enc(tasks()), b"{", "state: not valid JSON"),
        (enc(tasks()), enc({"status": "weird", "updated_at": format_ts(T0)}), "unknown status"),
        (enc(tasks()), enc({"updated_at": format_ts(T0)}), "state: missing field 'status'"),
        (enc(tasks()), enc({"status": "pending"}), "state: missing field 'updated_at'"),
        (
            enc(tasks()),
            enc(state_doc("installing", updated_at=T1, progress=[step("a", 150)])),
            "state.progress[0]: percent must be between 0 and 100",
        ),
        (
            enc(tasks()),
            enc({"status": "pending", "updated_at": format_ts(T0), "progress": "half"}),
            "state.progress: must be a list",
        ),
        (
            enc(tasks()),
            enc({"status": "pending", "updated_at": format_ts(T0), "logs": [1]}),
            "state.logs[0]: must be a string",
        ),
    ],
)
def test_malformed_reasons(task_raw: bytes, state_raw: bytes | None, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        merge_task_and_state("dc1", "sn-001", task_raw, state_raw)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason
