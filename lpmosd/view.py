"""A local view of an etcd prefix, kept current by relist + watch.

Watch events are applied in revision order. After a compaction (events lost) the view
relists with one range read and diffs: keys that vanished become explicit deletions, so a
lost lease DELETE still reaches the reaper. Listeners are plain callables that must not
block; they get every change, live or synthetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from lpmosd.errors import CompactedError
from lpmosd.etcd import EtcdClient, EventType, KeyValue, WatchEvent, watch

log = logging.getLogger("lpmosd.view")

#: Changed keys told to listeners between two yields to the scheduler during a relist.
RELIST_SLICE: Final = 256


@dataclass(frozen=True, slots=True)
class Change:
    """One change of the view: ``kv`` is None for a deletion; ``prev`` what was there."""

    key: str
    kv: KeyValue | None
    prev: KeyValue | None
    revision: int
    #: True for changes found by a relist diff rather than delivered by the watch.
    relisted: bool = False


Listener = Callable[[Change], None]


class PrefixView:
    """Every key under ``prefix``, as of ``revision``."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.items: dict[str, KeyValue] = {}
        self.revision = 0
        self.listeners: list[Listener] = []
        self.relists = 0
        self.synced = trio.Event()

    def get(self, key: str) -> KeyValue | None:
        """The cached KeyValue of ``key``."""
        return self.items.get(key)

    def observe(self, kv: KeyValue) -> None:
        """Apply a write we made ourselves, so the cache is fresh before the watch catches up.

        A write at or below the view's revision is already reflected (the watch applied it,
        or something newer, a delete included): taking it again would resurrect a key the
        watch has deleted, until the next relist.
        """
        if kv.mod_revision <= self.revision:
            return
        key = kv.key.decode(errors="replace")
        old = self.items.get(key)
        if old is None or old.mod_revision < kv.mod_revision:
            self.items[key] = kv

    def forget(self, key: str, revision: int) -> None:
        """Drop a key we deleted ourselves (the watch will confirm it)."""
        old = self.items.get(key)
        if old is not None and old.mod_revision < revision:
            del self.items[key]

    def _emit(self, change: Change) -> None:
        for listener in self.listeners:
            try:
                listener(change)
            except Exception:
                log.exception("view listener failed", extra={"key": change.key})

    async def _relist(self) -> None:
        result = await self.client.get_prefix(self.prefix)
        fresh = {kv.key.decode(errors="replace"): kv for kv in result.kvs}
        old = self.items
        self.items = fresh
        self.revision = result.revision
        self.relists += 1
        # Listeners decode what they are told: with tens of thousands of keys that takes
        # seconds, so yield now and then (the session's keepalives must get through). A key
        # our own writes changed meanwhile (observe/forget) is left to the watch, which
        # starts after this relist's revision and reports it.
        emitted = 0
        for key, kv in fresh.items():
            prev = old.get(key)
            if prev is None or prev.mod_revision != kv.mod_revision:
                if self.items.get(key) is kv:
                    self._emit(Change(key, kv, prev, result.revision, relisted=True))
                emitted += 1
                if emitted % RELIST_SLICE == 0:
                    await trio.lowlevel.checkpoint()
        for key, prev in old.items():
            if key not in fresh and key not in self.items:
                self._emit(Change(key, None, prev, result.revision, relisted=True))

    def _apply(self, event: WatchEvent) -> None:
        key = event.kv.key.decode(errors="replace")
        prev = self.items.get(key)
        if event.type is EventType.PUT:
            if prev is not None and prev.mod_revision > event.kv.mod_revision:
                return  # we already applied a newer write of our own
            self.items[key] = event.kv
            self._emit(Change(key, event.kv, prev, event.kv.mod_revision))
        else:
            if prev is not None and prev.mod_revision > event.kv.mod_revision:
                return
            self.items.pop(key, None)
            self._emit(Change(key, None, prev, event.kv.mod_revision))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List, then follow the watch forever; relist whenever history was compacted."""
        await self._relist()
        self.synced.set()
        task_status.started()
        while True:
            try:
                async with watch(self.client, self.prefix, start_revision=self.revision + 1) as w:
                    async for batch in w:
                        for event in batch.events:
                            self._apply(event)
                        self.revision = max(self.revision, batch.revision)
            except CompactedError as exc:
                log.warning(
                    "watch history compacted; relisting",
                    extra={"prefix": self.prefix, "compact_revision": exc.compact_revision},
                )
                await self._relist()
