"""Watches against a real etcd: open/cancel soak, resume across outages, compaction."""

from __future__ import annotations

import asyncio
import random

import pytest
import trio

from lpmosd import metrics
from lpmosd.errors import CompactedError, EtcdError
from lpmosd.etcd import EtcdClient, EventType, WatchBatch, WatchEvent, open_client, watch
from lpmosd.etcd_process import EtcdProcess

from .helpers import ProxyFactory, assert_our_error, pending_asyncio_tasks, settle_asyncio

Loop = asyncio.AbstractEventLoop


# --- helpers -----------------------------------------------------------------------------


class Collector:
    """Runs a watch in the background and records every event and batch revision."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.batches: list[WatchBatch] = []
        self.error: BaseException | None = None
        self._changed = trio.Event()

    async def run(
        self,
        client: EtcdClient,
        prefix: str,
        start_revision: int = 0,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with watch(client, prefix, start_revision=start_revision) as stream:
                task_status.started()
                async for batch in stream:
                    self.batches.append(batch)
                    self.events.extend(batch.events)
                    self._changed.set()
                    self._changed = trio.Event()
        except EtcdError as exc:
            self.error = exc
            self._changed.set()

    async def wait_for(self, n_events: int, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while len(self.events) < n_events and self.error is None:
                await self._changed.wait()

    async def wait_error(self, timeout: float = 10) -> BaseException:
        with trio.fail_after(timeout):
            while self.error is None:
                await self._changed.wait()
        return self.error

    def revisions(self) -> list[int]:
        return [e.kv.mod_revision for e in self.events]


def assert_exactly_once_in_order(
    events: list[WatchEvent], expected: list[tuple[bytes, int]]
) -> None:
    got = [(e.kv.key, e.kv.mod_revision) for e in events]
    assert len(got) == len(set(got)), "duplicate events"
    assert got == expected


# --- basics ------------------------------------------------------------------------------


async def test_watch_from_now_sees_puts_and_deletes(client: EtcdClient) -> None:
    await client.put("w/before", "ignored")
    async with watch(client, "w/") as stream:
        first = await stream.__anext__()
        assert first.events == []  # "created": where the watch starts
        start = first.revision
        r1 = await client.put("w/a", "1")
        await client.put("other", "not watched")
        r2 = await client.delete("w/before")
        got: list[WatchEvent] = []
        while len(got) < 2:
            got.extend((await stream.__anext__()).events)
    assert start == r1.revision - 1
    assert [(e.type, e.kv.key, e.kv.mod_revision) for e in got] == [
        (EventType.PUT, b"w/a", r1.revision),
        (EventType.DELETE, b"w/before", r2.revision),
    ]
    assert got[0].kv.value == b"1"
    assert stream.revision == r2.revision


async def test_watch_single_key_and_prev_kv(client: EtcdClient) -> None:
    await client.put("k", "old")
    async with watch(client, "k", prefix=False, prev_kv=True) as stream:
        await client.put("k2", "same prefix, other key")
        await client.put("k", "new")
        batch = await stream.__anext__()
        if not batch.events:
            batch = await stream.__anext__()
    assert [e.kv.key for e in batch.events] == [b"k"]
    prev = batch.events[0].prev_kv
    assert prev is not None and prev.value == b"old"


async def test_watch_from_start_revision_replays_history(client: EtcdClient) -> None:
    revs = [(await client.put(f"h/{i}", str(i))).revision for i in range(5)]
    c = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run, client, "h/", revs[1])
        await c.wait_for(4)
        r = await client.put("h/new", "x")
        await c.wait_for(5)
        nursery.cancel_scope.cancel()
    assert_exactly_once_in_order(
        c.events,
        [(f"h/{i}".encode(), revs[i]) for i in range(1, 5)] + [(b"h/new", r.revision)],
    )


async def test_watch_from_revision_1_replays_all_history(private_etcd: EtcdProcess) -> None:
    async with open_client(private_etcd.endpoints) as c:
        expected = [
            (f"all/{i}".encode(), (await c.put(f"all/{i}", "v")).revision) for i in range(3)
        ]
        assert expected[0][1] == 2  # a fresh etcd starts at revision 1
        async with watch(c, "all/", start_revision=1) as stream:
            got: list[WatchEvent] = []
            with trio.fail_after(5):
                while len(got) < 3:
                    got.extend((await stream.__anext__()).events)
    assert_exactly_once_in_order(got, expected)


async def test_txn_events_arrive_in_one_batch(client: EtcdClient) -> None:
    from lpmosd.etcd import put

    c = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run, client, "t/")
        r = await client.txn([], [put(f"t/{i}", str(i)) for i in range(10)])
        await c.wait_for(10)
        nursery.cancel_scope.cancel()
    batches = [b for b in c.batches if b.events]
    assert len(batches) == 1 and batches[0].revision == r.revision
    assert {e.kv.mod_revision for e in c.events} == {r.revision}


async def test_watch_compacted_start_revision_raises(private_etcd: EtcdProcess) -> None:
    async with open_client(private_etcd.endpoints) as c:
        r1 = await c.put("z/a", "1")
        await c.put("z/a", "2")
        r3 = await c.put("z/a", "3")
        await c.compact(r3.revision)
        async with watch(c, "z/", start_revision=r1.revision) as stream:
            with pytest.raises(CompactedError) as info:
                await stream.__anext__()
        assert_our_error(info.value)
        assert info.value.compact_revision == r3.revision
        # relist and watch from the read's revision + 1: no error, no gap
        listing = await c.get_prefix("z/")
        async with watch(c, "z/", start_revision=listing.revision + 1) as stream:
            r4 = await c.put("z/a", "4")
            batch = await stream.__anext__()
        assert [e.kv.mod_revision for e in batch.events] == [r4.revision]


# --- open/cancel soak --------------------------------------------------------------------


async def _open_cancel_cycles(client: EtcdClient, loop: Loop, cycles: int) -> None:
    rng = random.Random(1234)
    baseline = pending_asyncio_tasks(loop)
    for i in range(cycles):
        mode = i % 4
        if mode == 0:  # open, then leave at once
            async with watch(client, "soak/"):
                pass
        elif mode == 1:  # receive the creation batch, then leave
            async with watch(client, "soak/") as stream:
                await stream.__anext__()
        elif mode == 2:  # leave with events in flight
            async with watch(client, "soak/", start_revision=1) as stream:
                await client.put("soak/k", str(i))
        else:  # cancelled from outside at a random point, maybe before creation
            with trio.move_on_after(rng.uniform(0, 0.002)):
                async with watch(client, "soak/") as stream:
                    await stream.__anext__()
                    await trio.sleep_forever()
    leaked = await settle_asyncio(loop, baseline)
    assert not leaked, f"leaked asyncio tasks: {leaked}"


async def test_watch_open_cancel_cycles(client: EtcdClient, aio_loop: Loop) -> None:
    with trio.fail_after(60):
        await _open_cancel_cycles(client, aio_loop, 2000)
    # the client is still fine
    async with watch(client, "soak/") as stream:
        r = await client.put("soak/after", "x")
        batch = await stream.__anext__()
        if not batch.events:
            batch = await stream.__anext__()
    assert batch.events[0].kv.mod_revision == r.revision


@pytest.mark.slow
async def test_watch_open_cancel_cycles_20000(client: EtcdClient, aio_loop: Loop) -> None:
    with trio.fail_after(600):
        await _open_cancel_cycles(client, aio_loop, 20000)


# --- resume after outages ----------------------------------------------------------------


async def _put_many(c: EtcdClient, prefix: str, n: int) -> list[tuple[bytes, int]]:
    out = []
    for i in range(n):
        key = f"{prefix}{i:03d}"
        out.append((key.encode(), (await c.put(key, str(i))).revision))
    return out


async def test_watch_resumes_across_etcd_restart(private_etcd: EtcdProcess) -> None:
    """etcd stops for a second under a live watch; every event arrives once, in order."""
    async with (
        open_client(private_etcd.endpoints) as watcher_client,
        open_client(private_etcd.endpoints) as writer,
        trio.open_nursery() as nursery,
    ):
        c = Collector()
        reconnects = metrics.WATCH_RECONNECTS._value.get()
        await nursery.start(c.run, watcher_client, "r/")
        expected = await _put_many(writer, "r/a", 10)
        await c.wait_for(10)
        await private_etcd.arestart(downtime=1.0)
        # written right after the restart, most likely before the watcher is back
        expected += await _put_many(writer, "r/b", 10)
        await c.wait_for(20)
        expected += await _put_many(writer, "r/c", 5)
        await c.wait_for(25)
        nursery.cancel_scope.cancel()
    assert c.error is None
    assert_exactly_once_in_order(c.events, expected)
    assert metrics.WATCH_RECONNECTS._value.get() > reconnects


@pytest.mark.parametrize("outage", ["partition", "etcd_restart"])
async def test_watch_resumes_with_writes_during_outage(
    private_etcd: EtcdProcess, proxy_factory: ProxyFactory, outage: str
) -> None:
    """The watcher is cut off (through a proxy) while others write; all events, once, in order.

    With ``etcd_restart`` etcd is also killed and restarted during the cut, so the watch
    resumes against a new etcd process from its stored history.
    """
    proxy = await proxy_factory(private_etcd.client_port)
    async with (
        open_client([proxy.endpoint]) as watcher_client,
        open_client(private_etcd.endpoints) as writer,
        trio.open_nursery() as nursery,
    ):
        c = Collector()
        await nursery.start(c.run, watcher_client, "o/")
        expected = await _put_many(writer, "o/a", 10)
        await c.wait_for(10)
        proxy.cut()
        if outage == "etcd_restart":
            await private_etcd.akill()
            await private_etcd.astart()
            await writer.status()  # reconnect the writer
        expected += await _put_many(writer, "o/b", 20)  # the watcher cannot see these yet
        await trio.sleep(0.2)
        assert len(c.events) == 10
        proxy.heal()
        await c.wait_for(30)
        expected += await _put_many(writer, "o/c", 5)
        await c.wait_for(35)
        nursery.cancel_scope.cancel()
    assert c.error is None
    assert_exactly_once_in_order(c.events, expected)
    assert proxy.connections >= 2  # it really reconnected
    revs = [b.revision for b in c.batches]
    assert revs == sorted(revs)


async def test_resume_from_stream_revision_does_not_duplicate(client: EtcdClient) -> None:
    """A caller that re-watches from ``stream.revision + 1`` sees nothing twice."""
    expected = await _put_many(client, "x/", 5)
    seen: list[WatchEvent] = []
    rev = expected[0][1]
    for round_ in range(3):
        async with watch(client, "x/", start_revision=rev) as stream:
            if round_ == 1:
                expected += await _put_many(client, "x/more", 3)
            while not seen or seen[-1].kv.mod_revision < expected[-1][1]:
                seen.extend((await stream.__anext__()).events)
            rev = stream.revision + 1
    assert_exactly_once_in_order(seen, expected)


async def test_replayed_events_are_dropped(client: EtcdClient) -> None:
    """Responses that repeat already-delivered revisions (replays) are filtered out."""
    from lpmosd.etcd._pb import etcdserverpb as pb
    from lpmosd.etcd._pb import mvccpb
    from lpmosd.etcd.watch import _Watcher

    send, receive = trio.open_memory_channel[WatchBatch | EtcdError](100)
    w = _Watcher(client, b"k/", b"k0", 5, False, send)

    def resp(*revs: int) -> pb.WatchResponse:
        return pb.WatchResponse(
            header=pb.ResponseHeader(revision=max(revs)),
            events=[
                mvccpb.Event(kv=mvccpb.KeyValue(key=b"k/%d" % r, mod_revision=r)) for r in revs
            ],
        )

    for r in (resp(5, 6), resp(6, 7), resp(5), resp(7, 8), resp(8)):
        assert not await w._handle(r)
    send.close()
    got = []
    async for batch in receive:
        assert isinstance(batch, WatchBatch)
        got.append([e.kv.mod_revision for e in batch.events])
    assert got == [[5, 6], [7], [8]]


async def test_compaction_during_disconnected_watch(
    private_etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """Cut off, the watcher misses history that is then compacted: CompactedError, relist.

    Deterministic: the proxy keeps the watcher away until the compaction is done.
    """
    proxy = await proxy_factory(private_etcd.client_port)
    async with (
        open_client([proxy.endpoint]) as watcher_client,
        open_client(private_etcd.endpoints) as writer,
    ):
        await _put_many(writer, "cw/a", 3)
        async with watch(watcher_client, "cw/") as stream:
            first = await _put_many(writer, "cw/b", 3)
            got: list[WatchEvent] = []
            while len(got) < 3:
                got.extend((await stream.__anext__()).events)
            assert [(e.kv.key, e.kv.mod_revision) for e in got] == first
            proxy.cut()
            await private_etcd.akill()  # and etcd crashes too, for good measure
            await private_etcd.astart()
            missed = await _put_many(writer, "cw/c", 3)
            await writer.compact(missed[-1][1])
            proxy.heal()
            with trio.fail_after(10), pytest.raises(CompactedError) as info:
                async for _ in stream:
                    pass
        assert_our_error(info.value)
        assert info.value.compact_revision == missed[-1][1]

        # the relist the error asks for: range, then watch from its revision + 1
        listing = await watcher_client.get_prefix("cw/")
        assert len(listing.kvs) == 9
        async with watch(watcher_client, "cw/", start_revision=listing.revision + 1) as stream:
            r = await writer.put("cw/d", "x")
            batch = await stream.__anext__()
        assert [e.kv.mod_revision for e in batch.events] == [r.revision]


async def test_slow_consumer_reopens_without_loss(client: EtcdClient) -> None:
    """A consumer that falls behind the stream's buffer costs a re-watch, not events."""
    async with watch(client, "slow/", buffer=1) as stream:
        expected: list[tuple[bytes, int]] = []

        async def writer(w: int) -> None:
            for i in range(25):
                key = f"slow/{w:02d}/{i:02d}"
                expected.append((key.encode(), (await client.put(key, "v")).revision))

        # 64 × 25 = 1,600 single-event responses: more than the stream buffers (1,024)
        async with trio.open_nursery() as nursery:
            for w in range(64):
                nursery.start_soon(writer, w)
        expected.sort(key=lambda kr: kr[1])
        seen: list[WatchEvent] = []
        with trio.fail_after(20):
            async for batch in stream:
                seen.extend(batch.events)
                if seen and seen[-1].kv.mod_revision >= expected[-1][1]:
                    break
    assert_exactly_once_in_order(seen, expected)
