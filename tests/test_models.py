"""Tests for the documents, timestamps, request parsers and lifecycle (ex lpmosd.models)."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpmosd import lifecycle, timestamps
from lpmosd.api_requests import (
    ApproveRequest,
    CreateTaskRequest,
    FailRequest,
    LogRequest,
    ProgressRequest,
)
from lpmosd.documents import (
    MAX_HISTORY,
    MAX_LOG_BYTES,
    MAX_LOG_LINES,
    MAX_PROGRESS_MESSAGE_CHARS,
    MAX_PROGRESS_STEPS,
    Approval,
    Disk,
    Dmi,
    MachineMeta,
    Nic,
    ProgressStep,
    ServerEntry,
    StatusChange,
    Task,
    TaskStatus,
)
from lpmosd.errors import ConflictError, ValidationError
from lpmosd.fields import sanitize_text
from lpmosd.lifecycle import (
    ACTIVE_AGENT,
    TERMINAL,
    append_logs,
    approve,
    cancel,
    complete,
    fail,
    new_task,
    record_progress,
    retry,
    transition,
)
from lpmosd.timestamps import format_ts, parse_ts

S = TaskStatus
T0 = datetime(2026, 1, 30, 12, 0, 0, tzinfo=UTC)

# Verbatim from the LPMOS v3 guide, "Task JSON Structure (Merged)".
GUIDE_TASK_JSON = """
{
  "task_id": "task-001",
  "sn": "sn-001",
  "mac": "00:1a:2b:3c:4d:5e",
  "os_type": "Ubuntu 22.04",
  "os_version": "22.04",
  "disk_layout": "auto",
  "network_config": "dhcp",

  "status": "installing",
  "status_history": [
    {"status": "pending", "timestamp": "2026-01-30T12:00:00Z"},
    {"status": "approved", "timestamp": "2026-01-30T12:01:00Z"},
    {"status": "installing", "timestamp": "2026-01-30T12:02:00Z"}
  ],

  "progress": [
    {
      "step": "hardware_collect",
      "percent": 100,
      "timestamp": "2026-01-30T12:00:30Z",
      "message": "Hardware collection complete"
    },
    {
      "step": "partitioning",
      "percent": 50,
      "timestamp": "2026-01-30T12:05:00Z",
      "message": "Creating partitions..."
    }
  ],

  "logs": [
    "2026-01-30T12:00:00Z [INFO] Task created",
    "2026-01-30T12:00:30Z [INFO] Hardware: 28 cores, 256GB RAM",
    "2026-01-30T12:02:00Z [INFO] Starting installation",
    "2026-01-30T12:05:00Z [WARN] Slow disk I/O"
  ],

  "approval": {
    "approved": true,
    "approved_by": "admin@example.com",
    "approved_at": "2026-01-30T12:01:00Z",
    "notes": "Hardware verified"
  },

  "created_at": "2026-01-30T12:00:00Z",
  "updated_at": "2026-01-30T12:05:00Z",
  "created_by": "admin@example.com"
}
"""

# Verbatim from the guide's curl example.
GUIDE_CURL_BODY = """{
    "idc": "dc1",
    "sn": "sn-001",
    "mac": "00:1a:2b:3c:4d:5e",
    "os_type": "Ubuntu 22.04",
    "os_version": "22.04"
  }"""

EXTRAS = (
    "idc",
    "logs_dropped",
    "resume_from",
    "error",
    "netboot",
    "ssh_authorized_keys",
    "first_boot_at",
)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_task(status: TaskStatus = S.PENDING) -> Task:
    """A task in ``status``, reached through the real operations."""
    req = CreateTaskRequest.from_obj(json.loads(GUIDE_CURL_BODY))
    task = new_task(req, task_id="task-001", now=T0, actor="admin@example.com")
    if status is S.PENDING:
        return task
    if status is S.CANCELLED:
        return cancel(task, now=at(1), actor="admin")
    task = approve(task, approved_by="admin@example.com", notes="ok", now=at(1))
    if status is S.APPROVED:
        return task
    task = record_progress(task, "hardware_collect", 100, "done", now=at(2))
    if status is S.INSTALLING:
        return task
    if status is S.COMPLETED:
        return complete(task, now=at(3))
    return fail(task, "disk on fire", now=at(3), actor="regional")


# ---------------------------------------------------------------- timestamps


def test_format_and_parse_ts() -> None:
    assert format_ts(T0) == "2026-01-30T12:00:00Z"
    assert format_ts(T0.replace(microsecond=999_999)) == "2026-01-30T12:00:00Z"
    assert format_ts(T0.astimezone(timezone(timedelta(hours=8)))) == "2026-01-30T12:00:00Z"
    assert format_ts(datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0005-01-02T03:04:05Z"
    assert parse_ts("2026-01-30T12:00:00Z") == T0
    assert parse_ts("2026-01-30t12:00:00z") == T0
    assert parse_ts("2026-01-30T20:00:00+08:00") == T0
    assert parse_ts("2026-01-30T11:30:00-00:30") == T0
    # Go writes nanoseconds; we keep seconds.
    assert parse_ts("2026-01-30T12:00:00.123456789Z") == T0
    assert parse_ts("2026-01-30T12:00:00Z").tzinfo is UTC
    now = timestamps.utcnow()
    assert now.tzinfo is UTC and now.microsecond == 0


@pytest.mark.parametrize(
    "value",
    [
        "",
        "2026-01-30",
        "2026-01-30T12:00:00",
        "2026-01-30 12:00:00Z",
        "2026-01-30T12:00Z",
        "2026-13-30T12:00:00Z",
        "2026-02-30T12:00:00Z",
        "2026-01-30T24:00:00Z",
        "2026-01-30T12:00:60Z",
        "2026-01-30T12:00:00+24:00",
        "2026-01-30T12:00:00+0800",
        "2026-01-30T12:00:00.Z",
        "２０２６-01-30T12:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "2026-01-30T12:00:00Z\n",
    ],
)
def test_parse_ts_rejects(value: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_ts(value, "created_at")
    assert exc.value.field == "created_at"


def test_format_ts_refuses_naive() -> None:
    with pytest.raises(ValueError):
        format_ts(datetime(2026, 1, 30))


@given(st.datetimes(timezones=st.just(UTC)))
def test_ts_round_trip(value: datetime) -> None:
    assert parse_ts(format_ts(value)) == value.replace(microsecond=0)


# --------------------------------------------------------- guide compatibility


def test_guide_task_json_parses_and_reserialises() -> None:
    guide = json.loads(GUIDE_TASK_JSON)
    task = Task.from_dict(guide)
    assert task.status is S.INSTALLING
    assert task.approval == Approval(True, "admin@example.com", at(60), "Hardware verified")
    assert task.progress[1] == ProgressStep("partitioning", 50, at(300), "Creating partitions...")
    assert [c.status for c in task.status_history] == [S.PENDING, S.APPROVED, S.INSTALLING]
    out = task.to_dict()
    assert {k: v for k, v in out.items() if k not in EXTRAS} == guide
    assert out["idc"] == "" and out["logs_dropped"] == 0
    assert out["resume_from"] is None and out["error"] is None
    # Guide fields first, in the guide's order; our extras at the end.
    assert list(out) == [*guide, *EXTRAS]
    assert Task.from_json(GUIDE_TASK_JSON.encode()) == task


def test_guide_curl_body_parses() -> None:
    req = CreateTaskRequest.from_obj(json.loads(GUIDE_CURL_BODY))
    assert req == CreateTaskRequest(
        idc="dc1",
        sn="sn-001",
        mac="00:1a:2b:3c:4d:5e",
        os_type="Ubuntu 22.04",
        os_version="22.04",
        disk_layout="auto",
        network_config="dhcp",
    )


def test_guide_minimal_server_entry_parses() -> None:
    entry = ServerEntry.from_json(b'{"status":"pending","added_at":"2026-01-30T12:00:00Z"}')
    assert entry == ServerEntry(
        sn="", mac="", status=S.PENDING, added_at=T0, updated_at=T0, task_id=""
    )


# -------------------------------------------------------------- round trips


def full_meta() -> MachineMeta:
    return MachineMeta(
        cpu_model="Xeon Gold 6330",
        cpu_cores=28,
        memory_bytes=256 * 2**30,
        disks=(Disk("sda", 960 * 10**9, "SAMSUNG MZ7L3960", False), Disk("sdb", 8, "", True)),
        nics=(Nic("eno1", "00:1a:2b:3c:4d:5e", 25_000), Nic("eno2", "00:1a:2b:3c:4d:5f")),
        dmi=Dmi("Dell Inc.", "PowerEdge R650", None),
        reported_at=T0,
    )


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(make_task(s), id=f"task-{s}")
        for s in (S.PENDING, S.APPROVED, S.INSTALLING, S.COMPLETED, S.FAILED, S.CANCELLED)
    ]
    + [
        pytest.param(retry(make_task(S.FAILED), now=at(9), actor="admin"), id="task-retried"),
        pytest.param(ServerEntry.for_task(make_task(S.INSTALLING)), id="server"),
        pytest.param(full_meta(), id="meta"),
        pytest.param(MachineMeta(cpu_model="", cpu_cores=0, memory_bytes=0, reported_at=T0)),
        pytest.param(StatusChange(S.FAILED, T0, "x", "why"), id="change"),
        pytest.param(Approval(False, "", T0, ""), id="approval"),
    ],
)
def test_json_round_trip(doc: Any) -> None:
    data = doc.to_json()
    assert type(doc).from_json(data) == doc
    assert type(doc).from_dict(json.loads(data)) == doc
    assert json.loads(data) == doc.to_dict()


def test_to_json_is_compact_utf8() -> None:
    task = append_logs(make_task(), ["héllo ✓"], now=at(5))
    data = task.to_json()
    assert b'","' in data and b'", "' not in data and b'": ' not in data
    assert "héllo ✓".encode() in data


def test_status_change_omits_empty_actor_and_reason() -> None:
    assert StatusChange(S.PENDING, T0).to_dict() == {
        "status": "pending",
        "timestamp": "2026-01-30T12:00:00Z",
    }
    assert StatusChange(S.FAILED, T0, "a", "b").to_dict()["reason"] == "b"


@given(actor=st.text(max_size=30), reason=st.text(max_size=30), status=st.sampled_from(S))
def test_status_change_size_matches_encoding(actor: str, reason: str, status: S) -> None:
    change = StatusChange(status, T0, sanitize_text(actor, 2000), sanitize_text(reason, 2000))
    assert change.json_size() == len(change.to_json())


# ---------------------------------------------------- strict document parsing


def guide() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(GUIDE_TASK_JSON)
    return d


def _set(path: list[Any], value: Any) -> dict[str, Any]:
    d = guide()
    target: Any = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


def _drop(key: str) -> dict[str, Any]:
    d = guide()
    del d[key]
    return d


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_set(["status"], "running"), "status"),
        (_set(["status"], 1), "status"),
        (_set(["status"], ["pending"]), "status"),
        (_set(["sn"], "../x"), "sn"),
        (_set(["mac"], "nope"), "mac"),
        (_set(["task_id"], ""), "task_id"),
        (_set(["task_id"], 7), "task_id"),
        (_set(["os_type"], None), "os_type"),
        (_set(["idc"], "a/b"), "idc"),
        (_set(["progress"], {}), "progress"),
        (_set(["progress", 1, "percent"], True), "progress[1].percent"),
        (_set(["progress", 1, "percent"], 50.0), "progress[1].percent"),
        (_set(["progress", 1, "percent"], 101), "progress[1].percent"),
        (_set(["progress", 0, "timestamp"], 0), "progress[0].timestamp"),
        (_set(["progress", 0, "bogus"], 0), "progress[0].bogus"),
        (_set(["status_history", 2, "status"], "x"), "status_history[2].status"),
        (_set(["status_history", 0, "timestamp"], "yesterday"), "status_history[0].timestamp"),
        (_set(["status_history", 0], "pending"), "status_history[0]"),
        (_set(["logs", 3], 3), "logs[3]"),
        (_set(["logs", 3], "\ud800"), "logs[3]"),
        (_set(["approval", "approved"], "yes"), "approval.approved"),
        (_set(["approval"], []), "approval"),
        (_set(["logs_dropped"], -1), "logs_dropped"),
        (_set(["logs_dropped"], False), "logs_dropped"),
        (_set(["resume_from"], 3), "resume_from"),
        (_set(["error"], {}), "error"),
        (_set(["surprise"], 1), "surprise"),
        (_drop("created_at"), "created_at"),
        (_drop("approval"), "approval"),
        (_drop("logs"), "logs"),
    ],
)
def test_task_from_dict_names_bad_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Task.from_dict(obj)
    assert exc.value.field == field


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff", b'"x"', b"[" * 100_000])
def test_from_json_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValidationError):
        Task.from_json(data)


def meta_dict() -> dict[str, Any]:
    return full_meta().to_dict()


def _meta(path: list[Any], value: Any) -> dict[str, Any]:
    d = meta_dict()
    target: Any = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (_meta(["cpu_cores"], True), "cpu_cores"),
        (_meta(["cpu_cores"], -1), "cpu_cores"),
        (_meta(["memory_bytes"], 2**63), "memory_bytes"),
        (_meta(["cpu_model"], "x" * 257), "cpu_model"),
        (_meta(["cpu_model"], "x\ny"), "cpu_model"),
        (_meta(["disks"], [meta_dict()["disks"][0]] * 257), "disks"),
        (_meta(["nics"], [meta_dict()["nics"][0]] * 257), "nics"),
        (_meta(["disks", 1, "rotational"], 1), "disks[1].rotational"),
        (_meta(["disks", 0, "size_bytes"], "1"), "disks[0].size_bytes"),
        (_meta(["disks", 0, "name"], ""), "disks[0].name"),
        (_meta(["disks", 0, "serial"], "x"), "disks[0].serial"),
        (_meta(["nics", 1, "mac"], "zz"), "nics[1].mac"),
        (_meta(["nics", 0, "speed_mbps"], "fast"), "nics[0].speed_mbps"),
        (_meta(["dmi", "vendor"], 3), "dmi.vendor"),
        (_meta(["dmi", "serial"], "s" * 257), "dmi.serial"),
        (_meta(["dmi", "bios"], "x"), "dmi.bios"),
        (_meta(["dmi"], None), "dmi"),
        (_meta(["reported_at"], None), "reported_at"),
    ],
)
def test_meta_from_dict_names_bad_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        MachineMeta.from_dict(obj)
    assert exc.value.field == field


def test_meta_from_report_stamps_our_time() -> None:
    report = meta_dict()
    del report["reported_at"]
    del report["dmi"]
    meta = MachineMeta.from_report(report, now=at(5).replace(microsecond=7))
    assert meta.reported_at == at(5) and meta.dmi == Dmi()
    report["reported_at"] = "2026-01-30T12:00:00Z"
    with pytest.raises(ValidationError) as exc:
        MachineMeta.from_report(report, now=T0)
    assert exc.value.field == "reported_at"
    # Macs are normalised on the way in.
    report = meta_dict() | {"nics": [{"name": "eth0", "mac": "001A2B3C4D5E"}]}
    assert MachineMeta.from_dict(report).nics == (Nic("eth0", "00:1a:2b:3c:4d:5e", None),)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"status": "done", "added_at": "2026-01-30T12:00:00Z"}, "status"),
        ({"status": "pending"}, "added_at"),
        ({"status": "pending", "added_at": "2026-01-30T12:00:00Z", "sn": ".."}, "sn"),
        ({"status": "pending", "added_at": "2026-01-30T12:00:00Z", "mac": "x"}, "mac"),
        ({"status": "pending", "added_at": "2026-01-30T12:00:00Z", "x": 1}, "x"),
    ],
)
def test_server_entry_names_bad_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ServerEntry.from_dict(obj)
    assert exc.value.field == field


# ------------------------------------------------------------ request parsers


def create_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(GUIDE_CURL_BODY)
    body.update(changes)
    return body


def test_create_request_defaults_and_normalises() -> None:
    req = CreateTaskRequest.from_obj(
        {"idc": "dc1", "sn": "s1", "mac": "00-1A-2B-3C-4D-5E", "os_type": "Debian 12"}
    )
    assert req.mac == "00:1a:2b:3c:4d:5e"
    assert (req.os_version, req.disk_layout, req.network_config) == ("", "auto", "dhcp")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], None),
        ("x", None),
        (create_body(idc=None), "idc"),
        (create_body(idc=".."), "idc"),
        (create_body(sn="a/b"), "sn"),
        (create_body(sn=1), "sn"),
        (create_body(mac="00:1a:2b:3c:4d"), "mac"),
        (create_body(os_type=""), "os_type"),
        (create_body(os_type=2204), "os_type"),
        (create_body(os_type="x" * 129), "os_type"),
        (create_body(os_type="Ubuntu\n22.04"), "os_type"),
        (create_body(os_version=True), "os_version"),
        (create_body(os_version="v" * 129), "os_version"),
        (create_body(disk_layout=""), "disk_layout"),
        (create_body(disk_layout=None), "disk_layout"),
        (create_body(network_config="x" * 129), "network_config"),
        (create_body(network_config="a\x00"), "network_config"),
        (create_body(created_by="me"), "created_by"),
        (create_body(status="approved"), "status"),
        ({"idc": "dc1", "sn": "s", "mac": "00:1a:2b:3c:4d:5e"}, "os_type"),
    ],
)
def test_create_request_names_bad_field(body: object, field: str | None) -> None:
    with pytest.raises(ValidationError) as exc:
        CreateTaskRequest.from_obj(body)
    assert exc.value.field == field


def test_approve_request() -> None:
    assert ApproveRequest.from_obj({}) == ApproveRequest(None, "")
    assert ApproveRequest.from_obj({"approved_by": None}) == ApproveRequest(None, "")
    assert ApproveRequest.from_obj({"approved_by": "bob", "notes": "ok\r\n"}) == ApproveRequest(
        "bob", "ok"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"approved_by": 1}, "approved_by"),
        ({"approved_by": ""}, "approved_by"),
        ({"approved_by": "x" * 129}, "approved_by"),
        ({"notes": None}, "notes"),
        ({"notes": "n" * 2001}, "notes"),
        ({"approved": True}, "approved"),
        (None, None),
    ],
)
def test_approve_request_names_bad_field(body: object, field: str | None) -> None:
    with pytest.raises(ValidationError) as exc:
        ApproveRequest.from_obj(body)
    assert exc.value.field == field


def test_progress_request() -> None:
    req = ProgressRequest.from_obj({"step": "partitioning", "percent": 50})
    assert req == ProgressRequest("partitioning", 50, "")
    req = ProgressRequest.from_obj({"step": "a.b-c_1", "percent": 0, "message": "x\x1b[31m"})
    assert req.message == "x[31m"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"percent": 5}, "step"),
        ({"step": "Partitioning", "percent": 5}, "step"),
        ({"step": "_x", "percent": 5}, "step"),
        ({"step": "a" * 65, "percent": 5}, "step"),
        ({"step": "a b", "percent": 5}, "step"),
        ({"step": 5, "percent": 5}, "step"),
        ({"step": "s"}, "percent"),
        ({"step": "s", "percent": True}, "percent"),
        ({"step": "s", "percent": 5.0}, "percent"),
        ({"step": "s", "percent": "5"}, "percent"),
        ({"step": "s", "percent": -1}, "percent"),
        ({"step": "s", "percent": 101}, "percent"),
        ({"step": "s", "percent": 1, "message": 1}, "message"),
        ({"step": "s", "percent": 1, "message": "m" * 2001}, "message"),
        ({"step": "s", "percent": 1, "status": "installing"}, "status"),
    ],
)
def test_progress_request_names_bad_field(body: object, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ProgressRequest.from_obj(body)
    assert exc.value.field == field


def test_log_request() -> None:
    assert LogRequest.from_obj({"line": "hello"}) == LogRequest(("hello",), "INFO")
    req = LogRequest.from_obj({"lines": ["a\x00", "b\tc"], "level": "WARN"})
    assert req == LogRequest(("a", "b\tc"), "WARN")
    assert len(LogRequest.from_obj({"lines": ["x"] * 100}).lines) == 100


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "lines"),
        ({"line": "a", "lines": ["b"]}, "lines"),
        ({"lines": []}, "lines"),
        ({"lines": "a"}, "lines"),
        ({"lines": ["x"] * 101}, "lines"),
        ({"lines": ["ok", 3]}, "lines[1]"),
        ({"lines": ["ok", "x" * 2001]}, "lines[1]"),
        ({"line": None}, "line"),
        ({"line": "x" * 2001}, "line"),
        ({"line": "a", "level": "info"}, "level"),
        ({"line": "a", "level": "FATAL"}, "level"),
        ({"line": "a", "level": 1}, "level"),
        ({"line": "a", "ts": "now"}, "ts"),
    ],
)
def test_log_request_names_bad_field(body: object, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        LogRequest.from_obj(body)
    assert exc.value.field == field


def test_fail_request() -> None:
    assert FailRequest.from_obj({"reason": "disk\nfailed"}) == FailRequest("diskfailed")


@pytest.mark.parametrize(
    "body",
    [{}, {"reason": ""}, {"reason": " \x00 "}, {"reason": 1}, {"reason": "r" * 2001}],
)
def test_fail_request_names_bad_field(body: object) -> None:
    with pytest.raises(ValidationError) as exc:
        FailRequest.from_obj(body)
    assert exc.value.field == "reason"


# ------------------------------------------------------------- state machine

ALLOWED = {
    (S.PENDING, S.APPROVED),
    (S.PENDING, S.CANCELLED),
    (S.APPROVED, S.INSTALLING),
    (S.APPROVED, S.CANCELLED),
    (S.APPROVED, S.FAILED),
    (S.INSTALLING, S.COMPLETED),
    (S.INSTALLING, S.FAILED),
    (S.INSTALLING, S.CANCELLED),
    (S.FAILED, S.APPROVED),
}


def test_status_sets() -> None:
    assert {s.value for s in S} == {
        "pending",
        "approved",
        "installing",
        "completed",
        "failed",
        "cancelled",
    }
    assert {S.COMPLETED, S.FAILED, S.CANCELLED} == TERMINAL
    assert {S.APPROVED, S.INSTALLING} == ACTIVE_AGENT
    assert {(a, b) for a, tos in lifecycle.TRANSITIONS.items() for b in tos} == ALLOWED


@pytest.mark.parametrize(("frm", "to"), list(itertools.product(S, S)))
def test_transition_table(frm: TaskStatus, to: TaskStatus) -> None:
    task = make_task(frm)
    if (frm, to) in ALLOWED:
        out = transition(task, to, now=at(100), actor="ops", reason="because")
        assert out.status is to
        assert out.status_history[-1] == StatusChange(to, at(100), "ops", "because")
        assert out.updated_at == at(100)
        assert out.logs[-1] == f"2026-01-30T12:01:40Z [INFO] Status {frm} -> {to} by ops: because"
    else:
        with pytest.raises(ConflictError) as exc:
            transition(task, to, now=at(100), actor="ops")
        assert exc.value.field == "status"
        assert str(frm) in exc.value.message and str(to) in exc.value.message


# ---------------------------------------------------------------- operations


def test_new_task() -> None:
    task = make_task()
    assert task.status is S.PENDING
    assert task.status_history == (StatusChange(S.PENDING, T0, "admin@example.com"),)
    assert task.logs == ("2026-01-30T12:00:00Z [INFO] Task created for sn-001",)
    assert task.approval is None and task.to_dict()["approval"] is None
    assert (task.idc, task.sn, task.mac, task.task_id) == (
        "dc1",
        "sn-001",
        "00:1a:2b:3c:4d:5e",
        "task-001",
    )
    assert task.created_at == task.updated_at == T0
    assert task.created_by == "admin@example.com"
    assert task.progress == () and task.logs_dropped == 0
    assert task.resume_from is None and task.error is None


def test_operations_need_aware_now() -> None:
    with pytest.raises(ValueError):
        cancel(make_task(), now=datetime(2026, 1, 30), actor="x")


def test_approve() -> None:
    task = approve(make_task(), approved_by="bob", notes="fine\x07", now=at(60))
    assert task.status is S.APPROVED
    assert task.approval == Approval(True, "bob", at(60), "fine")
    assert task.status_history[-1] == StatusChange(S.APPROVED, at(60), "bob")
    assert task.logs[-1] == "2026-01-30T12:01:00Z [INFO] Status pending -> approved by bob"
    for status in (S.APPROVED, S.FAILED, S.COMPLETED):
        with pytest.raises(ConflictError) as exc:
            approve(make_task(status), approved_by="bob", now=at(60))
        assert exc.value.field == "status" and str(status) in exc.value.message


def test_cancel() -> None:
    task = cancel(make_task(S.INSTALLING), now=at(9), actor="ops", reason="wrong box")
    assert task.status is S.CANCELLED
    assert task.status_history[-1].reason == "wrong box"
    with pytest.raises(ConflictError):
        cancel(task, now=at(10), actor="ops")


def test_record_progress_moves_approved_to_installing() -> None:
    task = make_task(S.APPROVED)
    out = record_progress(task, "hardware_collect", 10, "probing", now=at(30))
    assert out.status is S.INSTALLING
    assert out.status_history[-1] == StatusChange(S.INSTALLING, at(30), "agent")
    assert out.progress == (ProgressStep("hardware_collect", 10, at(30), "probing"),)
    assert out.logs[-2:] == (
        "2026-01-30T12:00:30Z [INFO] Status approved -> installing by agent",
        "2026-01-30T12:00:30Z [INFO] hardware_collect started (10%): probing",
    )
    # Still installing: no new history entry.
    again = record_progress(out, "hardware_collect", 20, "more", now=at(31))
    assert again.status_history == out.status_history


def test_record_progress_one_entry_per_step() -> None:
    task = make_task(S.APPROVED)
    task = record_progress(task, "a", 10, "", now=at(1))
    task = record_progress(task, "b", 10, "", now=at(2))
    task = record_progress(task, "a", 60, "x", now=at(3))
    task = record_progress(task, "c", 100, "", now=at(4))
    assert [(p.step, p.percent, p.timestamp) for p in task.progress] == [
        ("a", 60, at(3)),
        ("b", 10, at(2)),
        ("c", 100, at(4)),
    ]
    assert task.updated_at == at(4)
    # A step at 100 % does not complete the task.
    assert task.status is S.INSTALLING
    n = len(task.logs)
    task = record_progress(task, "a", 70, "", now=at(5))
    assert len(task.logs) == n  # intermediate reports are not logged
    task = record_progress(task, "a", 100, "ok", now=at(6))
    assert task.logs[-1] == "2026-01-30T12:00:06Z [INFO] a done (100%): ok"


def test_record_progress_truncates_message_and_caps_steps() -> None:
    task = record_progress(make_task(S.APPROVED), "s", 1, "m" * 2000, now=at(1))
    assert len(task.progress[0].message) == MAX_PROGRESS_MESSAGE_CHARS
    for i in range(1, MAX_PROGRESS_STEPS):
        task = record_progress(task, f"s{i}", 1, "", now=at(1))
    with pytest.raises(ValidationError) as exc:
        record_progress(task, "one-too-many", 1, "", now=at(2))
    assert exc.value.field == "step"
    record_progress(task, "s1", 2, "", now=at(2))  # existing steps still update


@pytest.mark.parametrize("status", [S.PENDING, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_record_progress_refused_outside_active(status: TaskStatus) -> None:
    with pytest.raises(ConflictError) as exc:
        record_progress(make_task(status), "s", 1, "", now=at(9))
    assert exc.value.field == "status"


@pytest.mark.parametrize(
    ("step", "percent", "field"),
    [("Bad", 1, "step"), ("ok", 101, "percent"), ("ok", True, "percent"), ("ok", -1, "percent")],
)
def test_record_progress_validates(step: str, percent: int, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        record_progress(make_task(S.INSTALLING), step, percent, "", now=at(9))
    assert exc.value.field == field


def test_complete() -> None:
    task = complete(make_task(S.INSTALLING), now=at(50))
    assert task.status is S.COMPLETED
    assert task.logs[-1] == "2026-01-30T12:00:50Z [INFO] Installation completed"
    with pytest.raises(ConflictError):
        complete(make_task(S.APPROVED), now=at(50))


def test_fail_records_reason_and_last_step() -> None:
    task = make_task(S.INSTALLING)
    task = record_progress(task, "partitioning", 40, "", now=at(10))
    task = record_progress(task, "hardware_collect", 100, "", now=at(5))  # older timestamp
    out = fail(task, "disk\x00 error", now=at(20), actor="regional")
    assert out.status is S.FAILED
    assert out.error == "disk error"
    assert out.status_history[-1] == StatusChange(S.FAILED, at(20), "regional", "disk error")
    assert out.logs[-1] == (
        "2026-01-30T12:00:20Z [ERROR] Task failed at step partitioning by regional: disk error"
    )
    # Approved (no progress yet) can fail too, e.g. on lease loss.
    out = fail(make_task(S.APPROVED), "lease lost", now=at(20), actor="reaper")
    assert out.logs[-1].endswith("[ERROR] Task failed by reaper: lease lost")
    with pytest.raises(ConflictError):
        fail(make_task(S.PENDING), "x", now=at(20), actor="reaper")


def test_retry_resumes_from_first_unfinished_step() -> None:
    task = make_task(S.INSTALLING)  # hardware_collect at 100
    task = record_progress(task, "partitioning", 40, "", now=at(10))
    task = record_progress(task, "install", 0, "", now=at(11))
    failed = fail(task, "boom", now=at(12), actor="agent")
    out = retry(failed, now=at(13), actor="admin")
    assert out.status is S.APPROVED
    assert out.resume_from == "partitioning"
    assert out.error is None
    assert out.progress == failed.progress
    assert out.status_history[-1] == StatusChange(S.APPROVED, at(13), "admin", "retry")
    # Everything finished before the failure: start from the top.
    out = retry(make_task(S.FAILED), now=at(13), actor="admin")
    assert out.resume_from is None
    with pytest.raises(ConflictError):
        retry(make_task(S.CANCELLED), now=at(13), actor="admin")


def test_append_logs_sanitises_and_formats() -> None:
    task = append_logs(
        make_task(), ["a\x00b\tc\x1b", "x" * 5000, "\u2028z"], level="WARN", now=at(7)
    )
    assert task.logs[-3] == "2026-01-30T12:00:07Z [WARN] ab\tc"
    assert task.logs[-2] == "2026-01-30T12:00:07Z [WARN] " + "x" * 1999 + "…"
    assert task.logs[-1] == "2026-01-30T12:00:07Z [WARN] z"
    assert task.updated_at == at(7)
    with pytest.raises(ValidationError):
        append_logs(make_task(), ["x"], level="LOUD", now=at(7))  # type: ignore[arg-type]


def test_append_logs_caps_lines_keeping_newest() -> None:
    task = make_task()
    task = append_logs(task, [f"line {i}" for i in range(MAX_LOG_LINES + 10)], now=at(1))
    assert len(task.logs) == MAX_LOG_LINES
    assert task.logs_dropped == 11  # the creation line and 10 of ours
    assert task.logs[0].endswith(" line 10") and task.logs[-1].endswith(f" line {509}")
    task = append_logs(task, ["one more"], now=at(2))
    assert len(task.logs) == MAX_LOG_LINES and task.logs_dropped == 12


def test_append_logs_caps_bytes() -> None:
    task = append_logs(make_task(), ["é" * 2000] * MAX_LOG_LINES, now=at(1))
    assert len(task.logs) < MAX_LOG_LINES
    encoded = len(json.dumps(list(task.logs), ensure_ascii=False, separators=(",", ":")).encode())
    assert encoded <= MAX_LOG_BYTES
    assert task.logs_dropped == MAX_LOG_LINES + 1 - len(task.logs)


def test_history_cap_keeps_first_and_newest() -> None:
    task = make_task(S.FAILED)
    for i in range(MAX_HISTORY):
        task = retry(task, now=at(100 + i), actor="admin")
        task = fail(task, f"attempt {i}", now=at(100 + i), actor="agent")
    assert len(task.status_history) == MAX_HISTORY
    assert task.status_history[0] == StatusChange(S.PENDING, T0, "admin@example.com")
    assert task.status_history[-1].reason == f"attempt {MAX_HISTORY - 1}"
    assert task.status_history[-2].status is S.APPROVED


def test_operations_are_pure() -> None:
    ops: list[Callable[[Task], Task]] = [
        lambda t: approve(t, approved_by="b", notes="n", now=at(9)),
        lambda t: cancel(t, now=at(9), actor="a"),
        lambda t: transition(t, S.CANCELLED, now=at(9), actor="a"),
        lambda t: append_logs(t, ["x"] * 600, now=at(9)),
        lambda t: record_progress(t, "s", 50, "m", now=at(9)),
        lambda t: record_progress(t, "hardware_collect", 50, "m", now=at(9)),
        lambda t: complete(t, now=at(9)),
        lambda t: fail(t, "r", now=at(9), actor="a"),
        lambda t: retry(t, now=at(9), actor="a"),
    ]
    for status in S:
        for op in ops:
            task = make_task(status)
            snapshot = copy.deepcopy(task)
            data = task.to_json()
            try:
                out = op(task)
            except ConflictError:
                continue
            assert out is not task and out != task
            assert task == snapshot and task.to_json() == data


def test_worst_case_task_stays_under_256_kib() -> None:
    # Adversarial content: 4-byte characters and characters JSON escapes, everywhere.
    wide = '😀"\\' * 700
    req = CreateTaskRequest(
        idc="d" * 64,
        sn="s" * 64,
        mac="00:1a:2b:3c:4d:5e",
        os_type="😀" * 128,
        os_version="😀" * 128,
        disk_layout="😀" * 128,
        network_config="😀" * 128,
    )
    task = new_task(req, task_id="t" * 128, now=T0, actor=wide)
    task = approve(task, approved_by=wide, notes=wide, now=at(1))
    for i in range(MAX_PROGRESS_STEPS):
        task = record_progress(task, f"{i:02d}" + "s" * 62, 50, wide, now=at(2))
    for i in range(MAX_HISTORY):
        task = fail(task, wide, now=at(3 + i), actor=wide)
        task = retry(task, now=at(3 + i), actor=wide, reason=wide)
        task = append_logs(task, [wide], level="ERROR", now=at(3 + i))
    task = append_logs(task, [wide] * MAX_LOG_LINES, now=at(1000))
    task = record_progress(task, "00" + "s" * 62, 60, wide, now=at(1001))
    task = fail(task, wide, now=at(1002), actor=wide)
    size = len(task.to_json())
    assert size < 256 * 1024, size
    assert Task.from_json(task.to_json()) == task


def test_realistic_full_task_keeps_full_caps() -> None:
    task = make_task(S.INSTALLING)
    for i in range(50):
        task = record_progress(task, f"step-{i}", 50, "Creating partitions...", now=at(i))
    while len(task.status_history) < MAX_HISTORY:
        task = fail(task, "lease lost", now=at(60), actor="regional-dc1")
        task = retry(task, now=at(61), actor="admin@example.com")
    line = "Hardware: 28 cores, 256GB RAM, 4x NVMe, 2x 25GbE; " * 2
    task = append_logs(task, [line] * MAX_LOG_LINES, now=at(70))
    assert len(task.logs) == MAX_LOG_LINES
    assert len(task.status_history) == MAX_HISTORY
    assert len(task.to_json()) < 256 * 1024


def test_minimal_server_entry_round_trips() -> None:
    entry = ServerEntry.from_dict({"status": "pending", "added_at": "2026-01-30T12:00:00Z"})
    assert ServerEntry.from_json(entry.to_json()) == entry
