"""The compactor (Kubernetes API server's scheme), and watchers under frequent compaction."""

from __future__ import annotations

import random
from functools import partial

import pytest
import trio
from provisioning_kit import open_proxy, wait_for

from lpmosd.compaction import COMPACT_KEY, Compactor
from lpmosd.errors import CompactedError
from lpmosd.etcd import KeyValue, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.view import Change, PrefixView

PREFIX = "/os/dc1/machines/"


async def test_compacts_to_the_revision_seen_one_round_earlier(private_etcd: EtcdProcess) -> None:
    async with open_client(private_etcd.endpoints) as client:
        compactor = Compactor(client, interval=300)
        first = await client.put("/k", "1")
        assert await compactor.run_round() is None  # nothing seen before the first round
        seen = (await client.get(COMPACT_KEY)).mod_revision  # type: ignore[union-attr]
        second = await client.put("/k", "2")
        target = await compactor.run_round()
        assert target is not None and first.revision < target < second.revision
        assert target == seen
        with pytest.raises(CompactedError):
            await client.get("/k", revision=first.revision)
        kv = await client.get("/k", revision=target)
        assert kv is not None and kv.value == b"1"  # the last interval's history is kept
        assert compactor.compactions == 1 and compactor.compacted_revision == target


async def test_several_instances_compact_once_per_round(private_etcd: EtcdProcess) -> None:
    """Two control planes' compactors: the version guard lets one of them win each round."""
    async with open_client(private_etcd.endpoints) as client:
        a, b = Compactor(client, interval=300), Compactor(client, interval=300)
        for n in range(6):
            await client.put("/k", str(n))
            await a.run_round()
            await b.run_round()
        # a claimed every round (b lost each one, learning the version too late), and
        # compacted from its second round on.
        assert a.compactions == 5 and b.compactions == 0
        version = (await client.get(COMPACT_KEY)).version  # type: ignore[union-attr]
        assert version == a.rounds


async def test_watchers_lose_no_event_with_compaction_every_second(
    private_etcd: EtcdProcess,
) -> None:
    """Writes and deletes go on while history is compacted every second, and one watcher
    is cut off long enough for its resume revision to be compacted: each view ends equal
    to a Range, and every key a view saw and etcd no longer has reached it as a deletion.
    """
    async with (
        open_client(private_etcd.endpoints) as writer,
        open_proxy(private_etcd.client_port) as proxy,
        open_client([proxy.endpoint], request_timeout=3) as lagging,
        trio.open_nursery() as nursery,
    ):
        compactor = Compactor(writer, interval=1)
        views = [PrefixView(writer, PREFIX), PrefixView(lagging, PREFIX)]
        last: list[dict[str, Change]] = [{}, {}]
        for view, changes in zip(views, last, strict=True):
            view.listeners.append(partial(_remember, changes))
            await nursery.start(view.run)
        await nursery.start(compactor.run)
        rng = random.Random(15)
        keys = [PREFIX + f"sn-{i:03d}/lease" for i in range(100)]
        stop = trio.Event()

        async def write() -> None:
            n = 0
            while not stop.is_set():
                key = rng.choice(keys)
                if rng.random() < 0.4:
                    await writer.delete(key)
                else:
                    await writer.put(key, f"v{n}")
                n += 1

        nursery.start_soon(write)
        await wait_for(lambda: compactor.compactions >= 1, timeout=10, what="a compaction")
        proxy.cut()  # the lagging view hears nothing while history moves on
        frozen_at = compactor.compactions
        await wait_for(lambda: compactor.compactions >= frozen_at + 2, timeout=10, what="2 more")
        proxy.heal()
        await wait_for(lambda: views[1].relists >= 2, timeout=15, what="the lagging view relists")
        await wait_for(lambda: compactor.compactions >= frozen_at + 3, timeout=10, what="one more")
        stop.set()
        final = await writer.get_prefix(PREFIX)
        for view in views:
            await wait_for(lambda v=view: v.revision >= final.revision, what="views caught up")
        want = {kv.key.decode(): kv for kv in final.kvs}
        for view, changes in zip(views, last, strict=True):
            assert _plain(view.items) == _plain(want)
            for key, change in changes.items():
                if key not in want:
                    assert change.kv is None, f"{key}: its delete never reached the view"
        nursery.cancel_scope.cancel()


def _remember(changes: dict[str, Change], change: Change) -> None:
    changes[change.key] = change


def _plain(items: dict[str, KeyValue]) -> dict[str, tuple[bytes, int]]:
    return {k: (kv.value, kv.mod_revision) for k, kv in items.items()}


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
