"""Held leases: keep a lease alive and cancel the work it guards when it is lost."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from lpmosd import metrics
from lpmosd._trio_util import open_nursery
from lpmosd.errors import EtcdError, LeaseLost, LeaseNotFoundError
from lpmosd.etcd.client import EtcdClient


@dataclass(eq=False)
class HeldLease:
    """A lease kept alive by :func:`open_lease`.

    ``valid_until`` (trio clock) is how long we may act as its holder: the send time of
    the last acknowledged keepalive plus the TTL etcd granted, minus a safety margin.
    """

    id: int
    ttl: int
    valid_until: float
    margin: float
    lost_reason: str | None = field(default=None)
    #: Whether it was lost because etcd did not answer (see :attr:`LeaseLost.unreachable`).
    lost_unreachable: bool = field(default=False)

    def remaining(self) -> float:
        """Seconds we may still trust the lease."""
        return max(0.0, self.valid_until - trio.current_time())


async def _keep_alive(client: EtcdClient, lease: HeldLease, cancel_body: trio.CancelScope) -> None:
    interval = lease.ttl / 3
    retry = min(0.5, interval)
    while True:
        sent_at = trio.current_time()
        timeout = max(0.05, min(interval, lease.valid_until - sent_at))
        try:
            ttl = await client.keepalive_once(lease.id, timeout=timeout)
        except LeaseNotFoundError:
            lease.lost_reason = "expired or revoked"
            break
        except EtcdError:
            # Keep trying until the deadline; a later keepalive may still save it.
            if trio.current_time() >= lease.valid_until:
                lease.lost_reason = "keepalive failing past the lease deadline"
                lease.lost_unreachable = True
                break
            await trio.sleep(min(retry, max(0.0, lease.valid_until - trio.current_time())))
            if trio.current_time() >= lease.valid_until:
                lease.lost_reason = "keepalive failing past the lease deadline"
                lease.lost_unreachable = True
                break
            continue
        lease.valid_until = sent_at + ttl - lease.margin
        await trio.sleep_until(min(sent_at + interval, lease.valid_until))
        if trio.current_time() >= lease.valid_until:
            lease.lost_reason = "keepalive answers came too late"
            break
    cancel_body.cancel()


@contextlib.asynccontextmanager
async def open_lease(
    client: EtcdClient, ttl: int, *, margin: float | None = None
) -> AsyncIterator[HeldLease]:
    """Grant a lease of ``ttl`` seconds and keep it alive (every TTL/3) for the body.

    If the lease is lost — expired, revoked, or keepalives failing past its deadline — the
    body is cancelled and :class:`LeaseLost` is raised to the owner. On a normal exit the
    lease is revoked (its keys vanish at once).
    """
    margin = min(1.0, ttl * 0.1) if margin is None else margin
    start = trio.current_time()
    info = await client.lease_grant(ttl)
    lease = HeldLease(info.id, info.ttl, start + info.ttl - margin, margin)
    metrics.ACTIVE_LEASES.inc()
    try:
        async with open_nursery() as nursery:
            nursery.start_soon(_keep_alive, client, lease, nursery.cancel_scope)
            try:
                yield lease
            finally:
                nursery.cancel_scope.cancel()
    finally:
        metrics.ACTIVE_LEASES.dec()
        if lease.lost_reason is None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(2),
                contextlib.suppress(EtcdError),
            ):
                await client.lease_revoke(lease.id)
    if lease.lost_reason is not None:
        raise LeaseLost(lease.id, lease.lost_reason, unreachable=lease.lost_unreachable)
