"""Leader election on a session lease, the way etcd's ``concurrency.Election`` does it.

Each candidate puts one key under the election prefix, bound to its own lease. The key
with the lowest create revision leads; every other candidate waits for the deletion of
the key just below its own (no herd: one watcher per key). A leader that dies or pauses
loses its lease, its key vanishes with it, and the next candidate leads. What a leader
writes is fenced on its key (:class:`~lpmosd.etcd.fence.Fence`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from lpmosd.errors import CompactedError, EtcdUnavailableError, LeaseLost
from lpmosd.etcd.client import EtcdClient
from lpmosd.etcd.txn import Compare, get, put
from lpmosd.etcd.types import EventType, KeyValue, RangeResult
from lpmosd.etcd.watch import watch

log = logging.getLogger("lpmosd.election")


def candidate_key(prefix: str, lease_id: int) -> str:
    """A candidate's key: the prefix plus its lease id in hex (like etcd's)."""
    return f"{prefix}{lease_id:x}"


def leader_of(kvs: list[KeyValue]) -> KeyValue | None:
    """The leading candidate among ``kvs`` (the lowest create revision), if any."""
    return min(kvs, key=lambda kv: kv.create_revision, default=None)


async def nominate(client: EtcdClient, prefix: str, lease_id: int, value: str) -> tuple[str, int]:
    """Put this candidate's key (bound to ``lease_id``); returns the key and its create
    revision, the candidate's place in the queue."""
    key = candidate_key(prefix, lease_id)
    r = await client.txn([Compare.absent(key)], [put(key, value, lease=lease_id)], [get(key)])
    if r.succeeded:
        return key, r.revision
    seen = r.responses[0]
    assert isinstance(seen, RangeResult)
    return key, seen.kvs[0].create_revision  # our own lease: a retried nomination


async def wait_for_leadership(
    client: EtcdClient,
    prefix: str,
    key: str,
    revision: int,
    lease_id: int,
    *,
    on_standby: Callable[[], None] = lambda: None,
) -> None:
    """Return once the candidate ``key`` (created at ``revision``) leads ``prefix``.

    ``on_standby`` is called each time it finds another candidate ahead and starts to
    wait. Raises :class:`LeaseLost` if the key itself disappears meanwhile.
    """
    backoff = 0.05
    while True:
        try:
            listing = await client.get_prefix(prefix)
        except EtcdUnavailableError:
            # Keep our place in the queue: the lease, not one failed read, decides.
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
            continue
        backoff = 0.05
        if not any(kv.key.decode() == key for kv in listing.kvs):
            raise LeaseLost(lease_id, f"election key {key} vanished while waiting to lead")
        ahead = [kv for kv in listing.kvs if kv.create_revision < revision]
        if not ahead:
            return
        # Only the candidate just ahead of us: when it goes, look again (an earlier one
        # may still lead).
        previous = max(ahead, key=lambda kv: kv.create_revision)
        on_standby()
        log.info(
            "standby: waiting for the candidate ahead",
            extra={"key": key, "ahead": previous.key.decode(errors="replace")},
        )
        await _wait_deleted(client, previous.key, listing.revision + 1)


async def _wait_deleted(client: EtcdClient, key: bytes, from_revision: int) -> None:
    try:
        async with watch(client, key, prefix=False, start_revision=from_revision) as stream:
            async for batch in stream:
                if any(e.type is EventType.DELETE for e in batch.events):
                    return
    except CompactedError:
        return  # history gone: the caller looks at the keys again
