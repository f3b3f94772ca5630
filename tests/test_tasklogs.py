"""Task logs in append-only chunk keys (issue 15): the split and the cap on their own, then
the store, the task writer and the dashboard's hub against a real etcd."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from datetime import UTC, datetime

import trio
from provisioning_kit import GUIDE_TASK, HARDWARE, keyspace, wait_for

from lpmosd import lifecycle, schema, tasklogs
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import (
    MAX_LOG_BYTES,
    MAX_LOG_CHUNKS,
    MAX_LOG_LINES,
    MachineMeta,
    Task,
    TaskStatus,
)
from lpmosd.etcd import EtcdClient, KeyValue, delete, put
from lpmosd.etcd.txn import Delete, Put
from lpmosd.store import Store
from lpmosd.taskwriter import TaskWriter
from lpmosd.timestamps import utcnow
from lpmosd.view import PrefixView
from lpmosd.web.live import LiveHub

IDC, SN, MAC = "dc1", "sn-001", "00:1a:2b:3c:4d:5e"
T0 = datetime(2026, 1, 30, 12, 0, tzinfo=UTC)


def new_task(sn: str = SN) -> Task:
    req = CreateTaskRequest(idc=IDC, sn=sn, mac=MAC, os_type="demo")
    return lifecycle.new_task(req, task_id="task-1", now=T0, actor="alice")


def texts(task: Task) -> list[str]:
    return [line.rsplit("] ", 1)[-1] for line in task.logs]


class Memory:
    """Chunk keys kept in a dict: applies :func:`tasklogs.split`'s ops like etcd would."""

    def __init__(self) -> None:
        self.doc = new_task()
        self.keys: dict[str, bytes] = {}

    def append(self, lines: list[str]) -> Task:
        new = lifecycle.append_logs(self.doc, lines, now=T0)
        self.doc, ops = tasklogs.split(IDC, SN, self.doc, new)
        for op in ops:
            if isinstance(op, Put):
                self.keys[op.key.decode()] = op.value
            else:
                assert isinstance(op, Delete) and not op.range_end
                self.keys.pop(op.key.decode())
        return self.shown()

    def shown(self) -> Task:
        kvs = [KeyValue(k.encode(), v, 1, 1, 1, 0) for k, v in self.keys.items()]
        return tasklogs.assemble(self.doc, tasklogs.chunks_of(kvs))


# ------------------------------------------------------------------- the split, alone


def test_lines_cap_matches_the_inline_cap_exactly() -> None:
    """Short lines: the lines cap (500) is exact, as when the lines were in the document
    (the oldest chunk is partly hidden by log_skip until all of it is dropped)."""
    mem, inline = Memory(), new_task()
    for b in range(23):
        batch = [f"{b}-{i}" for i in range(1 + b * 7 % 61)]
        shown = mem.append(batch)
        inline = lifecycle.append_logs(inline, batch, now=T0)
        assert shown.logs == inline.logs
        assert shown.logs_dropped == inline.logs_dropped
    assert len(inline.logs) == MAX_LOG_LINES and inline.logs_dropped > 0
    assert mem.doc.logs == () and mem.doc.log_skip > 0
    # Only the live chunks have keys.
    assert sorted(mem.keys) == [schema.log_chunk_key(IDC, SN, c.seq) for c in mem.doc.log_chunks]


def test_bytes_cap_drops_whole_chunks_oldest_first() -> None:
    mem = Memory()
    for b in range(8):
        mem.append([f"{b}-{i} " + "x" * 1500 for i in range(40)])
    shown = mem.shown()
    size = 2 + sum(len(json.dumps(line)) + 1 for line in shown.logs)
    assert size <= MAX_LOG_BYTES
    assert len(shown.logs) + shown.logs_dropped == len(new_task().logs) + 8 * 40
    assert texts(shown)[-1].startswith("7-39 ")
    assert len(shown.logs) % 40 == 0  # whole batches
    assert mem.doc.log_skip == 0


def test_at_most_max_log_chunks_are_kept() -> None:
    mem = Memory()
    for i in range(MAX_LOG_CHUNKS + 10):
        shown = mem.append([f"line {i}"])
    assert len(mem.doc.log_chunks) == MAX_LOG_CHUNKS == len(mem.keys)
    assert texts(shown) == [f"line {i}" for i in range(10, MAX_LOG_CHUNKS + 10)]
    assert shown.logs_dropped == 10 + len(new_task().logs)  # the creation line went first


def test_chunk_values_compress_when_smaller_and_refuse_bombs() -> None:
    small = ["one line"]
    assert tasklogs.chunk_value(small) == json.dumps(small, separators=(",", ":")).encode()
    many = [f"Unpacking libfoo{i} (1.{i}.0-1) over (1.{i}.0-0) ..." for i in range(40)]
    packed = tasklogs.chunk_value(many)
    assert not packed.startswith(b"[") and len(packed) < len(json.dumps(many)) / 2
    assert tasklogs.chunk_lines(packed) == tuple(many)
    assert tasklogs.chunk_lines(json.dumps(many).encode()) == tuple(many)
    bomb = zlib.compress(b"[" + b'"x",' * 200_000 + b'"x"]')
    assert tasklogs.chunk_lines(bomb) is None  # inflates beyond any chunk we write
    assert tasklogs.chunk_lines(packed[:-3]) is None  # truncated
    assert tasklogs.chunk_lines(zlib.compress(b'{"a": 1}')) is None
    assert tasklogs.chunk_lines(b"\x00garbage") is None


def test_a_write_without_lines_puts_no_chunk() -> None:
    doc = replace(new_task(), log_seq=3)
    progressed = replace(doc, os_version="x")
    assert tasklogs.split(IDC, SN, doc, progressed) == (progressed, ())


def test_stored_and_api_forms() -> None:
    """The document stores the chunk list (not shown by the API); the assembled task
    shows the lines and lists no chunks (writing it back could not duplicate lines)."""
    mem = Memory()
    mem.append(["a"])  # also moves the creation line (written inline) into chunk 1
    mem.append(["b", "c"])
    stored = json.loads(mem.doc.to_json())
    chunks = [[c.seq, c.lines, c.size] for c in mem.doc.log_chunks]
    assert stored["logs"] == [] and stored["log_chunks"] == chunks
    assert [c[:2] for c in chunks] == [[1, len(new_task().logs) + 1], [2, 2]]
    assert Task.from_json(mem.doc.to_json()) == mem.doc
    shown = mem.shown()
    assert "log_chunks" not in shown.to_dict() and texts(shown)[-3:] == ["a", "b", "c"]
    assert shown.log_chunks == ()


# --------------------------------------------------------------------- against etcd


async def chunk_keys(client: EtcdClient, sn: str = SN) -> list[bytes]:
    return [kv.key for kv in (await client.get_prefix(schema.logs_prefix(IDC, sn))).kvs]


async def installing(store: Store, client: EtcdClient, sn: str = SN) -> None:
    req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn})
    await store.create_task(req, actor="test")
    lease = await client.lease_grant(60)
    meta = MachineMeta.from_report(HARDWARE, now=utcnow())
    await store.register_agent(IDC, sn, mac=MAC, meta=meta, lease_id=lease.id)
    await store.approve(IDC, sn, approved_by="op")
    await store.record_progress(IDC, sn, step="partitioning", percent=10, message="")


async def test_an_append_puts_one_chunk_with_only_its_lines(
    store: Store, client: EtcdClient
) -> None:
    await installing(store, client)
    before = (await store.get_task(IDC, SN)).task
    doc_before = await client.get(schema.task_key(IDC, SN))
    stored = await store.append_logs(IDC, SN, ["one", "two"])
    doc = await client.get(schema.task_key(IDC, SN))
    assert doc is not None and doc_before is not None
    assert Task.from_json(doc.value).logs == ()
    assert len(doc.value) < len(doc_before.value) + 100  # no lines in the document
    newest = stored.task.log_chunks[-1]
    chunk = await client.get(schema.log_chunk_key(IDC, SN, newest.seq))
    assert chunk is not None and chunk.mod_revision == doc.mod_revision  # one Txn
    lines = tasklogs.chunk_lines(chunk.value)
    assert lines is not None and [line.rsplit("] ", 1)[-1] for line in lines] == ["one", "two"]
    after = (await store.get_task(IDC, SN)).task
    assert after.logs == (*before.logs, *lines)
    # The server entry is left alone by writes that keep the status.
    entry = await client.get(schema.server_key(IDC, SN))
    assert entry is not None and entry.mod_revision < doc.mod_revision


async def test_the_cap_deletes_the_oldest_chunks_in_the_same_txn(
    store: Store, client: EtcdClient
) -> None:
    await installing(store, client)
    before = len((await store.get_task(IDC, SN)).task.logs)
    for b in range(6):
        await store.append_logs(IDC, SN, [f"{b}-{i} " + "x" * 1000 for i in range(30)])
    kv = await client.get(schema.task_key(IDC, SN))
    assert kv is not None
    doc = Task.from_json(kv.value)
    live = [schema.log_chunk_key(IDC, SN, c.seq).encode() for c in doc.log_chunks]
    assert await chunk_keys(client) == live
    first_live = doc.log_chunks[0].seq
    assert first_live > 1  # older chunks were dropped ...
    gone = schema.log_chunk_key(IDC, SN, first_live - 1)
    assert await client.get(gone) is None
    # ... by the write that made the document as it is: just before it, the key was there.
    assert await client.get(gone, revision=kv.mod_revision - 1) is not None
    task = (await store.get_task(IDC, SN)).task
    assert task.logs_dropped + len(task.logs) == before + 6 * 30
    assert task.logs[-1].endswith("5-29 " + "x" * 1000)


async def test_a_repeated_operation_id_appends_once(store: Store, client: EtcdClient) -> None:
    await installing(store, client)
    n = len(await chunk_keys(client))
    await store.append_logs(IDC, SN, ["once"], op_id="agent:abc")
    await store.append_logs(IDC, SN, ["once"], op_id="agent:abc")  # a retry
    assert len(await chunk_keys(client)) == n + 1
    assert texts((await store.get_task(IDC, SN)).task).count("once") == 1


async def test_reads_assemble_the_same_task(store: Store, client: EtcdClient) -> None:
    """get_task, list_tasks, a task page and the dashboard hub's view show the same lines, and the
    same as the document used to hold (the inline cap applied to every line written)."""
    await installing(store, client)
    await installing(store, client, sn="sn-002")
    async with trio.open_nursery() as nursery:
        view = PrefixView(client, schema.ROOT)
        await nursery.start(view.run)
        hub = LiveHub()
        hub.attach(view)
        reference = (await store.get_task(IDC, SN)).task
        for b in range(9):
            batch = [f"{b}-{i}" for i in range(70)]
            await store.append_logs(IDC, SN, batch)
            reference = lifecycle.append_logs(reference, batch, now=T0)
            await store.append_logs(IDC, "sn-002", [f"other {b}"])
        got = (await store.get_task(IDC, SN)).task
        assert texts(got) == texts(reference)
        assert got.logs_dropped == reference.logs_dropped > 0
        listed = {t.sn: t for t in await store.list_tasks(idc=IDC)}
        assert listed[SN].to_dict() == got.to_dict()
        page = await store.list_task_page(idc=IDC, status=None, limit=1, continue_token=None)
        assert [t.to_dict() for t in page.tasks] == [got.to_dict()]
        assert texts(listed["sn-002"])[-1] == "other 8"

        def hub_task() -> Task | None:
            state = hub.machine(IDC, SN)
            return state.task if state is not None else None

        async def caught_up() -> bool:
            t = hub_task()
            return t is not None and t.to_dict() == got.to_dict()

        await wait_for(caught_up, what="the hub's task equals get_task")
        nursery.cancel_scope.cancel()


async def test_delete_and_replace_clear_the_chunks(store: Store, client: EtcdClient) -> None:
    await installing(store, client)
    await store.append_logs(IDC, SN, ["first install"])
    await store.finish(IDC, SN, outcome=TaskStatus.COMPLETED)
    assert await chunk_keys(client)
    req = CreateTaskRequest.from_obj(GUIDE_TASK)
    await store.create_task(req, actor="test")  # re-provisioning replaces the finished task
    assert await chunk_keys(client) == []
    assert "first install" not in texts((await store.get_task(IDC, SN)).task)
    await store.cancel(IDC, SN, actor="op")
    await installing(store, client, sn="sn-002")
    await store.delete_task(IDC, SN)
    assert not [k for k in await keyspace(client) if k.startswith(b"/os/dc1/machines/sn-001/")]


async def test_a_document_with_inline_lines_reads_and_moves_them_to_a_chunk(
    store: Store, client: EtcdClient
) -> None:
    """A document written before the split (lines inline) reads as it is; its next log
    write moves the inline lines into the first chunk, in order."""
    await installing(store, client)
    kv = await client.get(schema.task_key(IDC, SN))
    assert kv is not None
    doc = Task.from_json(kv.value)
    assert doc.log_seq > 0
    old_style = replace(
        doc, logs=("old 1", "old 2"), log_seq=0, log_chunks=(), log_skip=0, logs_dropped=0
    )
    await client.txn(
        [],
        [put(kv.key, old_style.to_json()), delete(schema.logs_prefix(IDC, SN), prefix=True)],
    )
    assert (await store.get_task(IDC, SN)).task.logs == ("old 1", "old 2")
    await store.append_logs(IDC, SN, ["new"])
    task = (await store.get_task(IDC, SN)).task
    assert texts(task) == ["old 1", "old 2", "new"]
    moved = await client.get(schema.task_key(IDC, SN))
    assert moved is not None and Task.from_json(moved.value).logs == ()
    assert len(await chunk_keys(client)) == 1


async def test_batched_progress_writes_put_their_lines_in_chunks(
    store: Store, client: EtcdClient
) -> None:
    """The task writer (batched progress) splits like update_task: a step finishing
    appends its line as a chunk, in the same Txn as the documents."""
    await installing(store, client)
    await installing(store, client, sn="sn-002")
    async with trio.open_nursery() as nursery:
        writer = TaskWriter(store)
        await nursery.start(writer.run)

        async def report(sn: str) -> None:
            for pct in (50, 100):
                await store.record_progress(
                    IDC, sn, step="partitioning", percent=pct, message="", via=writer
                )

        async with trio.open_nursery() as writes:
            for sn in (SN, "sn-002"):
                writes.start_soon(report, sn)
        nursery.cancel_scope.cancel()
    for sn in (SN, "sn-002"):
        task = (await store.get_task(IDC, sn)).task
        assert texts(task)[-1] == "partitioning done (100%)"
        kv = await client.get(schema.task_key(IDC, sn))
        assert kv is not None and Task.from_json(kv.value).logs == ()
        assert len(await chunk_keys(client, sn)) == len(Task.from_json(kv.value).log_chunks)


async def test_one_big_batch_evicting_every_chunk_fits_one_txn(
    store: Store, client: EtcdClient
) -> None:
    """The worst case for a Txn's ops: MAX_LOG_CHUNKS one-line chunks, then a batch of
    MAX_LOG_BYTES that drops them all — their deletes, the chunk and the document commit
    together within etcd's 128 ops."""
    await installing(store, client)
    for i in range(MAX_LOG_CHUNKS):
        await store.append_logs(IDC, SN, [f"single {i}"])
    assert len(await chunk_keys(client)) == MAX_LOG_CHUNKS
    # Each line costs its text + 31 bytes ("<ts> [INFO] ", quotes, comma): 49 lines of
    # 2,000 and one of 302 fill the cap to the byte, leaving no room for any old line.
    big = [f"{i:04d}" + "y" * 1965 for i in range(49)] + ["z" * 271]
    await store.append_logs(IDC, SN, big)
    task = (await store.get_task(IDC, SN)).task
    assert texts(task) == big
    assert len(await chunk_keys(client)) == 1  # 100 deletes, a put and the document
