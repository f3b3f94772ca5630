"""PrefixView: relist + watch, and compaction turning vanished keys into deletions."""

from __future__ import annotations

import pytest
import trio
from provisioning_kit import open_proxy, wait_for

from lpmosd.etcd import EtcdClient, KeyValue, open_client, put
from lpmosd.etcd_process import EtcdProcess
from lpmosd.view import RELIST_SLICE, Change, PrefixView

PREFIX = "/os/dc1/machines/"


def record(view: PrefixView) -> list[Change]:
    changes: list[Change] = []
    view.listeners.append(changes.append)
    return changes


async def test_view_lists_then_follows_the_watch(client: EtcdClient) -> None:
    await client.put(PREFIX + "a/task", "1")
    await client.put("/os/dc2/machines/x/task", "other idc")
    view = PrefixView(client, PREFIX)
    changes = record(view)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        assert set(view.items) == {PREFIX + "a/task"}
        assert [(c.key, c.relisted) for c in changes] == [(PREFIX + "a/task", True)]
        await client.put(PREFIX + "b/task", "2")
        await client.delete(PREFIX + "a/task")
        await wait_for(lambda: PREFIX + "a/task" not in view.items, what="delete applied")
        assert set(view.items) == {PREFIX + "b/task"}
        live = [(c.key, c.kv is None, c.relisted) for c in changes[1:]]
        assert live == [(PREFIX + "b/task", False, False), (PREFIX + "a/task", True, False)]
        deleted = changes[-1]
        assert deleted.prev is not None and deleted.prev.value == b"1"
        nursery.cancel_scope.cancel()


async def test_relist_after_compaction_turns_vanished_keys_into_deletions(
    private_etcd: EtcdProcess,
) -> None:
    """Partition the view's client while keys change and history is compacted: on
    reconnect the watch cannot resume, the view relists, and every change it missed —
    above all the deletes — reaches listeners as an explicit change."""
    async with (
        open_client(private_etcd.endpoints) as writer,
        open_proxy(private_etcd.client_port) as proxy,
        open_client([proxy.endpoint], request_timeout=2) as cut_off,
    ):
        for name in ("gone", "changed", "same"):
            await writer.put(PREFIX + f"{name}/lease", f"v1-{name}")
        view = PrefixView(cut_off, PREFIX)
        changes = record(view)
        async with trio.open_nursery() as nursery:
            await nursery.start(view.run)
            assert view.relists == 1
            same_kv = view.get(PREFIX + "same/lease")
            changes.clear()

            proxy.cut()
            await writer.delete(PREFIX + "gone/lease")
            await writer.put(PREFIX + "changed/lease", "v2")
            await writer.put(PREFIX + "new/lease", "v1-new")
            await writer.put(PREFIX + "brief/lease", "here and gone")
            r = await writer.delete(PREFIX + "brief/lease")
            await writer.compact(r.revision)
            proxy.heal()

            await wait_for(lambda: view.relists == 2, timeout=15, what="relist")
            by_key = {c.key: c for c in changes}
            assert set(by_key) == {
                PREFIX + "gone/lease",
                PREFIX + "changed/lease",
                PREFIX + "new/lease",
            }, "unchanged keys must not be re-emitted; a key born and gone unseen is no change"
            assert all(c.relisted for c in changes)
            gone = by_key[PREFIX + "gone/lease"]
            assert gone.kv is None and gone.prev is not None and gone.prev.value == b"v1-gone"
            changed = by_key[PREFIX + "changed/lease"]
            assert changed.kv is not None and changed.kv.value == b"v2"
            assert changed.prev is not None and changed.prev.value == b"v1-changed"
            assert view.get(PREFIX + "same/lease") == same_kv
            assert set(view.items) == {
                PREFIX + "changed/lease",
                PREFIX + "new/lease",
                PREFIX + "same/lease",
            }
            assert view.revision >= r.revision

            # And the watch carries on from the relist.
            await writer.delete(PREFIX + "new/lease")
            await wait_for(lambda: PREFIX + "new/lease" not in view.items, what="live delete")
            assert changes[-1].key == PREFIX + "new/lease" and not changes[-1].relisted
            nursery.cancel_scope.cancel()


async def test_relist_diffs_against_the_cached_items(client: EtcdClient) -> None:
    """Driven directly: a key cached but absent from etcd comes out as a deletion."""
    await client.put(PREFIX + "kept/task", "k")
    stale = KeyValue((PREFIX + "vanished/lease").encode(), b"lease-1", 2, 2, 1, 0)
    view = PrefixView(client, PREFIX)
    view.items[PREFIX + "vanished/lease"] = stale
    changes = record(view)
    await view._relist()
    assert [(c.key, c.kv is None, c.prev) for c in changes if c.kv is None] == [
        (PREFIX + "vanished/lease", True, stale)
    ]
    assert set(view.items) == {PREFIX + "kept/task"}


async def test_own_writes_are_not_undone_by_a_lagging_watch(client: EtcdClient) -> None:
    view = PrefixView(client, PREFIX)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        await client.put(PREFIX + "a/task", "old")
        r = await client.put(PREFIX + "a/task", "new")
        mine = KeyValue((PREFIX + "a/task").encode(), b"new", r.revision - 1, r.revision, 2, 0)
        view.observe(mine)
        # Whatever order the watch delivers the two puts in, the view ends on "new".
        await wait_for(lambda: view.revision >= r.revision, what="watch caught up")
        kv = view.get(PREFIX + "a/task")
        assert kv is not None and kv.value == b"new"
        nursery.cancel_scope.cancel()


async def test_a_late_observe_does_not_bring_back_a_deleted_key(client: EtcdClient) -> None:
    """Our write's answer can arrive after the watch has applied a later delete of the key:
    observing it then must not put the deleted key back (review finding, issue 15)."""
    view = PrefixView(client, PREFIX)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        w = await client.put(PREFIX + "a/lease", "lease-1")
        mine = KeyValue((PREFIX + "a/lease").encode(), b"lease-1", w.revision, w.revision, 1, 0)
        d = await client.delete(PREFIX + "a/lease")
        await wait_for(lambda: view.revision >= d.revision, what="watch applied the delete")
        view.observe(mine)
        assert view.get(PREFIX + "a/lease") is None
        # A write newer than anything the watch has seen is still taken at once.
        w2 = await client.put(PREFIX + "a/lease", "lease-2")
        newer = KeyValue((PREFIX + "a/lease").encode(), b"lease-2", w2.revision, w2.revision, 1, 0)
        view.observe(newer)
        assert view.get(PREFIX + "a/lease") == newer
        nursery.cancel_scope.cancel()


async def test_listener_errors_do_not_stop_the_view(
    client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    view = PrefixView(client, PREFIX)

    def broken(change: Change) -> None:
        raise RuntimeError("listener bug")

    view.listeners.append(broken)
    seen = record(view)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        await client.put(PREFIX + "a/task", "1")
        await client.put(PREFIX + "b/task", "2")
        await wait_for(lambda: len(seen) == 2, what="both changes")
        nursery.cancel_scope.cancel()
    assert "view listener failed" in caplog.text


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""


async def test_a_big_relist_lets_other_tasks_run(client: EtcdClient) -> None:
    """Listeners decode what a relist tells them: with many keys that is seconds of work,
    so the relist yields every RELIST_SLICE keys (a session's keepalive must get through)."""
    count = 8 * RELIST_SLICE
    for start in range(0, count, 128):
        await client.txn(
            [], [put(f"/big/{i:05d}", "v") for i in range(start, min(count, start + 128))]
        )
    view = PrefixView(client, "/big/")
    told = 0
    told_at_tick = 0
    longest = 0

    def listener(change: Change) -> None:
        nonlocal told, longest
        told += 1
        longest = max(longest, told - told_at_tick)

    view.listeners.append(listener)

    async def ticker() -> None:
        nonlocal told_at_tick
        while not view.synced.is_set():
            told_at_tick = told
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await nursery.start(view.run)
        nursery.cancel_scope.cancel()
    assert told == count
    # Trio may run the ticker before the relist in one batch and after it in the next:
    # two slices at most between two of its turns (all of them, without the yields).
    assert longest <= 2 * RELIST_SLICE, f"{longest} changes told without a yield"
