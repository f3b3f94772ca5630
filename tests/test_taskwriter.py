"""TaskWriter: batched, coalesced task updates keep Store.update_task's semantics."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from functools import partial

import pytest
import trio
from provisioning_kit import open_proxy, wait_for

from lpmosd import lifecycle, schema, timestamps
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import TaskStatus
from lpmosd.errors import ConflictError, NotFoundError
from lpmosd.etcd import EtcdClient, KeyValue, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store, StoredTask
from lpmosd.taskwriter import TaskWriter

IDC = "dc1"


def _mac(n: int) -> str:
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


async def _approved(store: Store, n: int) -> list[KeyValue]:
    """``n`` approved tasks; their current KeyValues (as a watch cache would hold them)."""
    kvs = []
    for i in range(n):
        sn = f"sn-{i:03d}"
        req = CreateTaskRequest(idc=IDC, sn=sn, mac=_mac(i), os_type="demo")
        await store.create_task(req, actor="test")
        await store.approve(IDC, sn, approved_by="test")
        kv = (await store.get_task(IDC, sn)).kv
        assert kv is not None
        kvs.append(kv)
    return kvs


def _progress(
    writer: TaskWriter,
    sn: str,
    *,
    step: str,
    percent: int,
    message: str,
    current: KeyValue | None,
) -> Awaitable[StoredTask]:
    return writer.store.record_progress(
        IDC, sn, step=step, percent=percent, message=message, current=current, via=writer
    )


async def test_batches_many_tasks_into_few_txns(client: EtcdClient) -> None:
    store = Store(client)
    kvs = await _approved(store, 40)
    writer = TaskWriter(store, max_inflight=1)

    async def report(i: int, kv: KeyValue) -> None:
        await _progress(
            writer, f"sn-{i:03d}", step="partitioning", percent=50, message="", current=kv
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as senders:
            for i, kv in enumerate(kvs):
                senders.start_soon(report, i, kv)
        nursery.cancel_scope.cancel()
    assert writer.updates == 40
    assert writer.txns < 40  # one Txn per batch, not per update
    for i in range(40):
        stored = await store.get_task(IDC, f"sn-{i:03d}")
        assert stored.task.status is TaskStatus.INSTALLING
        assert [(p.step, p.percent) for p in stored.task.progress] == [("partitioning", 50)]
        entry = await client.get(schema.server_key(IDC, f"sn-{i:03d}"))
        assert entry is not None and entry.mod_revision == stored.mod_revision
        assert json.loads(entry.value)["status"] == "installing"


async def test_coalesces_updates_of_one_task(client: EtcdClient) -> None:
    store = Store(client)
    (kv,) = await _approved(store, 1)
    writer = TaskWriter(store, max_inflight=1)
    results = []

    async def report(step: str) -> None:
        stored = await _progress(writer, "sn-000", step=step, percent=100, message="", current=kv)
        results.append(stored)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as senders:
            for k in range(10):
                senders.start_soon(report, f"step{k}")
        nursery.cancel_scope.cancel()
    task = (await store.get_task(IDC, "sn-000")).task
    assert {p.step for p in task.progress} == {f"step{k}" for k in range(10)}
    assert len(results) == 10
    assert writer.txns < 10


async def test_stale_cache_is_retried_not_lost(client: EtcdClient) -> None:
    store = Store(client)
    (kv,) = await _approved(store, 1)
    # Somebody else writes the task after our cache was filled.
    await store.record_progress(IDC, "sn-000", step="other", percent=10, message="")
    writer = TaskWriter(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        stored = await _progress(writer, "sn-000", step="mine", percent=20, message="", current=kv)
        nursery.cancel_scope.cancel()
    assert {p.step for p in stored.task.progress} == {"other", "mine"}
    task = (await store.get_task(IDC, "sn-000")).task
    assert {(p.step, p.percent) for p in task.progress} == {("other", 10), ("mine", 20)}
    assert writer.conflicts == 1


async def test_one_contended_task_does_not_hold_back_the_rest_of_its_batch(
    client: EtcdClient,
) -> None:
    """A failed compare of one task retries that task only: the others of the batch commit
    at once and are not charged an attempt (review finding, issue 15)."""
    store = Store(client)
    kvs = await _approved(store, 3)
    # Somebody else writes sn-000 after our cache was filled: its compare will fail.
    await store.record_progress(IDC, "sn-000", step="other", percent=10, message="")
    writer = TaskWriter(store, max_attempts=1)  # a single conflict is fatal to an update
    outcomes: dict[str, object] = {}

    async def report(i: int) -> None:
        sn = f"sn-{i:03d}"
        try:
            await _progress(writer, sn, step="mine", percent=20, message="", current=kvs[i])
        except Exception as exc:
            outcomes[sn] = type(exc).__name__
        else:
            outcomes[sn] = "ok"

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as senders:
            for i in range(3):
                senders.start_soon(report, i)
        nursery.cancel_scope.cancel()
    assert outcomes == {"sn-000": "ContentionError", "sn-001": "ok", "sn-002": "ok"}
    for sn in ("sn-001", "sn-002"):
        task = (await store.get_task(IDC, sn)).task
        assert [(p.step, p.percent) for p in task.progress] == [("mine", 20)]


async def test_an_ambiguous_batch_is_settled_by_operation_ids(
    client: EtcdClient, etcd: EtcdProcess
) -> None:
    """The batch is applied but its answer lost, and another writer changes the task before
    the writer looks again: the operation id in the document shows the update went
    through, so it is not applied twice (review finding, issue 15)."""
    store = Store(client)
    (kv,) = await _approved(store, 1)
    async with (
        open_proxy(etcd.client_port) as proxy,
        open_client([proxy.endpoint]) as slow,
        trio.open_nursery() as nursery,
    ):
        writer = TaskWriter(Store(slow))
        await nursery.start(writer.run)
        results = []

        async def mine() -> None:
            fn = partial(lifecycle.append_logs, lines=["mine"], now=timestamps.utcnow())
            results.append(await writer.update(IDC, "sn-000", fn, current=kv))

        async def applied() -> bool:
            task = (await store.get_task(IDC, "sn-000")).task
            return any(line.endswith("mine") for line in task.logs)

        async with trio.open_nursery() as senders:
            proxy.hold_responses()
            senders.start_soon(mine)
            await wait_for(applied, what="the batch applied")
            await store.append_logs(IDC, "sn-000", ["other"])  # another writer, after ours
            proxy.cut()  # the batch's answer is lost: an ambiguous outcome
            proxy.heal()
        nursery.cancel_scope.cancel()
    task = (await store.get_task(IDC, "sn-000")).task
    lines = [line.rsplit("] ", 1)[-1] for line in task.logs]
    assert lines.count("mine") == 1 and lines.count("other") == 1
    assert len(results) == 1


async def test_refusal_is_decided_on_fresh_data(client: EtcdClient) -> None:
    store = Store(client)
    req = CreateTaskRequest(idc=IDC, sn="sn-000", mac=_mac(0), os_type="demo")
    await store.create_task(req, actor="test")
    pending_kv = (await store.get_task(IDC, "sn-000")).kv
    await store.approve(IDC, "sn-000", approved_by="test")  # the cache has not seen this
    writer = TaskWriter(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        stored = await _progress(
            writer, "sn-000", step="s", percent=1, message="", current=pending_kv
        )
        assert stored.task.status is TaskStatus.INSTALLING
        await store.finish(IDC, "sn-000", outcome=TaskStatus.COMPLETED)
        with pytest.raises(ConflictError):
            await _progress(writer, "sn-000", step="s", percent=2, message="", current=stored.kv)
        nursery.cancel_scope.cancel()


async def test_deleted_task_is_not_found(client: EtcdClient) -> None:
    store = Store(client)
    (kv,) = await _approved(store, 1)
    await client.delete(schema.machine_prefix(IDC, "sn-000"), prefix=True)
    writer = TaskWriter(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with pytest.raises(NotFoundError):
            await _progress(writer, "sn-000", step="s", percent=1, message="", current=kv)
        nursery.cancel_scope.cancel()


async def test_without_run_it_is_the_store(client: EtcdClient) -> None:
    store = Store(client)
    (kv,) = await _approved(store, 1)
    writer = TaskWriter(store)
    stored = await _progress(writer, "sn-000", step="s", percent=5, message="", current=kv)
    assert stored.task.status is TaskStatus.INSTALLING
    assert writer.txns == 0
    assert writer.task_of(stored.kv or kv).status is TaskStatus.INSTALLING


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
