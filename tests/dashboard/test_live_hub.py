"""The dashboard's event hub, fed by hand-made view changes: ids, resume, overflow, deltas."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import trio

from lpmosd import documents, lifecycle, schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import Task
from lpmosd.etcd import EtcdClient, KeyValue
from lpmosd.view import Change, PrefixView
from lpmosd.web.live import (
    LOAD_SLICE,
    LiveHub,
    current_step,
    format_event_id,
    log_delta,
    parse_event_id,
)
from lpmosd.web.table_pages import table_page

T0 = datetime(2026, 1, 30, 12, 0, tzinfo=UTC)


def new_task(sn: str = "sn-001", idc: str = "dc1", task_id: str = "task-1") -> Task:
    req = CreateTaskRequest(idc=idc, sn=sn, mac="00:1a:2b:3c:4d:5e", os_type="demo")
    return lifecycle.new_task(req, task_id=task_id, now=T0, actor="alice")


def kv(key: str, value: bytes, rev: int) -> KeyValue:
    return KeyValue(key.encode(), value, rev, rev, 1, 0)


def task_change(task: Task, rev: int) -> Change:
    key = schema.task_key(task.idc, task.sn)
    return Change(key, kv(key, task.to_json(), rev), None, rev)


def synced_view(items: dict[str, KeyValue], revision: int) -> PrefixView:
    view = PrefixView(cast(EtcdClient, None), schema.ROOT)
    view.items = dict(items)
    view.revision = revision
    view.synced.set()
    return view


def frames(text: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of SSE frames."""
    out = []
    for frame in text:
        fields = dict(line.split(": ", 1) for line in frame.strip().split("\n"))
        out.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return out


def drain(receive: trio.MemoryReceiveChannel[str]) -> list[str]:
    got = []
    while True:
        try:
            got.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return got


def hub_with_task(rev: int = 10) -> tuple[LiveHub, PrefixView, Task]:
    task = new_task()
    key = schema.task_key("dc1", "sn-001")
    view = synced_view({key: kv(key, task.to_json(), rev)}, rev)
    hub = LiveHub()
    hub.attach(view)
    return hub, view, task


def test_event_ids_round_trip() -> None:
    assert parse_event_id(format_event_id((42, 3))) == (42, 3)
    assert parse_event_id("42") == (42, 0)
    for bad in (None, "", "x-1", "1-x", "-1", "1" * 50):
        assert parse_event_id(bad) is None


async def test_first_attach_is_the_baseline_and_resets_early_streams() -> None:
    hub = LiveHub()
    with hub.subscribe(machine=None, since=None) as early:
        assert early.backlog == []  # no snapshot yet: wait instead of reloading in a loop
        hub_task = new_task()
        key = schema.task_key("dc1", "sn-001")
        hub.attach(synced_view({key: kv(key, hub_task.to_json(), 7)}, 9))
        assert [e for _, e, _ in frames(drain(early.receive))] == ["reset"]
    assert hub.last_id == "9-0"
    assert [m for m, _, _ in hub.tasks()] == ["dc1/sn-001"]
    assert hub.counts_dict()["dc1"]["pending"] == 1
    with hub.subscribe(machine=None, since=(9, 0)) as sub:
        assert sub.backlog == []
    with hub.subscribe(machine=None, since=(8, 5)) as old:  # before the baseline
        assert [e for _, e, _ in frames(old.backlog)] == ["reset"]


async def test_changes_fan_out_to_table_and_to_the_machines_page() -> None:
    hub, view, task = hub_with_task()
    with (
        hub.subscribe(machine=None, since=(10, 0)) as table,
        hub.subscribe(machine="dc1/sn-001", since=(10, 0)) as page,
        hub.subscribe(machine="dc1/other", since=(10, 0)) as elsewhere,
    ):
        approved = lifecycle.approve(task, approved_by="bob", notes="ok", now=T0)
        for listener in view.listeners:
            listener(task_change(approved, 11))
        ((tid, event, data),) = frames(drain(table.receive))
        assert (tid, event) == ("11-0", "task")
        assert data["summary"]["status"] == "approved"
        assert data["counts"] == {
            "dc1": {s.value: int(s.value == "approved") for s in documents.TaskStatus}
        }
        assert "detail" not in data  # the table gets rows, not documents
        ((_, _, detail),) = frames(drain(page.receive))
        assert detail["detail"]["approval"]["approved_by"] == "bob"
        assert detail["logs"]["replace"] is False
        assert detail["logs"]["lines"] == [approved.logs[-1]]
        assert drain(elsewhere.receive) == []


async def test_resume_replays_exactly_what_was_missed() -> None:
    hub, _, task = hub_with_task()
    t = task
    for rev in (11, 12, 13):
        t = lifecycle.append_logs(t, [f"line {rev}"], now=T0)
        hub.apply(task_change(t, rev))
    with hub.subscribe(machine="dc1/sn-001", since=(11, 0)) as sub:
        got = frames(sub.backlog)
    assert [i for i, _, _ in got] == ["12-0", "13-0"]
    assert [d["logs"]["lines"] for _, _, d in got] == [[t.logs[-2]], [t.logs[-1]]]
    # Same revision delivered again (the watch after our own observe): not a new event.
    hub.apply(task_change(t, 13))
    assert hub.last_id == "13-0"


async def test_a_ring_too_short_for_the_gap_means_reset() -> None:
    hub, _, task = hub_with_task()
    hub.ring_size = 2
    t = task
    for rev in (11, 12, 13):
        t = lifecycle.append_logs(t, ["x"], now=T0)
        hub.apply(task_change(t, rev))
    with hub.subscribe(machine=None, since=(11, 0)) as sub:  # 12 and 13 still in the ring
        assert [i for i, _, _ in frames(sub.backlog)] == ["12-0", "13-0"]
    with hub.subscribe(machine=None, since=(10, 0)) as sub:  # 11 was evicted
        assert [e for _, e, _ in frames(sub.backlog)] == ["reset"]


async def test_a_slow_browser_is_cut_off_and_resumes_from_the_ring() -> None:
    hub, _, task = hub_with_task()
    hub.queue_size = 2
    t = task
    with hub.subscribe(machine=None, since=(10, 0)) as sub:
        for rev in (11, 12, 13):
            t = lifecycle.append_logs(t, ["x"], now=T0)
            hub.apply(task_change(t, rev))
        got = frames(drain(sub.receive))  # two queued frames, then end of stream
        assert [i for i, _, _ in got] == ["11-0", "12-0"]
        assert hub.subscribers == 0
    with hub.subscribe(machine=None, since=parse_event_id(got[-1][0])) as again:
        assert [i for i, _, _ in frames(again.backlog)] == ["13-0"]


async def test_a_new_session_view_is_diffed_so_nothing_is_missed() -> None:
    hub, _, task = hub_with_task()
    other = new_task("sn-002", task_id="task-2")
    k1, k2 = schema.task_key("dc1", "sn-001"), schema.task_key("dc1", "sn-002")
    hub.apply(task_change(other, 11))
    with hub.subscribe(machine=None, since=(11, 0)) as sub:
        # While the session was down: sn-001 was approved, sn-002 deleted, an agent came up.
        approved = lifecycle.approve(task, approved_by="bob", now=T0)
        lease = schema.lease_key("dc1", "sn-001")
        hub.attach(synced_view({k1: kv(k1, approved.to_json(), 15), lease: kv(lease, b"", 14)}, 20))
        got = frames(drain(sub.receive))
    assert [(i, e, d["key"]) for i, e, d in got] == [
        ("20-0", "task", "dc1/sn-001"),
        ("20-1", "agent", "dc1/sn-001"),
        ("20-2", "deleted", "dc1/sn-002"),
    ]
    assert hub.machine("dc1", "sn-002") is None
    assert k2 not in hub.machines
    assert hub.counts_dict() == {
        "dc1": {s.value: int(s.value == "approved") for s in documents.TaskStatus}
    }


async def test_meta_and_lease_events_and_deletion() -> None:
    hub, _, _ = hub_with_task()
    meta_key = schema.meta_key("dc1", "sn-001")
    meta = documents.MachineMeta(
        cpu_model="<b>cpu</b>", cpu_cores=4, memory_bytes=1 << 30, reported_at=T0
    )
    with (
        hub.subscribe(machine="dc1/sn-001", since=(10, 0)) as page,
        hub.subscribe(machine=None, since=(10, 0)) as table,
    ):
        hub.apply(Change(meta_key, kv(meta_key, meta.to_json(), 11), None, 11))
        lease_key = schema.lease_key("dc1", "sn-001")
        hub.apply(Change(lease_key, kv(lease_key, b"lease-1", 11), None, 11))
        hub.apply(Change(lease_key, None, None, 12))
        task_key = schema.task_key("dc1", "sn-001")
        hub.apply(Change(task_key, None, None, 13))
        page_events = frames(drain(page.receive))
        table_events = frames(drain(table.receive))
    assert [(i, e) for i, e, _ in page_events] == [
        ("11-0", "meta"),
        ("11-1", "agent"),
        ("12-0", "agent"),
        ("13-0", "deleted"),
    ]
    assert page_events[0][2]["meta"]["cpu_model"] == "<b>cpu</b>"  # JSON; the page uses text
    assert [e for _, e, _ in table_events] == ["agent", "agent", "deleted"]
    assert hub.counts_dict() == {}


async def test_unreachable_mark_reaches_table_and_page() -> None:
    """The disruption guard's mark: an "agent" event with ``unreachable`` and the flag in
    the row summary; clearing it publishes again; unknown machines are ignored."""
    hub, _, task = hub_with_task()
    with (
        hub.subscribe(machine="dc1/sn-001", since=(10, 0)) as page,
        hub.subscribe(machine=None, since=(10, 0)) as table,
    ):
        hub.set_unreachable("dc1", "sn-001", True)
        hub.set_unreachable("dc1", "sn-001", True)  # no change: no event
        hub.set_unreachable("dc1", "sn-404", True)
        task_key = schema.task_key("dc1", "sn-001")
        hub.apply(Change(task_key, kv(task_key, task.to_json(), 11), None, 11))
        hub.set_unreachable("dc1", "sn-001", False)
        page_events = frames(drain(page.receive))
        table_events = frames(drain(table.receive))
    assert [e for _, e, _ in page_events] == ["agent", "task", "agent"]
    assert page_events[0][2] == {"key": "dc1/sn-001", "online": False, "unreachable": True}
    assert page_events[1][2]["summary"]["unreachable"] is True
    assert page_events[2][2]["unreachable"] is False
    assert [e for _, e, _ in table_events] == ["agent", "task", "agent"]
    state = hub.machine("dc1", "sn-001")
    assert state is not None and not state.unreachable


def test_log_delta() -> None:
    t = new_task()
    more = lifecycle.append_logs(t, ["a", "b"], now=T0)
    d = log_delta(more, t)
    assert (d["start"], d["replace"], d["end"]) == (1, False, 3)
    assert d["lines"] == list(more.logs[1:])
    assert log_delta(more, None)["replace"] is True
    fresh = new_task(task_id="task-2")
    assert log_delta(fresh, more)["replace"] is True  # a new task for the machine


def test_current_step_prefers_the_latest_unfinished() -> None:
    t = new_task()
    t = lifecycle.approve(t, approved_by="x", now=T0)
    t = lifecycle.record_progress(t, "partitioning", 100, now=T0 + timedelta(seconds=1))
    t = lifecycle.record_progress(t, "base_system", 50, now=T0 + timedelta(seconds=2))
    step = current_step(t.progress)
    assert step is not None and step.step == "base_system"
    t = lifecycle.record_progress(t, "base_system", 100, now=T0 + timedelta(seconds=3))
    step = current_step(t.progress)
    assert step is not None and (step.step, step.percent) == ("base_system", 100)


def task_delete(idc: str, sn: str, rev: int) -> Change:
    return Change(schema.task_key(idc, sn), None, None, rev)


async def test_a_table_stream_gets_the_rows_of_its_page_only() -> None:
    hub, _, _ = hub_with_task()
    for i, sn in enumerate(("sn-a", "sn-b", "sn-c", "sn-d")):
        hub.apply(task_change(new_task(sn), 11 + i))
    assert hub.order == ["dc1/sn-001", "dc1/sn-a", "dc1/sn-b", "dc1/sn-c", "dc1/sn-d"]
    version = hub.counts_version
    with (
        hub.subscribe(machine=None, since=(14, 0), lo="dc1/sn-b", hi="dc1/sn-c") as middle,
        hub.subscribe(machine=None, since=(14, 0), lo="dc1/sn-c") as last,
    ):
        for sn in ("sn-a", "sn-b", "sn-c", "sn-d"):
            cancelled = lifecycle.transition(
                new_task(sn), documents.TaskStatus.CANCELLED, now=T0, actor="x"
            )
            hub.apply(task_change(cancelled, 20))
        hub.apply(task_change(new_task("sn-e"), 21))  # a new task past the last page's end
        hub.apply(task_delete("dc1", "sn-a", 22))
        assert [d["key"] for _, _, d in frames(drain(middle.receive))] == ["dc1/sn-b", "dc1/sn-c"]
        got = [(e, d["key"]) for _, e, d in frames(drain(last.receive))]
        assert got == [("task", "dc1/sn-c"), ("task", "dc1/sn-d"), ("task", "dc1/sn-e")]
    assert hub.order == ["dc1/sn-001", "dc1/sn-b", "dc1/sn-c", "dc1/sn-d", "dc1/sn-e"]
    assert hub.counts_version > version
    assert '"cancelled":3' in hub.counts_frame() and "\nid:" not in hub.counts_frame()


def test_table_pages_follow_their_cursors() -> None:
    hub, _, _ = hub_with_task()
    hub.apply(task_delete("dc1", "sn-001", 11))
    for i in range(25):
        hub.apply(task_change(new_task(f"sn-{i:02d}", idc="dc1" if i < 20 else "dc2"), 12 + i))
    first = table_page(hub, size=10)
    assert first.machines[0] == "dc1/sn-00" and (first.has_prev, first.has_next) == (False, True)
    second = table_page(hub, after=first.machines[-1], size=10)
    assert second.machines[0] == "dc1/sn-10" and second.offset == 10
    # The cursor's own machine may be gone: the page still starts right after where it was.
    hub.apply(task_delete("dc1", "sn-09", 50))
    assert table_page(hub, after="dc1/sn-09", size=10).machines == second.machines
    back = table_page(hub, before=second.machines[0], size=10)
    # Fewer than a page before it: the first page, full.
    assert back.machines == [*(f"dc1/sn-0{i}" for i in range(9)), "dc1/sn-10"]
    assert (back.has_prev, back.offset) == (False, 0)
    dc2 = table_page(hub, idc="dc2", size=3)
    assert dc2.machines == ["dc2/sn-20", "dc2/sn-21", "dc2/sn-22"] and dc2.has_next
    end = table_page(hub, idc="dc2", after="dc2/sn-22", size=3)
    assert end.machines == ["dc2/sn-23", "dc2/sn-24"] and not end.has_next and end.has_prev
    prev = table_page(hub, idc="dc2", before="dc2/sn-24", size=2)
    assert prev.machines == ["dc2/sn-22", "dc2/sn-23"] and prev.has_prev and prev.has_next
    assert table_page(hub, status="cancelled").machines == []
    assert table_page(hub, idc="dc9").machines == []


async def test_load_yields_and_keeps_what_changed_meanwhile() -> None:
    """A fleet's view is decoded a slice at a time (the session's keepalives run in
    between); keys changed while it loads — a status change, a new task, a deleted one —
    are taken as they are when the load ends, and later changes reach the listener."""
    count = 12 * LOAD_SLICE
    items = {}
    for i in range(count):
        task = new_task(sn=f"sn-{i:04d}", task_id=f"task-{i}")
        key = schema.task_key("dc1", task.sn)
        items[key] = kv(key, task.to_json(), 10 + i)
    view = synced_view(items, 10 + count)
    hub = LiveHub()
    rev = view.revision
    changed: list[str] = []
    steps = 0

    async def meanwhile() -> None:
        nonlocal rev, steps
        # Two turns: the load, started in the same batch, has taken its snapshot by now.
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        while not hub.synced:
            steps += 1
            i = 3 * steps
            rev += 1
            if steps == 1:
                key = schema.task_key("dc1", f"sn-{i:04d}")
                del view.items[key]
                changed.append(f"-{i}")
            elif steps == 2:
                task = new_task(sn="sn-new", task_id="task-new")
                key = schema.task_key("dc1", task.sn)
                view.items[key] = kv(key, task.to_json(), rev)
                changed.append("+new")
            else:
                key = schema.task_key("dc1", f"sn-{i:04d}")
                task = Task.from_json(view.items[key].value)
                approved = lifecycle.approve(task, approved_by="op", now=T0)
                view.items[key] = kv(key, approved.to_json(), rev)
                changed.append(f"approved {i}")
            view.revision = rev
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.load, view)
        nursery.start_soon(meanwhile)
    assert steps >= 3, f"the load did not yield while decoding {count} documents"
    tasks = {m: t for m, t, _ in hub.tasks()}
    expected = {
        f"dc1/{Task.from_json(kv.value).sn}": Task.from_json(kv.value).status
        for key, kv in view.items.items()
    }
    assert {m: t.status for m, t in tasks.items()} == expected, changed
    assert "dc1/sn-new" in tasks and "dc1/sn-0003" not in tasks
    # The listener follows from here.
    later = new_task(sn="sn-later", task_id="task-later")
    view._emit(task_change(later, rev + 1))
    assert "dc1/sn-later" in {m for m, _, _ in hub.tasks()}
