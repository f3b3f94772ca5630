"""Transactions against a real etcd: every compare target, every op, both branches, limits."""

from __future__ import annotations

import pytest

from lpmosd.errors import EtcdRequestError
from lpmosd.etcd import (
    Compare,
    DeleteResult,
    EtcdClient,
    PutResult,
    RangeResult,
    delete,
    get,
    put,
)

from .helpers import assert_our_error


async def test_compare_value(client: EtcdClient) -> None:
    await client.put("t", "b")
    assert (await client.txn([Compare.value_is("t", "==", "b")])).succeeded
    assert not (await client.txn([Compare.value_is("t", "==", "a")])).succeeded
    assert (await client.txn([Compare.value_is("t", "!=", "a")])).succeeded
    assert (await client.txn([Compare.value_is("t", ">", "a")])).succeeded
    assert (await client.txn([Compare.value_is("t", "<", "c")])).succeeded
    assert not (await client.txn([Compare.value_is("t", "<", "b")])).succeeded


async def test_compare_version_create_mod_revision(client: EtcdClient) -> None:
    # absent key: version 0 and create_revision 0 (the oneof must be sent even when zero)
    assert (await client.txn([Compare.version("t", "==", 0)])).succeeded
    assert (await client.txn([Compare.absent("t")])).succeeded
    r1 = await client.put("t", "1")
    r2 = await client.put("t", "2")
    assert not (await client.txn([Compare.absent("t")])).succeeded
    assert (await client.txn([Compare.version("t", "==", 2)])).succeeded
    assert (await client.txn([Compare.version("t", ">", 1)])).succeeded
    assert not (await client.txn([Compare.version("t", "<", 2)])).succeeded
    assert (await client.txn([Compare.create_revision("t", "==", r1.revision)])).succeeded
    assert not (await client.txn([Compare.create_revision("t", "==", r2.revision)])).succeeded
    assert (await client.txn([Compare.mod_revision("t", "==", r2.revision)])).succeeded
    assert not (await client.txn([Compare.mod_revision("t", "==", r1.revision)])).succeeded
    assert (await client.txn([Compare.mod_revision("t", "!=", r1.revision)])).succeeded
    assert (await client.txn([Compare.mod_revision("t", "<", r2.revision + 1)])).succeeded


async def test_compare_lease(client: EtcdClient) -> None:
    lease = await client.lease_grant(30)
    await client.put("t", "x", lease=lease.id)
    await client.put("u", "y")
    assert (await client.txn([Compare.lease("t", "==", lease.id)])).succeeded
    assert not (await client.txn([Compare.lease("t", "==", 0)])).succeeded
    assert (await client.txn([Compare.lease("u", "==", 0)])).succeeded
    assert (await client.txn([Compare.lease("u", "!=", lease.id)])).succeeded


async def test_several_compares_all_must_hold(client: EtcdClient) -> None:
    await client.put("a", "1")
    await client.put("b", "2")
    ok = [Compare.value_is("a", "==", "1"), Compare.value_is("b", "==", "2")]
    bad = [Compare.value_is("a", "==", "1"), Compare.value_is("b", "==", "3")]
    assert (await client.txn(ok)).succeeded
    assert not (await client.txn(bad)).succeeded


async def test_ops_in_success_branch(client: EtcdClient) -> None:
    await client.put("s/old", "o")
    await client.put("s/gone/1", "g1")
    await client.put("s/gone/2", "g2")
    r = await client.txn(
        [Compare.value_is("s/old", "==", "o")],
        [
            put("s/new", "n"),
            put("s/old", "o2", prev_kv=True),
            delete("s/gone/", prefix=True, prev_kv=True),
            get("s/", prefix=True),
            get("s/", prefix=True, keys_only=True, limit=1),
        ],
        [put("s/failure", "must not happen")],
    )
    assert r.succeeded
    assert len(r.responses) == 5
    p0, p1, d, g, g1 = r.responses
    assert isinstance(p0, PutResult) and p0.prev_kv is None
    assert isinstance(p1, PutResult) and p1.prev_kv is not None and p1.prev_kv.value == b"o"
    assert isinstance(d, DeleteResult) and d.deleted == 2
    assert sorted(kv.value for kv in d.prev_kvs) == [b"g1", b"g2"]
    assert isinstance(g, RangeResult)
    assert [(kv.key, kv.value) for kv in g.kvs] == [(b"s/new", b"n"), (b"s/old", b"o2")]
    assert isinstance(g1, RangeResult)
    assert [kv.key for kv in g1.kvs] == [b"s/new"] and g1.kvs[0].value == b""
    assert g1.more and g1.count == 2
    # one revision for the whole transaction
    kvs = (await client.range("s/", prefix=True)).kvs
    assert {kv.mod_revision for kv in kvs} == {r.revision}
    assert await client.get("s/failure") is None


async def test_ops_in_failure_branch(client: EtcdClient) -> None:
    await client.put("f/k", "v")
    await client.put("f/del", "d")
    r = await client.txn(
        [Compare.value_is("f/k", "==", "other")],
        [put("f/success", "must not happen")],
        [put("f/k", "v2"), delete("f/del"), get("f/", prefix=True)],
    )
    assert not r.succeeded
    assert len(r.responses) == 3
    p, d, g = r.responses
    assert isinstance(p, PutResult)
    assert isinstance(d, DeleteResult) and d.deleted == 1
    assert isinstance(g, RangeResult)
    assert [(kv.key, kv.value) for kv in g.kvs] == [(b"f/k", b"v2")]
    assert await client.get("f/success") is None


async def test_empty_txn_and_no_compares(client: EtcdClient) -> None:
    r = await client.txn()
    assert r.succeeded and r.responses == []
    r = await client.txn([], [put("n", "1")])
    assert r.succeeded
    assert (await client.get("n")) is not None


async def test_128_ops_accepted_129_refused(client: EtcdClient) -> None:
    ops = [put(f"m/{i:03d}", str(i)) for i in range(128)]
    r = await client.txn([], ops)
    assert r.succeeded and len(r.responses) == 128
    assert (await client.range("m/", prefix=True, count_only=True)).count == 128

    for success, failure in (([*ops, put("m/x", "x")], []), ([], [*ops, put("m/x", "x")])):
        with pytest.raises(EtcdRequestError) as info:
            await client.txn([], success, failure)
        assert_our_error(info.value)
        assert "128" in str(info.value)
    assert await client.get("m/x") is None

    # etcd itself refuses too many compares (we do not count them client-side)
    compares = [Compare.version(f"m/{i:03d}", ">", 0) for i in range(129)]
    with pytest.raises(EtcdRequestError) as info:
        await client.txn(compares, [put("m/x", "x")])
    assert_our_error(info.value)
    assert await client.get("m/x") is None


async def test_txn_duplicate_key_refused(client: EtcdClient) -> None:
    with pytest.raises(EtcdRequestError) as info:
        await client.txn([], [put("dup", "1"), put("dup", "2")])
    assert_our_error(info.value)
    assert "duplicate key" in str(info.value)
