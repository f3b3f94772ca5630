"""``apply`` against a real etcd: 500 servers, crashes at named points, concurrent v2 writers,
malformed data, existing v3 keys."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
import trio

from lpmosd import lifecycle, schema, tasklogs, timestamps
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import Task
from lpmosd.etcd import EtcdClient
from lpmosd.migrate import v2
from lpmosd.migrate.apply import Outcome, ServerResult, apply
from lpmosd.migrate.plan import Action, make_plan, read_snapshot
from lpmosd.migrate.record import MigrationRecord, record_key
from lpmosd.migrate.v2 import V2Server, V2Writer, example_server, state_doc, task_doc
from lpmosd.migrate.verify import verify

from .helpers import (
    BASE,
    FLEET,
    assert_all_or_nothing,
    assert_content,
    counts,
    load_fleet,
    migrated,
)


class Crash(Exception):
    """Stands for a SIGKILL at a hook point."""


def crash_at(point: str, nth: int = 1) -> Callable[[str], Awaitable[None]]:
    """A hook that raises Crash the ``nth`` time a point starting with ``point`` is hit."""
    seen = 0

    async def hook(p: str) -> None:
        nonlocal seen
        if p.startswith(point):
            seen += 1
            if seen == nth:
                raise Crash(p)

    return hook


class NoCrash(Exception):
    """The run finished before reaching the crash point."""


async def crashed(run: Awaitable[object]) -> None:
    """Await ``run``, which must die of Crash (alone, or in a nursery's group)."""
    try:
        await run
    except Crash:
        return
    except BaseExceptionGroup as group:
        assert group.subgroup(Crash) is not None, group
        return
    raise NoCrash


async def test_500_servers_across_3_idcs(client: EtcdClient) -> None:
    fleet = await load_fleet(client)
    assert sum(len(s) for s in fleet.values()) == 500
    started = time.monotonic()
    reports = [await apply(client, idc) for idc in FLEET]
    elapsed = time.monotonic() - started
    print(f"\nmigrated 500 servers across 3 IDCs in {elapsed:.2f}s")
    for idc, report in zip(FLEET, reports, strict=True):
        assert report.ok, report.events
        assert report.count(Outcome.MIGRATED) == FLEET[idc]
        assert report.list_deleted
        assert await counts(client, idc) == migrated(FLEET[idc])
        assert (await verify(client, idc)).passed
        await assert_content(client, idc, fleet[idc])
    # The daemon can read every task and server entry it finds.
    for idc in FLEET:
        for kv in (await client.get_prefix(schema.machines_prefix(idc))).kvs:
            parsed = schema.parse_key(kv.key)
            assert parsed is not None and parsed.kind in ("task", "logs")
            if parsed.kind == "task":
                Task.from_json(kv.value)
    # Idempotent: a second run changes nothing.
    before = (await client.get_prefix("/")).kvs
    again = await apply(client, "dc1")
    assert again.ok and again.count(Outcome.ALREADY) == FLEET["dc1"]
    assert (await client.get_prefix("/")).kvs == before


CRASH_POINTS = [
    ("scanned", 1),  # read everything, wrote nothing
    ("before-txn:", 1),  # first Txn about to go
    ("after-txn:", 1),  # first server done
    ("after-txn:", 37),  # in the middle, with Txns in flight
    ("before-txn:", 60),  # the last server about to go
    ("before-list-delete", 1),  # every server moved, list still there
    ("after-list-delete", 1),  # all done, crash before reporting
]


@pytest.mark.parametrize(("point", "nth"), CRASH_POINTS)
async def test_crash_at_any_point_then_rerun(client: EtcdClient, point: str, nth: int) -> None:
    fleet = await load_fleet(client, {"dc1": 60})
    sns = [s.sn for s in fleet["dc1"]]
    await crashed(apply(client, "dc1", hook=crash_at(point, nth)))
    await trio.sleep(0.05)  # let Txns cancelled in flight land (or not), as after a kill
    in_v2, in_v3 = await assert_all_or_nothing(client, "dc1", sns)
    assert in_v2 + in_v3 == 60
    report = await apply(client, "dc1")
    assert report.ok, report.events
    assert report.count(Outcome.MIGRATED) == in_v2
    assert await counts(client, "dc1") == migrated(60)
    assert (await verify(client, "dc1")).passed
    await assert_content(client, "dc1", fleet["dc1"])


@pytest.mark.slow
async def test_many_random_crashes_soak(client: EtcdClient) -> None:
    rng = random.Random(1234)
    fleet = await load_fleet(client)
    for idc, servers in fleet.items():
        for _ in range(8):
            point = rng.choice(["before-txn:", "after-txn:", "scanned", "before-list-delete"])
            with contextlib.suppress(NoCrash):
                await crashed(apply(client, idc, hook=crash_at(point, rng.randint(1, 60))))
            await assert_all_or_nothing(client, idc, [s.sn for s in servers])
        assert (await apply(client, idc)).ok
        assert await counts(client, idc) == migrated(len(servers))
        assert (await verify(client, idc)).passed
        await assert_content(client, idc, servers)


async def test_concurrent_v2_state_write_is_detected_and_not_lost(client: EtcdClient) -> None:
    await load_fleet(client, {"dc1": 20})
    writer = V2Writer(client, "dc1")
    victim = "sn-00002"  # installing
    now = BASE + timedelta(hours=1)
    seen: list[str] = []

    async def hook(point: str) -> None:
        if point == f"before-txn:{victim}" and not seen:
            seen.append(point)
            # An agent reports through the v2 regional while we migrate this very server.
            await writer.report_progress(victim, "os_install", 90, "late report", now=now)

    results: list[ServerResult] = []
    report = await apply(client, "dc1", hook=hook, on_result=results.append)
    assert seen
    changed = [r for r in results if r.outcome is Outcome.CHANGED]
    assert [r.sn for r in changed] == [victim]
    assert "v2 documents changed during the migration (state" in changed[0].reason
    assert any(victim in e for e in report.events)
    # Migrated again from the new content in the next round: the late report is in v3.
    assert report.ok and report.results[victim].outcome is Outcome.MIGRATED
    kv = await client.get(schema.task_key("dc1", victim))
    assert kv is not None
    task = Task.from_json(kv.value)
    assert {p.step: p.percent for p in task.progress}["os_install"] == 90
    assert "late report" in {p.message for p in task.progress}
    assert await counts(client, "dc1") == migrated(20)
    assert (await verify(client, "dc1")).passed


async def test_concurrent_v2_server_add_before_list_delete(client: EtcdClient) -> None:
    await load_fleet(client, {"dc1": 10})
    writer = V2Writer(client, "dc1")
    late = example_server(99, base=BASE)
    added: list[str] = []

    async def hook(point: str) -> None:
        if point == "before-list-delete" and not added:
            added.append(late.sn)
            await writer.create(late)  # documents, then the racy list append

    report = await apply(client, "dc1", hook=hook)
    assert added
    assert any("changed during the migration" in e for e in report.events)
    assert report.ok and report.list_deleted
    assert report.results[late.sn].outcome is Outcome.MIGRATED
    assert await counts(client, "dc1") == migrated(11)
    assert (await verify(client, "dc1")).passed


async def test_v2_write_after_migration_is_a_conflict_not_an_overwrite(
    client: EtcdClient,
) -> None:
    await load_fleet(client, {"dc1": 5})
    assert (await apply(client, "dc1")).ok
    task_before = await client.get(schema.task_key("dc1", "sn-00001"))
    # A v2 regional that was not stopped writes its state again.
    await V2Writer(client, "dc1").write_state("sn-00001", state_doc("installing", updated_at=BASE))
    report = await apply(client, "dc1")
    res = report.results["sn-00001"]
    assert res.outcome is Outcome.CONFLICT and "written again" in res.reason
    assert not report.ok
    assert await client.get(schema.task_key("dc1", "sn-00001")) == task_before
    assert await client.get(v2.state_key("dc1", "sn-00001")) is not None
    assert not (await verify(client, "dc1")).passed


async def test_existing_v3_key_is_a_conflict(client: EtcdClient) -> None:
    await load_fleet(client, {"dc1": 5})
    # A v3 control plane already created a task for sn-00003.
    req = CreateTaskRequest(idc="dc1", sn="sn-00003", mac="00:1a:2b:3c:4d:5e", os_type="demo")
    task = lifecycle.new_task(req, task_id="task-v3", now=timestamps.utcnow(), actor="ops")
    await client.put(schema.task_key("dc1", "sn-00003"), task.to_json())
    v2_before = await client.get(v2.tasks_key("dc1", "sn-00003"))
    report = await apply(client, "dc1")
    res = report.results["sn-00003"]
    assert res.outcome is Outcome.CONFLICT
    assert "v3 key already exists: /os/dc1/machines/sn-00003/task" in res.reason
    assert report.list_present and not report.list_deleted  # a listed server is not in v3
    kv = await client.get(schema.task_key("dc1", "sn-00003"))
    assert kv is not None and Task.from_json(kv.value).task_id == "task-v3"
    assert await client.get(v2.tasks_key("dc1", "sn-00003")) == v2_before
    c = await counts(client, "dc1")
    assert (c.v2_list, c.v2_tasks, c.servers, c.tasks, c.records) == (1, 1, 4, 5, 4)


def _good(sn: str) -> dict[str, object]:
    return task_doc(sn, task_id=f"t-{sn}", mac="00:1a:2b:3c:4d:5e", created_at=BASE)


MALFORMED: dict[str, tuple[bytes | None, bytes | None, str]] = {
    # sn: (tasks, state, expected reason)
    "bad-json": (b"{oops", None, "tasks: not valid JSON"),
    "no-os": (
        json.dumps({k: v for k, v in _good("no-os").items() if k != "os_type"}).encode(),
        None,
        "tasks: missing field 'os_type'",
    ),
    "bad-mac": (json.dumps({**_good("bad-mac"), "mac": "zz"}).encode(), None, "tasks.mac"),
    "wrong-sn": (json.dumps(_good("other")).encode(), None, "but the key names 'wrong-sn'"),
    "bad-status": (
        json.dumps(_good("bad-status")).encode(),
        json.dumps({"status": "rebooting", "updated_at": "2026-01-30T12:00:00Z"}).encode(),
        "state.status: unknown status 'rebooting'",
    ),
    "state-only": (None, json.dumps(state_doc("pending", updated_at=BASE)).encode(), "no tasks"),
    "bad name!": (json.dumps(_good("bad name!")).encode(), None, "not a valid v3 serial number"),
    "ghost": (None, None, "listed in /os/dc1/servers but has no tasks or state document"),
}


async def test_malformed_entries_are_reported_and_left_in_place(client: EtcdClient) -> None:
    await load_fleet(client, {"dc1": 10})
    writer = V2Writer(client, "dc1")
    for sn, (t, s, _) in MALFORMED.items():
        await writer.create(V2Server(sn, t, s))
    before = {kv.key: kv for kv in (await client.get_prefix(v2.machines_prefix("dc1"))).kvs}
    report = await apply(client, "dc1")
    assert not report.ok and report.list_present
    for sn, (_, _, reason) in MALFORMED.items():
        res = report.results[sn]
        assert res.outcome is Outcome.SKIPPED, (sn, res)
        assert reason in res.reason, (sn, res.reason)
    assert report.count(Outcome.MIGRATED) == 10
    after = {kv.key: kv for kv in (await client.get_prefix(v2.machines_prefix("dc1"))).kvs}
    for key, kv in before.items():
        if b"/sn-" not in key:
            assert after[key] == kv  # untouched: same value, same revision
    c = await counts(client, "dc1")
    assert (c.v2_list, c.servers, c.tasks, c.records) == (1, 10, 10, 10)
    # Fix one by hand and re-run: it migrates; the rest stay reported.
    await writer.write_task("bad-json", _good("bad-json"))
    report = await apply(client, "dc1")
    assert report.results["bad-json"].outcome is Outcome.MIGRATED
    assert report.count(Outcome.SKIPPED) == len(MALFORMED) - 1


async def test_unlisted_machines_are_migrated_and_a_bad_list_is_kept(client: EtcdClient) -> None:
    await load_fleet(client, {"dc1": 4})
    lost = example_server(7, base=BASE)
    await V2Writer(client, "dc1").create(V2Server(lost.sn, lost.task, lost.state, listed=False))
    plan = make_plan(await read_snapshot(client, "dc1"))
    item = next(i for i in plan.items if i.sn == lost.sn)
    assert item.action is Action.MIGRATE and not item.listed
    assert "not in /os/dc1/servers" in item.notes[0]
    assert (await apply(client, "dc1")).ok
    assert await counts(client, "dc1") == migrated(5)
    rec = await client.get(record_key("dc1", lost.sn))
    assert rec is not None and MigrationRecord.from_json(rec.value).listed is False

    await load_fleet(client, {"dc2": 3})
    await client.put(v2.list_key("dc2"), b"sn-00000,sn-00001")  # not JSON
    report = await apply(client, "dc2")
    assert report.count(Outcome.MIGRATED) == 3
    assert report.list_present and any("not valid JSON" in e for e in report.events)


async def test_record_keeps_the_v2_documents_verbatim(client: EtcdClient) -> None:
    s = example_server(4, base=BASE)
    await V2Writer(client, "dc1").create(s)
    tasks_kv = await client.get(v2.tasks_key("dc1", s.sn))
    state_kv = await client.get(v2.state_key("dc1", s.sn))
    assert tasks_kv is not None and state_kv is not None
    await apply(client, "dc1")
    rec_kv = await client.get(record_key("dc1", s.sn))
    task_kv = await client.get(schema.task_key("dc1", s.sn))
    assert rec_kv is not None and task_kv is not None
    rec = MigrationRecord.from_json(rec_kv.value)
    assert rec.tasks.value == tasks_kv.value and rec.tasks.mod_revision == tasks_kv.mod_revision
    assert rec.state is not None and rec.state.value == state_kv.value
    # One Txn wrote both.
    assert rec_kv.mod_revision == task_kv.mod_revision


async def test_verify_sees_a_tampered_task_and_tolerates_daemon_updates(
    client: EtcdClient,
) -> None:
    await load_fleet(client, {"dc1": 6})
    assert (await apply(client, "dc1")).ok
    # The daemon moves sn-00001 (approved) on: identity unchanged → still fine.
    key = schema.task_key("dc1", "sn-00001")
    kv = await client.get(key)
    assert kv is not None
    task = Task.from_json(kv.value)
    task = lifecycle.record_progress(task, "hardware_collect", 100, now=timestamps.utcnow())
    await client.put(key, task.to_json())
    report = await verify(client, "dc1")
    assert report.passed and report.updated_since == 1
    # Someone rewrites a mac by hand: verify names the server and the field.
    key = schema.task_key("dc1", "sn-00002")
    kv = await client.get(key)
    assert kv is not None
    doc = json.loads(kv.value)
    doc["mac"] = "00:00:00:00:00:01"
    await client.put(key, json.dumps(doc))
    report = await verify(client, "dc1")
    assert not report.passed
    assert report.problems == [("sn-00002", "v3 task identity differs from v2: mac")]
    # The task's log lines moved to a chunk key in the migration's Txn: verify reads
    # them with the document, so a changed line is a difference too.
    chunk_key = schema.log_chunk_key("dc1", "sn-00004", 1)
    chunk = await client.get(chunk_key)
    assert chunk is not None and tasklogs.chunk_lines(chunk.value)
    await client.put(chunk_key, json.dumps(["forged"]))
    report = await verify(client, "dc1")
    assert ("sn-00004", "v3 task differs from the v2 documents (at logs)") in report.problems
    # A migrated task deleted from v3 is a problem too.
    await client.delete(schema.task_key("dc1", "sn-00003"))
    report = await verify(client, "dc1")
    assert ("sn-00003", "migrated, but the v3 task is missing") in report.problems
