"""``lpmosd inspect servers | task | lease | watch`` against a real etcd, output checked."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import IO, TypeVar

import pytest
import trio

from lpmosd import cli, inspect, lifecycle, schema, tasklogs, timestamps
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import ServerEntry, Task
from lpmosd.etcd import EtcdClient, EventType, KeyValue, WatchEvent, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.migrate import v2

T = TypeVar("T")
IDC = "dc1"
T0 = timestamps.parse_ts("2026-01-30T12:00:00Z")


def with_client(etcd: EtcdProcess, fn: Callable[[EtcdClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with open_client(etcd.endpoints) as client:
            return await fn(client)

    return trio.run(main)


def run(capsys: pytest.CaptureFixture[str], etcd: EtcdProcess, *args: str) -> tuple[int, str, str]:
    code = cli.main([*args, "--etcd-endpoints", etcd.endpoint])
    out, err = capsys.readouterr()
    return code, out, err


def endpoint(etcd: EtcdProcess) -> list[str]:
    return ["--etcd-endpoints", etcd.endpoint]


def guide_task(sn: str, mac: str = "00:1a:2b:3c:4d:5e") -> Task:
    """The guide's example task: approved, installing, hardware done, partitioning at 50 %."""
    req = CreateTaskRequest(idc=IDC, sn=sn, mac=mac, os_type="Ubuntu 22.04", os_version="22.04")
    t = lifecycle.new_task(req, task_id=f"task-{sn}", now=T0, actor="admin@example.com")
    t = lifecycle.approve(
        t, approved_by="admin@example.com", notes="Hardware verified", now=T0 + timedelta(minutes=1)
    )
    t = lifecycle.record_progress(
        t, "hardware_collect", 100, "Hardware collection complete", now=T0 + timedelta(minutes=2)
    )
    t = lifecycle.record_progress(
        t, "partitioning", 50, "Creating partitions...", now=T0 + timedelta(minutes=5)
    )
    return lifecycle.append_logs(t, ["Slow disk I/O"], level="WARN", now=T0 + timedelta(minutes=5))


async def put_task(client: EtcdClient, task: Task) -> None:
    await client.put(schema.task_key(task.idc, task.sn), task.to_json())
    await client.put(schema.server_key(task.idc, task.sn), ServerEntry.for_task(task).to_json())


async def put_lease(client: EtcdClient, sn: str, ttl: int = 30) -> int:
    lease = await client.lease_grant(ttl)
    await client.put(schema.lease_key(IDC, sn), f"lease-{lease.id}", lease=lease.id)
    return lease.id


@pytest.fixture
def fleet(etcd: EtcdProcess) -> dict[str, int]:
    """sn-001: installing with a live agent; sn-002: pending, agent offline."""

    async def setup(client: EtcdClient) -> dict[str, int]:
        await put_task(client, guide_task("sn-001"))
        req = CreateTaskRequest(idc=IDC, sn="sn-002", mac="00:1a:2b:3c:4d:5f", os_type="demo")
        await put_task(client, lifecycle.new_task(req, task_id="task-2", now=T0, actor="ops"))
        return {"sn-001": await put_lease(client, "sn-001")}

    return with_client(etcd, setup)


def test_servers(
    etcd: EtcdProcess, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, etcd, "inspect", "servers", "--idc", IDC)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SN", "STATUS", "AGENT", "MAC", "TASK", "UPDATED"]
    assert lines[1].split() == [
        "sn-001",
        "installing",
        "online",
        "00:1a:2b:3c:4d:5e",
        "task-sn-001",
        "2026-01-30T12:05:00Z",
    ]
    assert lines[2].split()[:3] == ["sn-002", "pending", "offline"]
    assert lines[3].startswith("2 servers in dc1: 1 installing, 1 pending; 1 agent online")
    code, out, _ = run(capsys, etcd, "inspect", "servers", "--idc", IDC, "--json")
    data = json.loads(out)
    assert [(s["sn"], s["status"], s["agent"]) for s in data["servers"]] == [
        ("sn-001", "installing", "online"),
        ("sn-002", "pending", "offline"),
    ]
    # v2 data still around is pointed out; an empty IDC is not an error.
    with_client(etcd, lambda c: c.put(v2.list_key(IDC), '["old"]'))
    code, out, _ = run(capsys, etcd, "inspect", "servers", "--idc", IDC)
    assert "note: v2 data present (/os/dc1/servers); see `lpmosd migrate plan --idc dc1`" in out
    code, out, _ = run(capsys, etcd, "inspect", "servers", "--idc", "dc9")
    assert code == 0 and out == "no servers in dc9 (no keys under /os/dc9/servers/)\n"


def test_task_rendered(
    etcd: EtcdProcess, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, etcd, "inspect", "task", IDC, "sn-001", "--logs", "3")
    assert code == 0
    assert out.startswith("Task task-sn-001  dc1/sn-001  (mod_revision ")
    assert "  status      installing   (updated 2026-01-30T12:05:00Z)" in out
    assert f"  agent       online (lease {fleet['sn-001']}, " in out
    assert (
        '  approval    approved by admin@example.com at 2026-01-30T12:01:00Z — "Hardware verified"'
        in out
    )
    history = out.split("Status history:\n")[1].split("\n\n")[0].splitlines()
    assert [h.split()[:2] for h in history] == [
        ["2026-01-30T12:00:00Z", "pending"],
        ["2026-01-30T12:01:00Z", "approved"],
        ["2026-01-30T12:02:00Z", "installing"],
    ]
    assert "  hardware_collect   [####################] 100%  Hardware collection complete" in out
    assert "  partitioning       [##########..........]  50%  Creating partitions..." in out
    logs = out.split("Logs (last 3 of 6):\n")[1].splitlines()
    assert logs[-1] == "  2026-01-30T12:05:00Z [WARN] Slow disk I/O"
    assert len(logs) == 3

    code, out, _ = run(capsys, etcd, "inspect", "task", IDC, "sn-002")
    assert "  agent       offline (no lease key)" in out and "Logs (1):" in out
    assert "Progress:\n  (no steps yet)" in out


def test_task_json_is_the_stored_document(
    etcd: EtcdProcess, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, etcd, "inspect", "task", IDC, "sn-001", "--json")
    assert code == 0
    kv = with_client(etcd, lambda c: c.get(schema.task_key(IDC, "sn-001")))
    assert kv is not None and json.loads(out) == json.loads(kv.value)


def test_task_absent(etcd: EtcdProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, etcd, "inspect", "task", IDC, "sn-404")
    assert code == 1 and out == ""
    assert err == "lpmosd: no task for dc1/sn-404: /os/dc1/machines/sn-404/task is absent\n"
    # Not migrated yet: say so.
    with_client(etcd, lambda c: c.put(v2.tasks_key(IDC, "sn-404"), "{}"))
    code, _, err = run(capsys, etcd, "inspect", "task", IDC, "sn-404")
    assert code == 1 and "v2 documents exist: run `lpmosd migrate plan --idc dc1`" in err


def test_invalid_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["inspect", "task", "dc1", "../etc", "--etcd-endpoints", "http://127.0.0.1:1"])
    assert info.value.code == 2
    assert "sn must be 1-64 ASCII letters" in capsys.readouterr().err


def test_lease_online(
    etcd: EtcdProcess, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    lease_id = fleet["sn-001"]
    code, out, _ = run(capsys, etcd, "inspect", "lease", IDC, "sn-001")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "dc1/sn-001: agent online"
    assert lines[1] == f"  lease key   /os/dc1/machines/sn-001/lease = lease-{lease_id}"
    assert lines[2] == f"  lease id    {lease_id} (0x{lease_id:x})"
    ttl = int(lines[3].split()[1].rstrip("s"))
    assert 25 <= ttl <= 30 and lines[3].endswith("remaining of 30s")
    code, out, _ = run(capsys, etcd, "inspect", "lease", IDC, "sn-001", "--json")
    data = json.loads(out)
    assert data["online"] is True and data["lease_id"] == lease_id and data["granted_ttl"] == 30


def test_lease_offline(
    etcd: EtcdProcess, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, etcd, "inspect", "lease", IDC, "sn-002")
    assert code == 1
    assert out == (
        "dc1/sn-002: agent offline (no lease key)\n"
        "  lease key   /os/dc1/machines/sn-002/lease is absent\n"
    )
    # The agent's lease is revoked (or expires): its key goes with it.
    with_client(etcd, lambda c: c.lease_revoke(fleet["sn-001"]))
    code, out, _ = run(capsys, etcd, "inspect", "lease", IDC, "sn-001")
    assert code == 1 and out.startswith("dc1/sn-001: agent offline (no lease key)")
    code, out, _ = run(capsys, etcd, "inspect", "task", IDC, "sn-001")
    assert "  agent       offline (no lease key)" in out
    # A lease key written by hand, bound to no lease, is not a live agent.
    with_client(etcd, lambda c: c.put(schema.lease_key(IDC, "sn-002"), "lease-42"))
    code, out, _ = run(capsys, etcd, "inspect", "lease", IDC, "sn-002")
    assert code == 1 and "agent offline (the lease key is not bound to a lease" in out


class Lines:
    """Lines of a pipe, read by a thread so the test can wait with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.pipe = pipe
        self.thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        """After the process ended: collect the reader, close the pipe."""
        self.thread.join(timeout=5)
        self.pipe.close()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.q.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if text in line:
                    self.seen.remove(line)
                    return line
            try:
                self.seen.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{text!r} not seen; got {self.seen}") from None


def test_watch_streams_changes_and_stops_cleanly_on_ctrl_c(
    etcd: EtcdProcess, fleet: dict[str, int]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpmosd", "inspect", "watch", "--idc", IDC, *endpoint(etcd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        # The current state first, then the stream.
        line = out.wait_for("dc1/sn-001 installing")
        assert "partitioning       [##########..........]  50%" in line
        out.wait_for("dc1/sn-002 pending")
        err.wait_for("watching /os/dc1/ (Ctrl-C to stop)")

        async def changes(client: EtcdClient) -> None:
            kv = await client.get(schema.task_key(IDC, "sn-001"))
            assert kv is not None
            t = Task.from_json(kv.value)
            t = lifecycle.record_progress(
                t, "partitioning", 80, "Formatting", now=T0 + timedelta(minutes=6)
            )
            await put_task(client, t)
            t = lifecycle.complete(t, now=T0 + timedelta(minutes=9))
            await put_task(client, t)
            await client.lease_revoke(fleet["sn-001"])
            await put_lease(client, "sn-002")
            await put_task(client, guide_task("sn-003"))

        with_client(etcd, changes)
        line = out.wait_for("dc1/sn-001 partitioning")
        assert line.endswith("[################....]  80%  Formatting")
        out.wait_for("dc1/sn-001 status installing → completed")
        out.wait_for("dc1/sn-001 log 2026-01-30T12:09:00Z [INFO] Installation completed")
        out.wait_for("dc1/sn-001 agent OFFLINE (lease key gone: expired or revoked)")
        out.wait_for("dc1/sn-002 agent online (lease ")
        out.wait_for("dc1/sn-003 task task-sn-003 created (installing)")
        out.wait_for("dc1/sn-003 server added")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        err.wait_for("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()


def test_watch_renders_a_log_chunk_as_its_lines() -> None:
    """Log lines are in chunk keys (see lpmosd.tasklogs): ``watch`` prints a chunk's lines
    when it is put (compressed or not); the cap deleting old chunks is not news."""
    key = schema.log_chunk_key("dc1", "sn-001", 7)
    lines = [f"2026-01-30T12:00:00Z [INFO] line {i}" for i in range(30)]
    value = tasklogs.chunk_value(lines)
    assert not value.startswith(b"[")  # 30 lines compress
    put_event = WatchEvent(EventType.PUT, KeyValue(key.encode(), value, 5, 5, 1, 0))
    out = inspect.render_event(put_event)
    assert [line.split(" log ", 1)[1] for line in out] == lines
    assert all(" dc1/sn-001 log " in line for line in out)
    assert inspect.render_event(put_event, logs=False) == []
    gone = WatchEvent(EventType.DELETE, KeyValue(key.encode(), b"", 5, 6, 0, 0))
    assert inspect.render_event(gone) == []
    junk = WatchEvent(EventType.PUT, KeyValue(key.encode(), b"\x00junk", 5, 8, 2, 0))
    assert inspect.render_event(junk)[0].endswith("log chunk written (unreadable)")
