"""Store operations as transactions, against a real etcd.

Every refused operation must leave the whole keyspace exactly as it was (compared key by
key with values, mod revisions and leases), and after every operation the server entry's
status equals the task's, written in the same Txn (same mod revision).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from provisioning_kit import GUIDE_TASK, HARDWARE, keyspace, open_proxy, wait_for

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import MAX_LOG_LINES, MachineMeta, ServerEntry, Task, TaskStatus
from lpmosd.errors import ConflictError, InputError, NotFoundError
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import HARDWARE_STEP, Store, StoredTask, lease_value
from lpmosd.timestamps import utcnow

IDC, SN, MAC = "dc1", "sn-001", "00:1a:2b:3c:4d:5e"
S = TaskStatus


def request(**changes: Any) -> CreateTaskRequest:
    return CreateTaskRequest.from_obj({**GUIDE_TASK, **changes})


def meta() -> MachineMeta:
    return MachineMeta.from_report(HARDWARE, now=utcnow())


async def assert_consistent(client: EtcdClient, idc: str = IDC, sn: str = SN) -> Task:
    """Task and server entry agree on status; the entry was written by the Txn that made
    the last status change (writes that keep the status leave it alone)."""
    task_kv = await client.get(schema.task_key(idc, sn))
    server_kv = await client.get(schema.server_key(idc, sn))
    assert task_kv is not None and server_kv is not None
    task = Task.from_json(task_kv.value)
    entry = ServerEntry.from_json(server_kv.value)
    assert entry.status is task.status
    assert entry.task_id == task.task_id
    assert (entry.sn, entry.mac) == (task.sn, task.mac)
    then = await client.get(schema.task_key(idc, sn), revision=server_kv.mod_revision)
    assert then is not None
    assert then.mod_revision == server_kv.mod_revision, "server entry not in the same Txn"
    assert Task.from_json(then.value).status is task.status
    assert entry.updated_at == task.status_history[-1].timestamp
    assert task.status_history[-1].status is task.status
    return (await Store(client).get_task(idc, sn)).task  # with its log lines


async def register(store: Store, client: EtcdClient, sn: str = SN) -> int:
    lease = await client.lease_grant(60)
    await store.register_agent(IDC, sn, mac=MAC, meta=meta(), lease_id=lease.id)
    return lease.id


async def drive_to(store: Store, client: EtcdClient, status: TaskStatus, sn: str = SN) -> Task:
    """Create a task for ``sn`` and move it to ``status`` through the store's operations."""
    await store.create_task(request(sn=sn), actor="test")
    if status is S.PENDING:
        return (await store.get_task(IDC, sn)).task
    if status is S.CANCELLED:
        return await store.cancel(IDC, sn, actor="test", reason="no longer needed")
    await register(store, client, sn)
    await store.approve(IDC, sn, approved_by="admin@example.com", notes="ok")
    if status is S.APPROVED:
        return (await store.get_task(IDC, sn)).task
    await store.record_progress(IDC, sn, step="partitioning", percent=50, message="parting")
    if status is S.INSTALLING:
        return (await store.get_task(IDC, sn)).task
    outcome = S.COMPLETED if status is S.COMPLETED else S.FAILED
    if outcome is S.COMPLETED:
        await store.record_progress(IDC, sn, step="partitioning", percent=100, message="")
    stored = await store.finish(IDC, sn, outcome=outcome, reason="disk on fire")
    assert stored.task.status is status
    return stored.task


# --------------------------------------------------------------------------- create


async def test_create_writes_server_and_task_in_one_txn(store: Store, client: EtcdClient) -> None:
    task = await store.create_task(request(), actor="admin@example.com")
    snap = await keyspace(client)
    assert set(snap) == {b"/os/dc1/servers/sn-001", b"/os/dc1/machines/sn-001/task"}
    revs = {rev for _, rev, _ in snap.values()}
    assert len(revs) == 1, "server entry and task must be written by one Txn"
    doc = json.loads(snap[b"/os/dc1/machines/sn-001/task"][0])
    assert doc["task_id"] == task.task_id and doc["task_id"].startswith("task-")
    assert doc["status"] == "pending"
    assert doc["disk_layout"] == "auto" and doc["network_config"] == "dhcp"
    assert doc["created_by"] == "admin@example.com"
    assert [h["status"] for h in doc["status_history"]] == ["pending"]
    server = json.loads(snap[b"/os/dc1/servers/sn-001"][0])
    assert server["status"] == "pending" and server["added_at"] == doc["created_at"]
    await assert_consistent(client)


@pytest.mark.parametrize("status", [S.PENDING, S.APPROVED, S.INSTALLING])
async def test_create_over_live_task_is_409_and_changes_nothing(
    store: Store, client: EtcdClient, status: TaskStatus
) -> None:
    await drive_to(store, client, status)
    before = await keyspace(client)
    with pytest.raises(ConflictError) as info:
        await store.create_task(request(os_type="Debian 12"), actor="test")
    assert info.value.status == 409 and info.value.field == "sn"
    assert await keyspace(client) == before


@pytest.mark.parametrize("status", [S.COMPLETED, S.FAILED, S.CANCELLED])
async def test_create_replaces_terminal_task(
    store: Store, client: EtcdClient, status: TaskStatus
) -> None:
    old = await drive_to(store, client, status)
    if status is not S.CANCELLED:
        # Leftovers of the old install: its meta (and a stale lease key) must go.
        lease = await client.lease_grant(60)
        await client.put(schema.lease_key(IDC, SN), lease_value(lease.id), lease=lease.id)
        assert await client.get(schema.meta_key(IDC, SN)) is not None
    new = await store.create_task(request(os_type="Debian 12"), actor="test")
    assert new.task_id != old.task_id and new.status is S.PENDING
    snap = await keyspace(client)
    assert set(snap) == {b"/os/dc1/servers/sn-001", b"/os/dc1/machines/sn-001/task"}
    assert len({rev for _, rev, _ in snap.values()}) == 1
    task = await assert_consistent(client)
    assert task.os_type == "Debian 12" and task.progress == ()


async def test_create_over_stray_server_entry(store: Store, client: EtcdClient) -> None:
    # The guide's etcdctl step 1 alone (a server entry without a task) is not a live task.
    await client.put(
        schema.server_key(IDC, SN), '{"status":"pending","added_at":"2026-01-30T12:00:00Z"}'
    )
    await store.create_task(request(), actor="test")
    await assert_consistent(client)


async def test_create_other_idc_is_independent(store: Store, client: EtcdClient) -> None:
    await store.create_task(request(), actor="test")
    await store.create_task(request(idc="dc2"), actor="test")
    await assert_consistent(client, "dc2")
    assert len(await store.list_tasks()) == 2
    assert [t.idc for t in await store.list_tasks(idc="dc2")] == ["dc2"]
    assert len(await store.list_servers("dc1")) == 1


# ---------------------------------------------------------------------- transitions


async def test_full_lifecycle_keeps_server_entry_in_step(store: Store, client: EtcdClient) -> None:
    await store.create_task(request(), actor="admin@example.com")
    assert (await assert_consistent(client)).status is S.PENDING

    lease_id = await register(store, client)
    task = await assert_consistent(client)
    assert task.status is S.PENDING
    assert task.progress[0].step == HARDWARE_STEP and task.progress[0].percent == 100
    lease_kv = await client.get(schema.lease_key(IDC, SN))
    assert lease_kv is not None and lease_kv.lease == lease_id
    assert lease_kv.value == f"lease-{lease_id}".encode()
    assert await client.get(schema.meta_key(IDC, SN)) is not None

    await store.approve(IDC, SN, approved_by="admin@example.com", notes="Hardware verified")
    task = await assert_consistent(client)
    assert task.status is S.APPROVED
    assert task.approval is not None and task.approval.approved
    assert (task.approval.approved_by, task.approval.notes) == (
        "admin@example.com",
        "Hardware verified",
    )

    for step in ("partitioning", "base_system"):
        for pct in (0, 50, 100):
            await store.record_progress(IDC, SN, step=step, percent=pct, message=f"{step} {pct}")
            assert (await assert_consistent(client)).status is S.INSTALLING
    await store.append_logs(IDC, SN, ["Slow disk I/O"], level="WARN")
    await store.finish(IDC, SN, outcome=S.COMPLETED)
    task = await assert_consistent(client)
    assert task.status is S.COMPLETED
    assert [h.status for h in task.status_history] == [
        S.PENDING,
        S.APPROVED,
        S.INSTALLING,
        S.COMPLETED,
    ]
    assert [(p.step, p.percent) for p in task.progress] == [
        (HARDWARE_STEP, 100),
        ("partitioning", 100),
        ("base_system", 100),
    ]
    assert any("[WARN] Slow disk I/O" in line for line in task.logs)
    # The lease key went with the completion, in the same Txn.
    assert await client.get(schema.lease_key(IDC, SN)) is None


@pytest.mark.parametrize("status", [S.PENDING, S.APPROVED, S.INSTALLING])
async def test_cancel_live_task_drops_lease_key(
    store: Store, client: EtcdClient, status: TaskStatus
) -> None:
    await drive_to(store, client, status)
    await store.cancel(IDC, SN, actor="op", reason="wrong rack")
    task = await assert_consistent(client)
    assert task.status is S.CANCELLED
    assert task.status_history[-1].reason == "wrong rack"
    assert await client.get(schema.lease_key(IDC, SN)) is None


async def test_fail_then_retry_resumes_from_failed_step(store: Store, client: EtcdClient) -> None:
    await drive_to(store, client, S.INSTALLING)
    await store.record_progress(IDC, SN, step="partitioning", percent=100, message="")
    await store.record_progress(IDC, SN, step="packages", percent=30, message="")
    await store.finish(IDC, SN, outcome=S.FAILED, reason="mirror unreachable")
    task = await assert_consistent(client)
    assert task.status is S.FAILED and task.error == "mirror unreachable"
    await store.retry(IDC, SN, actor="op")
    task = await assert_consistent(client)
    assert task.status is S.APPROVED and task.resume_from == "packages" and task.error is None


async def test_reaper_fail_respects_only_if(store: Store, client: EtcdClient) -> None:
    await drive_to(store, client, S.COMPLETED)
    before = await keyspace(client)
    assert await store.fail(IDC, SN, "agent heartbeat lost", actor="reaper") is None
    assert await keyspace(client) == before


async def test_fail_reports_the_last_decision_when_its_function_runs_again(
    store: Store, client: EtcdClient, etcd: EtcdProcess
) -> None:
    """``atomic_update`` re-runs the function on fresh data when a turn-taking hint said
    "nothing to do": Store.fail must report what the last run decided (review finding,
    issue 15: a stale "skipped" from the first run made it return None after failing).

    Fault at a named point: our first fail's answer is held at a proxy (applied in etcd)
    while a second fail queues behind it on the key and another client retries the task;
    the second fail's hint (failed) is then stale, the fresh read says approved."""
    await drive_to(store, client, S.INSTALLING)
    async with (
        open_proxy(etcd.client_port) as proxy,
        open_client([proxy.endpoint]) as slow,
    ):
        slow_store = Store(slow)
        key = schema.task_key(IDC, SN).encode()
        results: dict[str, object] = {}

        installing = (await store.get_task(IDC, SN)).kv

        async def first() -> None:
            results["first"] = await slow_store.fail(
                IDC, SN, "one", actor="reaper", current=installing
            )

        async def second() -> None:
            results["second"] = await slow_store.fail(IDC, SN, "two", actor="reaper")

        async with trio.open_nursery() as nursery:
            proxy.hold_responses()
            nursery.start_soon(first)

            async def applied() -> bool:
                return (await store.get_task(IDC, SN)).task.status is S.FAILED

            await wait_for(applied, what="first fail applied")
            await store.retry(IDC, SN, actor="op")  # failed -> approved, behind its back
            nursery.start_soon(second)
            await wait_for(lambda: slow._update_gates[key].users == 2, what="second queued")
            proxy.heal()
    assert results["first"] is not None
    second_result = results["second"]
    task = await assert_consistent(client)
    assert task.status is S.FAILED and task.error == "two"
    assert isinstance(second_result, StoredTask) and second_result.task.error == "two"


async def test_an_ambiguous_write_is_recognised_by_its_operation_id(
    store: Store, client: EtcdClient, etcd: EtcdProcess
) -> None:
    """Our write is applied but its answer is lost, and another writer changes the task
    before we look again: the operation id in the document shows ours went through, so it
    is not applied a second time (review finding, issue 15: values were compared, and the
    log line was appended twice)."""
    await drive_to(store, client, S.INSTALLING)
    async with (
        open_proxy(etcd.client_port) as proxy,
        open_client([proxy.endpoint]) as slow,
    ):
        slow_store = Store(slow)
        current = (await store.get_task(IDC, SN)).kv
        results: list[StoredTask] = []

        async def mine() -> None:
            results.append(await slow_store.append_logs(IDC, SN, ["mine"], current=current))

        async with trio.open_nursery() as nursery:
            proxy.hold_responses()
            nursery.start_soon(mine)

            async def applied() -> bool:
                task = (await store.get_task(IDC, SN)).task
                return any(line.endswith("mine") for line in task.logs)

            await wait_for(applied, what="our write applied")
            await store.append_logs(IDC, SN, ["other"])  # another writer, after ours
            proxy.cut()  # our answer is lost: an ambiguous outcome
            proxy.heal()
    task = await assert_consistent(client)
    lines = [line.rsplit("] ", 1)[-1] for line in task.logs]
    assert lines.count("mine") == 1 and lines.count("other") == 1
    assert results and "mine" not in results[0].task.logs  # the stored document: no lines
    shown = await store.with_logs(results[0], IDC, SN)
    assert [line.rsplit("] ", 1)[-1] for line in shown.logs].count("mine") == 1


async def test_stale_cached_task_does_not_cause_false_conflict(
    store: Store, client: EtcdClient
) -> None:
    """The regional passes its watch-cached task as ``current``; when the cache is behind
    (the control plane approved a moment ago) the update must be decided on fresh data."""
    await store.create_task(request(), actor="test")
    await register(store, client)
    stale = (await store.get_task(IDC, SN)).kv
    await store.approve(IDC, SN, approved_by="op")
    stored = await store.record_progress(
        IDC, SN, step="partitioning", percent=10, message="", current=stale
    )
    assert stored.task.status is S.INSTALLING
    await assert_consistent(client)


# ------------------------------------------------------------------ illegal moves

Op = Callable[[Store], Awaitable[Any]]
OPS: dict[str, Op] = {
    "approve": lambda s: s.approve(IDC, SN, approved_by="op"),
    "cancel": lambda s: s.cancel(IDC, SN, actor="op"),
    "retry": lambda s: s.retry(IDC, SN, actor="op"),
    "progress": lambda s: s.record_progress(IDC, SN, step="packages", percent=5, message=""),
    "complete": lambda s: s.finish(IDC, SN, outcome=S.COMPLETED),
    "fail": lambda s: s.finish(IDC, SN, outcome=S.FAILED, reason="x"),
    "logs": lambda s: s.append_logs(IDC, SN, ["hello"]),
    "delete": lambda s: s.delete_task(IDC, SN),
}
LEGAL: dict[TaskStatus, set[str]] = {
    S.PENDING: {"approve", "cancel", "logs"},
    S.APPROVED: {"cancel", "progress", "fail", "logs"},
    S.INSTALLING: {"cancel", "progress", "complete", "fail", "logs"},
    S.COMPLETED: {"delete"},
    S.FAILED: {"retry", "logs", "delete"},
    S.CANCELLED: {"delete"},
}
ILLEGAL = [(st, op) for st in S for op in OPS if op not in LEGAL[st]]


@pytest.mark.parametrize(("status", "op"), ILLEGAL, ids=[f"{s}-{o}" for s, o in ILLEGAL])
async def test_illegal_operation_is_409_and_changes_nothing(
    store: Store, client: EtcdClient, status: TaskStatus, op: str
) -> None:
    await drive_to(store, client, status)
    before = await keyspace(client)
    with pytest.raises(ConflictError) as info:
        await OPS[op](store)
    assert info.value.status == 409 and info.value.field
    assert await keyspace(client) == before


@pytest.mark.parametrize("op", sorted(OPS))
async def test_operation_on_missing_task_is_404(store: Store, client: EtcdClient, op: str) -> None:
    await store.create_task(request(sn="other"), actor="test")
    before = await keyspace(client)
    with pytest.raises(NotFoundError):
        await OPS[op](store)
    assert await keyspace(client) == before


async def test_register_with_wrong_mac_changes_nothing(store: Store, client: EtcdClient) -> None:
    await store.create_task(request(), actor="test")
    lease = await client.lease_grant(60)
    before = await keyspace(client)
    with pytest.raises(ConflictError) as info:
        await store.register_agent(IDC, SN, mac="00:00:00:00:00:01", meta=meta(), lease_id=lease.id)
    assert info.value.field == "mac"
    assert await keyspace(client) == before


# --------------------------------------------------------------------------- delete


@pytest.mark.parametrize("status", [S.COMPLETED, S.FAILED, S.CANCELLED])
async def test_delete_terminal_removes_every_key_of_the_machine(
    store: Store, client: EtcdClient, status: TaskStatus
) -> None:
    await drive_to(store, client, status)
    await drive_to(store, client, S.PENDING, sn="sn-002")  # a neighbour stays
    await store.delete_task(IDC, SN)
    keys = set(await keyspace(client))
    assert keys == {b"/os/dc1/servers/sn-002", b"/os/dc1/machines/sn-002/task"}
    with pytest.raises(NotFoundError):
        await store.get_task(IDC, SN)


# ------------------------------------------------------------------------------ logs


async def test_logs_are_capped_with_a_dropped_count(store: Store, client: EtcdClient) -> None:
    await drive_to(store, client, S.INSTALLING)
    before = len((await store.get_task(IDC, SN)).task.logs)
    batches = 8
    for b in range(batches):
        await store.append_logs(IDC, SN, [f"line {b}-{i} " + "x" * 1500 for i in range(100)])
    kv = await client.get(schema.task_key(IDC, SN))
    assert kv is not None
    assert len(kv.value) < 4 * 1024  # the lines are in chunk keys
    task = (await store.get_task(IDC, SN)).task
    assert len(task.logs) <= MAX_LOG_LINES
    assert task.logs_dropped == before + batches * 100 - len(task.logs)
    assert task.logs[-1].endswith("line 7-99 " + "x" * 1500)
    await assert_consistent(client)


async def test_log_line_count_cap(store: Store, client: EtcdClient) -> None:
    await drive_to(store, client, S.INSTALLING)
    for b in range(7):
        await store.append_logs(IDC, SN, [f"{b}-{i}" for i in range(100)])
    task = (await store.get_task(IDC, SN)).task
    assert len(task.logs) == MAX_LOG_LINES
    assert task.logs[-1].endswith("6-99")
    assert task.logs_dropped > 0


async def test_input_errors_are_lpmosd_errors(store: Store) -> None:
    with pytest.raises(InputError):
        await store.get_task(IDC, SN)


# ------------------------------------------------------------ corrupt documents

CORRUPT = b'{"status": "installing"}'  # e.g. a hand-written etcdctl put


async def test_corrupt_task_document_is_contained(store: Store, client: EtcdClient) -> None:
    """One unreadable task document must not break listings, must be refused (not
    mistaken for bad input) by every operation, and must stay deletable."""
    await drive_to(store, client, S.PENDING, sn="sn-good")
    await client.put(schema.task_key(IDC, SN), CORRUPT)
    await client.put(schema.server_key(IDC, SN), b"not json")
    assert [t.sn for t in await store.list_tasks()] == ["sn-good"]
    assert [s.sn for s in await store.list_servers(IDC)] == ["sn-good"]
    before = await keyspace(client)
    for op in ("approve", "cancel", "retry", "progress", "complete", "fail", "logs"):
        with pytest.raises(ConflictError) as info:
            await OPS[op](store)
        assert info.value.field == "sn" and "not a valid task" in info.value.message, op
    with pytest.raises(ConflictError):
        await store.get_task(IDC, SN)
    with pytest.raises(ConflictError):
        await store.create_task(request(), actor="test")
    assert await store.fail(IDC, SN, "x", actor="reaper") is None
    assert await keyspace(client) == before
    await store.delete_task(IDC, SN)
    assert {k for k in await keyspace(client) if SN.encode() in k} == set()


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
