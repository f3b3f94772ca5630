"""KV against a real etcd: range/get/put/delete/compact, and request errors in our tree."""

from __future__ import annotations

import pytest

from lpmosd.errors import CompactedError, EtcdRequestError
from lpmosd.etcd import EtcdClient, KeyValue, open_client, prefix_end
from lpmosd.etcd_process import EtcdProcess

from .helpers import assert_our_error


async def test_put_get_roundtrip(client: EtcdClient) -> None:
    r = await client.put("a/1", "one")
    assert r.revision > 0
    assert r.prev_kv is None
    kv = await client.get("a/1")
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == (b"a/1", b"one", 1, 0)
    assert kv.create_revision == kv.mod_revision == r.revision
    assert await client.get("a/absent") is None
    # bytes keys and values, including non-UTF-8
    await client.put(b"bin/\xff\x00", b"\x00\x01\xfe")
    kv = await client.get(b"bin/\xff\x00")
    assert kv is not None and kv.value == b"\x00\x01\xfe"


async def test_put_prev_kv_and_versions(client: EtcdClient) -> None:
    first = await client.put("k", "v1")
    second = await client.put("k", "v2", prev_kv=True)
    assert second.prev_kv is not None
    assert second.prev_kv.value == b"v1"
    assert second.prev_kv.mod_revision == first.revision
    third = await client.put("k", "v3")  # no prev_kv unless asked
    assert third.prev_kv is None
    kv = await client.get("k")
    assert kv is not None
    assert (kv.value, kv.version, kv.create_revision, kv.mod_revision) == (
        b"v3",
        3,
        first.revision,
        third.revision,
    )


async def test_put_with_lease(client: EtcdClient) -> None:
    lease = await client.lease_grant(30)
    await client.put("leased", "x", lease=lease.id)
    kv = await client.get("leased")
    assert kv is not None and kv.lease == lease.id
    info = await client.lease_time_to_live(lease.id, keys=True)
    assert info is not None and info.keys == [b"leased"]
    assert await client.lease_revoke(lease.id)
    assert await client.get("leased") is None


async def test_range_prefix_limit_keys_only_count_only(client: EtcdClient) -> None:
    for i in range(10):
        await client.put(f"p/{i:02d}", f"v{i}")
    await client.put("p", "not under p/")
    await client.put("q/0", "other prefix")

    r = await client.range("p/", prefix=True)
    assert [kv.key for kv in r.kvs] == [f"p/{i:02d}".encode() for i in range(10)]
    assert r.count == 10 and not r.more

    r = await client.range("p/", prefix=True, limit=3)
    assert [kv.key for kv in r.kvs] == [b"p/00", b"p/01", b"p/02"]
    assert r.count == 10 and r.more

    r = await client.range("p/", prefix=True, keys_only=True)
    assert len(r.kvs) == 10 and all(kv.value == b"" for kv in r.kvs)
    assert r.kvs[3].version == 1

    r = await client.range("p/", prefix=True, count_only=True)
    assert r.kvs == [] and r.count == 10

    r = await client.range("p/03", range_end=b"p/06")
    assert [kv.key for kv in r.kvs] == [b"p/03", b"p/04", b"p/05"]

    r = await client.range("p/", prefix=True, serializable=True)
    assert r.count == 10


async def test_range_at_revision(client: EtcdClient) -> None:
    r1 = await client.put("h", "old")
    await client.put("h", "new")
    await client.put("h2", "later")
    old = await client.range("h", prefix=True, revision=r1.revision)
    assert [(kv.key, kv.value) for kv in old.kvs] == [(b"h", b"old")]
    assert await client.get("h", revision=r1.revision) == old.kvs[0]
    kv = await client.get("h")
    assert kv is not None and kv.value == b"new"


async def test_get_prefix_pages_at_one_revision(client: EtcdClient) -> None:
    ops_keys = [f"pg/{i:03d}" for i in range(25)]
    for k in ops_keys:
        await client.put(k, k)
    await client.put("pg0", "outside")
    r = await client.get_prefix("pg/", page=4)
    assert [kv.key.decode() for kv in r.kvs] == ops_keys
    assert r.count == 25 and not r.more
    rev = r.revision
    # a write after the read does not leak into a later page read at the same revision
    await client.put("pg/000", "changed")
    r2 = await client.get_prefix("pg/", page=1000)
    assert r2.revision > rev
    assert r2.kvs[0].value == b"changed"
    empty = await client.get_prefix("none/", page=2)
    assert empty.kvs == [] and empty.count == 0


async def test_delete_single_prefix_prev_kv(client: EtcdClient) -> None:
    for i in range(5):
        await client.put(f"d/{i}", str(i))
    await client.put("d", "the parent")
    await client.put("e/0", "kept")

    r = await client.delete("d/0", prev_kv=True)
    assert r.deleted == 1
    assert [(kv.key, kv.value) for kv in r.prev_kvs] == [(b"d/0", b"0")]
    r = await client.delete("d/0")
    assert r.deleted == 0 and r.prev_kvs == []

    r = await client.delete("d/", prefix=True, prev_kv=True)
    assert r.deleted == 4
    assert sorted(kv.key for kv in r.prev_kvs) == [b"d/1", b"d/2", b"d/3", b"d/4"]
    assert (await client.range("d/", prefix=True)).count == 0
    assert await client.get("d") is not None
    assert await client.get("e/0") is not None


async def test_status_and_member_list(client: EtcdClient, etcd: EtcdProcess) -> None:
    st = await client.status()
    assert st.version.startswith("3.")
    assert st.leader != 0 and st.member_id == st.leader
    assert st.endpoint == etcd.endpoint
    members = await client.member_list()
    assert len(members) == 1
    assert members[0][2] == [etcd.endpoint]


async def test_compact_then_old_revision_is_compacted(private_etcd: EtcdProcess) -> None:
    async with open_client(private_etcd.endpoints) as c:
        r1 = await c.put("c", "1")
        r2 = await c.put("c", "2")
        r3 = await c.put("c", "3")
        await c.compact(r3.revision)
        for rev in (r1.revision, r2.revision):
            with pytest.raises(CompactedError) as info:
                await c.range("c", revision=rev)
            assert_our_error(info.value)
        kv = await c.get("c", revision=r3.revision)
        assert kv is not None and kv.value == b"3"
        # compacting again at or below the compacted revision is refused the same way
        with pytest.raises(CompactedError):
            await c.compact(r2.revision)


async def test_request_errors_are_ours(client: EtcdClient) -> None:
    head = (await client.put("x", "y")).revision
    with pytest.raises(EtcdRequestError) as info:
        await client.range("x", revision=head + 1000)  # a future revision
    assert_our_error(info.value)
    assert "future revision" in str(info.value)

    with pytest.raises(EtcdRequestError) as info:
        await client.put("", "empty key")
    assert_our_error(info.value)

    with pytest.raises(EtcdRequestError) as info:
        await client.put("big", b"x" * (2 * 1024 * 1024))  # over --max-request-bytes
    assert_our_error(info.value)

    with pytest.raises(EtcdRequestError) as info:
        await client.put("big", b"x" * (3 * 1024 * 1024))  # over gRPC's receive limit
    assert_our_error(info.value)

    # the client still works after all that
    assert (await client.put("x", "z")).revision == head + 1


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


async def test_keyvalue_is_plain(client: EtcdClient) -> None:
    await client.put("plain", "v")
    kv = await client.get("plain")
    assert type(kv) is KeyValue


async def test_empty_prefix_means_every_key(client: EtcdClient) -> None:
    from lpmosd.etcd import delete, get

    for k in ("a", "b/c", "\x00zero"):
        await client.put(k, "v")
    assert (await client.range("", prefix=True)).count == 3
    assert len((await client.get_prefix("", page=2)).kvs) == 3
    r = await client.txn([], [get("", prefix=True, keys_only=True)])
    assert r.responses[0].count == 3  # type: ignore[union-attr]
    r = await client.txn([], [delete("", prefix=True)])
    assert r.responses[0].deleted == 3  # type: ignore[union-attr]
    await client.put("again", "v")
    assert (await client.delete("", prefix=True)).deleted == 1
