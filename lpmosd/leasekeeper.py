"""Agent leases kept alive at most once per TTL/3 each, however often their agents call.

A regional with 10,000 installing machines hears from each every few seconds (heartbeats,
progress and log reports: each says the agent is alive). Sending a keepalive to etcd for
every one of them costs a round trip on the shared LeaseKeepAlive stream each; a lease
needs one only every so often. :class:`LeaseKeeper` remembers when each lease was last
refreshed (or granted) and tells whether a refresh is due: at least ``ttl / 3`` since the
last one. Refreshes due after a report are sent from :meth:`LeaseKeeper.run`, off the
request path (a report is not held up by its keepalive); a heartbeat that finds one due
awaits it, so it can still answer "lease gone" (409) or "not committed".

A lease is refreshed only when its agent was heard, and never later than that: it expires
at most ``ttl`` after the agent's last call, as without throttling (a dead agent's lease
is not kept alive). Between refreshes a live agent's lease keeps at least
``ttl - ttl/3 - heartbeat_interval`` seconds (the config keeps two heartbeats in one TTL).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from lpmosd._trio_util import open_nursery
from lpmosd.errors import EtcdError, LeaseNotFoundError

__all__ = ["LeaseKeeper"]

log = logging.getLogger("lpmosd.leases")

#: Keepalives sent at once by the background refresher.
MAX_CONCURRENT = 64


class LeaseKeeper:
    """When each agent lease was last refreshed, and refreshes it when due.

    ``keepalive(lease_id)`` refreshes one lease and returns its new TTL (raising
    :class:`LeaseNotFoundError` when it is gone): the etcd client's ``keepalive_once``.
    """

    def __init__(
        self,
        ttl: int,
        keepalive: Callable[[int], Awaitable[int]],
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.ttl = ttl
        self.interval = ttl / 3
        self._keepalive = keepalive
        self._clock = clock
        #: lease id -> (clock time of the last refresh or grant, TTL etcd gave then).
        self._refreshed: dict[int, tuple[float, int]] = {}
        self._queued: set[int] = set()
        self._wake = trio.Event()
        #: Keepalives sent to etcd, and calls that needed none (for tests and benchmarks).
        self.sent = 0
        self.skipped = 0

    def granted(self, lease_id: int, ttl: int | None = None) -> None:
        """A lease was just granted (or refreshed elsewhere) with ``ttl`` seconds."""
        self._refreshed[lease_id] = (self._clock(), self.ttl if ttl is None else ttl)

    def forget(self, lease_id: int) -> None:
        """The lease is gone (revoked, expired)."""
        self._refreshed.pop(lease_id, None)
        self._queued.discard(lease_id)

    def ttl_left(self, lease_id: int) -> int | None:
        """Seconds the lease has left when it needs no refresh yet, else None (due)."""
        last = self._refreshed.get(lease_id)
        if last is None:
            return None
        age = self._clock() - last[0]
        if age >= self.interval:
            return None
        return max(1, round(last[1] - age))

    async def refresh(self, lease_id: int) -> int:
        """Refresh now (a heartbeat found it due); the new TTL. LeaseNotFoundError when gone."""
        self.sent += 1
        try:
            ttl = await self._keepalive(lease_id)
        except LeaseNotFoundError:
            self.forget(lease_id)
            raise
        self.granted(lease_id, ttl)
        return ttl

    def heard(self, lease_id: int | None) -> None:
        """The lease's agent was heard: queue a refresh when one is due (sent by :meth:`run`)."""
        if not lease_id:
            return
        if self.ttl_left(lease_id) is not None or lease_id in self._queued:
            self.skipped += 1
            return
        self._queued.add(lease_id)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the queued refreshes (several at once on the shared stream) until cancelled;
        forget leases not refreshed for a TTL (they have expired)."""
        slots = trio.Semaphore(MAX_CONCURRENT)
        task_status.started()
        async with open_nursery() as nursery:
            while True:
                with trio.move_on_after(self.ttl):
                    await self._wake.wait()
                self._wake = trio.Event()
                self._prune()
                due, self._queued = self._queued, set()
                for lease_id in due:
                    await slots.acquire()
                    nursery.start_soon(self._send, lease_id, slots)

    async def _send(self, lease_id: int, slots: trio.Semaphore) -> None:
        try:
            if self.ttl_left(lease_id) is None:  # a heartbeat may have refreshed it meanwhile
                await self.refresh(lease_id)
        except LeaseNotFoundError:
            pass  # the view drops its lease key; the agent's next heartbeat hears 409
        except EtcdError as exc:
            # The agent's next heartbeat tries again (and reports "not committed").
            log.debug("keepalive failed", extra={"lease": lease_id, "error": str(exc)})
        finally:
            slots.release()

    def _prune(self) -> None:
        now = self._clock()
        stale = [lid for lid, (t, ttl) in self._refreshed.items() if now - t > max(ttl, self.ttl)]
        for lease_id in stale:
            del self._refreshed[lease_id]
