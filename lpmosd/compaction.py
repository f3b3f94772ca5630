"""Periodic compaction of etcd's history: the Kubernetes API server's scheme.

etcd keeps every revision of every key until it is compacted; without compaction a busy
provisioning system fills etcd's quota (NOSPACE) within thousands of installs. Every
``interval`` seconds the compactor compacts to the revision it saw one interval earlier,
so a watcher that fell behind by less than an interval can still resume without a relist.

Several control planes may run it at once: like kube-apiserver, each round first
compare-and-swaps a small key (:data:`COMPACT_KEY`) guarded on the version it saw last
round. Only the instance whose view of the key is current wins a round and compacts; the
others learn the key's version and try again next round. So the cluster is compacted about
once per interval, however many instances run.
"""

from __future__ import annotations

import logging

import trio

from lpmosd import metrics
from lpmosd.errors import CompactedError, EtcdError, EtcdNoSpaceError
from lpmosd.etcd import Compare, EtcdClient, RangeResult, get, put

log = logging.getLogger("lpmosd.compaction")

#: Coordinates the compactors of several control planes (outside ``/os/``: no watcher
#: of tasks sees it).
COMPACT_KEY = "/lpmosd/compaction/last-revision"


class Compactor:
    """Compacts etcd every ``interval`` seconds to the revision seen one interval earlier."""

    def __init__(self, client: EtcdClient, interval: float) -> None:
        self.client = client
        self.interval = interval
        #: The version of COMPACT_KEY this instance saw last (0: absent).
        self._version = 0
        #: The revision seen at the last round: the next round compacts to it.
        self._revision = 0
        #: Rounds run, compactions made, and the last revision compacted to.
        self.rounds = 0
        self.compactions = 0
        self.compacted_revision = 0

    async def run_round(self) -> int | None:
        """One round: claim it, and compact to the previous round's revision.

        Returns the revision compacted to, or None (lost the round to another instance,
        or first round: nothing seen yet).
        """
        self.rounds += 1
        try:
            r = await self.client.txn(
                [Compare.version(COMPACT_KEY, "==", self._version)],
                [put(COMPACT_KEY, str(self._revision))],
                [get(COMPACT_KEY)],
            )
        except EtcdNoSpaceError:
            # etcd refuses the claim (a write) but allows compaction, which the operator's
            # recovery needs: compact without claiming (a repeat by another instance
            # only finds the history compacted already).
            target = self._revision
            self._revision = (await self.client.status()).revision
            return await self._compact(target)
        target, self._revision = self._revision, r.revision
        if not r.succeeded:
            got = r.responses[0]
            assert isinstance(got, RangeResult)
            self._version = got.kvs[0].version if got.kvs else 0
            return None
        self._version += 1
        return await self._compact(target)

    async def _compact(self, target: int) -> int | None:
        if target == 0:
            return None
        try:
            await self.client.compact(target, physical=False)
        except CompactedError:
            # Somebody compacted further already (an operator, by hand): nothing to do.
            log.info("history already compacted past the target", extra={"revision": target})
            return None
        self.compactions += 1
        self.compacted_revision = target
        metrics.ETCD_COMPACTIONS.inc()
        metrics.ETCD_COMPACTED_REVISION.set(target)
        log.info("etcd history compacted", extra={"revision": target})
        return target

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Compact every interval until cancelled; etcd errors are logged, never fatal."""
        task_status.started()
        while True:
            try:
                await self.run_round()
            except EtcdError as exc:
                log.warning("compaction round failed", extra={"error": str(exc)})
            await trio.sleep(self.interval)
