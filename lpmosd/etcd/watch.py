"""Resumable watches: one gRPC stream per watch, reopened from the last revision seen."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

import trio

from lpmosd import metrics
from lpmosd._trio_util import open_nursery
from lpmosd.errors import CompactedError, EtcdAuthError, EtcdError, EtcdUnavailableError
from lpmosd.etcd._pb import etcdserverpb as pb
from lpmosd.etcd._pb import mvccpb
from lpmosd.etcd.client import EtcdClient
from lpmosd.etcd.txn import prefix_end, to_bytes
from lpmosd.etcd.types import EventType, KeyValue, WatchBatch, WatchEvent

_ROUTE = "/etcdserverpb.Watch/Watch"
# A watch on a member cut off from the leader is cancelled instead of going silent.
_HASLEADER = ("hasleader", "true")
_FROM_NOW = -1


class WatchStream:
    """Async iterator of :class:`WatchBatch`; raises :class:`CompactedError` to ask for a relist.

    ``revision`` is the last revision the watch has fully seen.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[WatchBatch | EtcdError]) -> None:
        self._receive = receive
        self.revision = 0

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchBatch:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, EtcdError):
            raise item
        self.revision = item.revision
        return item


def _event(e: mvccpb.Event) -> WatchEvent:
    kv = KeyValue.from_pb(e.kv) if e.kv is not None else KeyValue(b"", b"", 0, 0, 0, 0)
    prev = KeyValue.from_pb(e.prev_kv) if e.prev_kv is not None else None
    kind = EventType.DELETE if e.type == mvccpb.EventEventType.DELETE else EventType.PUT
    return WatchEvent(kind, kv, prev)


class _Watcher:
    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        prev_kv: bool,
        send: trio.MemorySendChannel[WatchBatch | EtcdError],
    ) -> None:
        self.client = client
        self.key = key
        self.range_end = range_end
        self.prev_kv = prev_kv
        self.send = send
        # Everything at or below `applied` has been delivered; -1: start "now" (fixed by
        # etcd's creation response). start_revision=1 (all history) gives applied=0.
        self.applied = start_revision - 1 if start_revision > 0 else _FROM_NOW

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        backoff = 0.05
        # Re-authenticated since the watch was last created: a second auth refusal in a
        # row is a real one (etcd 3.4 says "permission denied" for expired tokens too).
        reauthenticated = False
        async with self.send:
            while True:
                generation = self.client.token_generation
                try:
                    async with self.client.open_stream(
                        _ROUTE, pb.WatchRequest, pb.WatchResponse, _HASLEADER
                    ) as stream:
                        stream.send(self._create_request())
                        while True:
                            reply = await stream.receive()
                            created = reply.created and not reply.canceled
                            if created and not started:
                                # Only now is "from now" fixed; the caller may write.
                                started = True
                                task_status.started()
                            if await self._handle(reply):
                                return
                            if created:
                                reauthenticated = False
                            backoff = 0.05
                except EtcdAuthError as exc:
                    if reauthenticated or not self.client.uses_auth:
                        await self._fail(exc, started)
                        return
                    reauthenticated = True
                    await self.client.authenticate(generation)
                    continue
                except EtcdUnavailableError:
                    pass
                except EtcdError as exc:
                    await self._fail(exc, started)
                    return
                metrics.WATCH_RECONNECTS.inc()
                await trio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)

    async def _fail(self, exc: EtcdError, started: bool) -> None:
        """End the watch with ``exc``: raised by ``watch()`` itself before the watch was
        created, else by the stream's iteration."""
        if not started:
            raise exc
        await self.send.send(exc)

    def _create_request(self) -> pb.WatchRequest:
        return pb.WatchRequest(
            create_request=pb.WatchCreateRequest(
                key=self.key,
                range_end=self.range_end,
                start_revision=self.applied + 1 if self.applied != _FROM_NOW else 0,
                progress_notify=True,
                prev_kv=self.prev_kv,
            )
        )

    async def _handle(self, reply: pb.WatchResponse) -> bool:
        """Deliver one response; True when the watch is over."""
        header_rev = reply.header.revision if reply.header else 0
        if reply.compact_revision:
            await self.send.send(
                CompactedError(
                    f"watch from revision {self.applied + 1} lost history: compacted at "
                    f"{reply.compact_revision}; relist",
                    reply.compact_revision,
                )
            )
            return True
        if reply.canceled:
            reason = reply.cancel_reason or "watch canceled by etcd"
            if "permission denied" in reason or "auth" in reason:
                raise EtcdAuthError(reason)
            raise EtcdUnavailableError(reason)
        if reply.created:
            if self.applied == _FROM_NOW:
                # Watching "from now": the creation revision is where we stand.
                self.applied = header_rev
                await self.send.send(WatchBatch(header_rev, []))
            return False
        events = [_event(e) for e in reply.events]
        # Replays after a reconnect or partition: drop what we already delivered.
        fresh = [e for e in events if e.kv.mod_revision > self.applied]
        if fresh:
            self.applied = fresh[-1].kv.mod_revision
            metrics.WATCH_EVENTS.inc(len(fresh))
            await self.send.send(WatchBatch(self.applied, fresh))
        elif not events and header_rev > self.applied:
            # A progress notification: everything up to header_rev has been seen.
            self.applied = header_rev
            await self.send.send(WatchBatch(header_rev, []))
        return False


@contextlib.asynccontextmanager
async def watch(
    client: EtcdClient,
    key: str | bytes,
    *,
    prefix: bool = True,
    start_revision: int = 0,
    prev_kv: bool = False,
    buffer: int = 256,
) -> AsyncIterator[WatchStream]:
    """Watch ``key`` (a prefix by default) from ``start_revision`` (0: from now).

    The stream survives disconnects and etcd restarts, resuming at the last revision seen
    plus one with no gaps and no duplicates. When the history it needs was compacted it
    raises :class:`CompactedError`: relist with a range read and watch again from the
    read's revision + 1. The context manager returns once etcd has created the watch.
    A batch with no events carries progress (the revision seen so far).
    """
    k = to_bytes(key)
    send, receive = trio.open_memory_channel[WatchBatch | EtcdError](buffer)
    watcher = _Watcher(client, k, prefix_end(k) if prefix else b"", start_revision, prev_kv, send)
    async with open_nursery() as nursery:
        await nursery.start(watcher.run)
        try:
            yield WatchStream(receive)
        finally:
            nursery.cancel_scope.cancel()
