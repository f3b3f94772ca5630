"""atomic_update against a real etcd: no lost update under contention, clean refusals."""

from __future__ import annotations

import json

import pytest
import trio

from lpmosd import metrics
from lpmosd.errors import ContentionError, EtcdUnavailableError
from lpmosd.etcd import EtcdClient, KeyValue, UpdateResult, Write, open_client, put
from lpmosd.etcd_process import EtcdProcess

from .helpers import ProxyFactory, assert_our_error


def _append(item: str):  # type: ignore[no-untyped-def]
    def fn(kv: KeyValue | None) -> bytes:
        items = json.loads(kv.value) if kv else []
        items.append(item)
        return json.dumps(items).encode()

    return fn


async def test_16_writers_append_without_lost_update(etcd: EtcdProcess, client: EtcdClient) -> None:
    writers, per_writer = 16, 25
    retries_before = metrics.CAS_RETRIES._value.get()

    async def writer(c: EtcdClient, w: int) -> None:
        for i in range(per_writer):
            await c.atomic_update("list", _append(f"{w}:{i}"), max_attempts=1000)

    # Two clients (two HTTP/2 connections) so the race is real, not serialised on one stream.
    async with open_client(etcd.endpoints) as other, trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, client if w % 2 else other, w)

    kv = await client.get("list")
    assert kv is not None
    items = json.loads(kv.value)
    assert len(items) == writers * per_writer
    assert sorted(items) == sorted(f"{w}:{i}" for w in range(writers) for i in range(per_writer))
    # each writer's own appends stay in its order
    for w in range(writers):
        mine = [x for x in items if x.startswith(f"{w}:")]
        assert mine == [f"{w}:{i}" for i in range(per_writer)]
    assert kv.version == writers * per_writer
    # there was contention, and it was counted
    assert metrics.CAS_RETRIES._value.get() > retries_before


async def test_create_when_absent_and_result(client: EtcdClient) -> None:
    r = await client.atomic_update("new", lambda kv: b"first" if kv is None else b"wrong")
    assert r.changed and r.value == b"first" and r.attempts == 1
    kv = await client.get("new")
    assert kv is not None and kv.value == b"first" and kv.mod_revision == r.revision
    r = await client.atomic_update("new", lambda kv: (kv.value if kv else b"") + b"+second")
    assert r.changed and r.value == b"first+second"


async def test_none_writes_nothing(client: EtcdClient) -> None:
    r0 = await client.put("k", "v")
    r = await client.atomic_update("k", lambda kv: None)
    assert not r.changed and r.value == b"v" and r.revision == r0.revision
    r = await client.atomic_update("absent", lambda kv: None)
    assert not r.changed and r.value is None
    assert await client.get("absent") is None
    kv = await client.get("k")
    assert kv is not None and kv.mod_revision == r0.revision
    assert (await client.status()).revision == r0.revision


async def test_fn_raising_writes_nothing(client: EtcdClient) -> None:
    r0 = await client.put("k", "v")

    def boom(kv: KeyValue | None) -> bytes:
        raise ValueError("refused by fn")

    with pytest.raises(ValueError, match="refused by fn"):
        await client.atomic_update("k", boom)
    with pytest.raises(ValueError, match="refused by fn"):
        await client.atomic_update("absent", boom)
    assert (await client.status()).revision == r0.revision


async def test_contention_error_with_tiny_bound(client: EtcdClient, client2: EtcdClient) -> None:
    await client.put("hot", "0")
    stop = trio.Event()

    async def hammer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await client2.put("hot", str(n))

    async def slow_fn_loser() -> None:
        # fn yields nothing itself, but the hammer writes between our read and our Txn
        # often enough that 2 attempts cannot all win: repeat until one loses twice.
        for _ in range(200):
            try:
                await client.atomic_update(
                    "hot", lambda kv: (kv.value if kv else b"") + b"!", max_attempts=1
                )
            except ContentionError as exc:
                assert_our_error(exc)
                assert exc.attempts == 1 and exc.key == "hot"
                return
        raise AssertionError("never lost a race against a busy writer")

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hammer)
        await slow_fn_loser()
        stop.set()


async def test_contention_error_deterministic(client: EtcdClient, client2: EtcdClient) -> None:
    """A stale ``current=`` hint and max_attempts=1: the only CAS loses, ContentionError."""
    await client.put("k", "0")
    stale = await client.get("k")
    assert stale is not None
    await client2.put("k", "moved")
    with pytest.raises(ContentionError) as info:
        await client.atomic_update("k", lambda kv: b"mine", current=stale, max_attempts=1)
    assert_our_error(info.value)
    assert info.value.attempts == 1
    kv = await client.get("k")
    assert kv is not None and kv.value == b"moved"


async def test_stale_current_hint_still_correct(client: EtcdClient) -> None:
    await client.put("c", json.dumps([1]))
    stale = await client.get("c")
    assert stale is not None
    await client.put("c", json.dumps([1, 2]))
    seen: list[bytes | None] = []

    def fn(kv: KeyValue | None) -> bytes:
        seen.append(kv.value if kv else None)
        return _append("3")(kv)  # type: ignore[no-any-return]

    r = await client.atomic_update("c", fn, current=stale)
    assert r.changed and r.attempts == 2
    assert seen == [b"[1]", b"[1, 2]"]
    kv = await client.get("c")
    assert kv is not None and json.loads(kv.value) == [1, 2, "3"]

    # a hint that the key is absent when it exists: also just a retry
    r = await client.atomic_update("c", lambda kv: b"x" if kv is None else b"y", known_absent=True)
    assert r.changed and r.value == b"y" and r.attempts == 2

    # a hint for a key that was deleted since
    hint = await client.get("c")
    await client.delete("c")
    r = await client.atomic_update("c", lambda kv: b"fresh" if kv is None else b"old", current=hint)
    assert r.value == b"fresh"


async def test_write_also_runs_in_same_txn_and_keeps_lease(client: EtcdClient) -> None:
    lease = await client.lease_grant(30)
    await client.put("doc", "1", lease=lease.id)
    r = await client.atomic_update("doc", lambda kv: Write(b"2", also=[put("index/doc", "2")]))
    assert r.changed
    doc, idx = await client.get("doc"), await client.get("index/doc")
    assert doc is not None and idx is not None
    assert doc.mod_revision == idx.mod_revision == r.revision
    assert doc.lease == lease.id  # the update does not detach the key from its lease


@pytest.mark.parametrize("exists", [True, False], ids=["update", "create"])
async def test_ambiguous_outcome_settled_by_rereading(
    etcd: EtcdProcess, client2: EtcdClient, proxy_factory: ProxyFactory, exists: bool
) -> None:
    """The CAS reaches etcd but its answer is lost: atomic_update re-reads and sees its
    own write instead of appending twice; a plain put raises instead of retrying."""
    proxy = await proxy_factory(etcd.client_port)
    if exists:
        await client2.put("amb", json.dumps(["a"]))
    async with open_client([proxy.endpoint]) as c, trio.open_nursery() as nursery:
        await c.get("amb")  # connected
        result: list[object] = []

        hint = await client2.get("amb")  # so the first thing sent is the Txn itself

        async def update() -> None:
            r = await c.atomic_update("amb", _append("b"), current=hint, known_absent=not exists)
            result.append(r)

        proxy.hold_responses()
        nursery.start_soon(update)
        with trio.fail_after(5):  # the Txn is applied...
            while (kv := await client2.get("amb")) is None or b'"b"' not in kv.value:  # noqa: ASYNC110
                await trio.sleep(0.01)
        proxy.cut()  # ...and its answer lost with the connection
        proxy.heal()
    (r,) = result
    assert isinstance(r, UpdateResult) and r.changed
    kv = await client2.get("amb")
    assert kv is not None
    assert json.loads(kv.value) == (["a", "b"] if exists else ["b"])
    assert r.revision == kv.mod_revision

    # A plain put in the same situation is not retried blindly: the caller is told.
    async with open_client([proxy.endpoint]) as c:
        await c.get("amb")
        proxy.hold_responses()
        failures: list[BaseException] = []

        async def put_once() -> None:
            try:
                await c.put("amb/put", "once")
            except EtcdUnavailableError as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(put_once)
                while await client2.get("amb/put") is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                proxy.cut()
                proxy.heal()
        assert len(failures) == 1
        assert_our_error(failures[0])
    kv = await client2.get("amb/put")
    assert kv is not None and kv.version == 1


async def test_local_writers_take_turns_without_conflicts(client: EtcdClient) -> None:
    """16 writers on one client and key: no failed CAS at all, each starts where the last
    left off (no extra read either), and no per-key state is left behind."""
    retries_before = metrics.CAS_RETRIES._value.get()
    attempts: list[int] = []

    async def writer(w: int) -> None:
        for i in range(10):
            r = await client.atomic_update("turns", _append(f"{w}:{i}"))
            attempts.append(r.attempts)

    async with trio.open_nursery() as nursery:
        for w in range(16):
            nursery.start_soon(writer, w)
    kv = await client.get("turns")
    assert kv is not None and len(json.loads(kv.value)) == 160
    assert set(attempts) == {1}
    assert metrics.CAS_RETRIES._value.get() == retries_before
    assert client._update_gates == {}


async def test_turn_taking_noop_decides_on_fresh_read(
    client: EtcdClient, client2: EtcdClient
) -> None:
    """A waiter handed the previous updater's view, whose fn declines to write, decides on
    a fresh read instead (another process may have written in between)."""
    from lpmosd.etcd.client import _UpdateGate

    await client.put("noop", "0")
    handed_on = await client.get("noop")
    await client2.put("noop", "other")  # another process writes after that view
    gate = _UpdateGate()
    gate.users, gate.kv, gate.known = 1, handed_on, True  # as a previous updater leaves it
    client._update_gates[b"noop"] = gate
    seen: list[bytes | None] = []

    def decide(kv: KeyValue | None) -> bytes | None:
        seen.append(kv.value if kv else None)
        return None

    r = await client.atomic_update("noop", decide)
    assert seen == [b"0", b"other"]
    assert not r.changed and r.value == b"other"
    del client._update_gates[b"noop"]
