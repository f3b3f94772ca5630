"""The Trio-native etcd v3 client: KV, transactions, CAS updates, watches, leases, auth."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import betterproto2
import trio

from lpmosd import hooks, metrics
from lpmosd._trio_util import open_nursery
from lpmosd.errors import (
    ContentionError,
    EtcdAuthError,
    EtcdError,
    EtcdRequestError,
    EtcdUnavailableError,
    LeaseNotFoundError,
)
from lpmosd.etcd import _bridge
from lpmosd.etcd._pb import etcdserverpb as pb
from lpmosd.etcd.fence import Fence
from lpmosd.etcd.txn import (
    MAX_TXN_OPS,
    Compare,
    Delete,
    Get,
    Op,
    Put,
    key_range,
    to_bytes,
)
from lpmosd.etcd.types import (
    DeleteResult,
    KeyValue,
    LeaseInfo,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
    UpdateResult,
)

RepT = TypeVar("RepT", bound=betterproto2.Message)

_CMP_RESULT = {
    "==": pb.CompareCompareResult.EQUAL,
    "!=": pb.CompareCompareResult.NOT_EQUAL,
    ">": pb.CompareCompareResult.GREATER,
    "<": pb.CompareCompareResult.LESS,
}
_CMP_TARGET = {
    "value": pb.CompareCompareTarget.VALUE,
    "version": pb.CompareCompareTarget.VERSION,
    "create_revision": pb.CompareCompareTarget.CREATE,
    "mod_revision": pb.CompareCompareTarget.MOD,
    "lease": pb.CompareCompareTarget.LEASE,
}


@dataclass(frozen=True, slots=True)
class Auth:
    """etcd user credentials. The password comes from a file, never the command line."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Auth(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True, slots=True)
class Write:
    """What an ``atomic_update`` function returns to run other ops in the same Txn.

    ``guards`` are extra compares; if one fails while the key itself is unchanged the
    update stops with ``UpdateResult.guard_failed`` instead of retrying. ``before`` ops
    come ahead of the key's put in the Txn, so watchers get their events first (a task's
    log chunk is there when its document arrives).
    """

    value: bytes
    also: Sequence[Op] = ()
    guards: Sequence[Compare] = ()
    before: Sequence[Op] = ()


UpdateFn = Callable[[KeyValue | None], "bytes | Write | None"]


def _compare_pb(c: Compare) -> pb.Compare:
    msg = pb.Compare(result=_CMP_RESULT[c.op], target=_CMP_TARGET[c.target], key=c.key)
    if c.target == "value":
        assert isinstance(c.value, bytes)
        msg.value = c.value
    else:
        assert isinstance(c.value, int)
        setattr(msg, c.target, c.value)
    return msg


def _op_pb(op: Op) -> pb.RequestOp:
    if isinstance(op, Put):
        return pb.RequestOp(
            request_put=pb.PutRequest(
                key=op.key, value=op.value, lease=op.lease, prev_kv=op.prev_kv
            )
        )
    if isinstance(op, Delete):
        return pb.RequestOp(
            request_delete_range=pb.DeleteRangeRequest(
                key=op.key, range_end=op.range_end, prev_kv=op.prev_kv
            )
        )
    return pb.RequestOp(
        request_range=pb.RangeRequest(
            key=op.key,
            range_end=op.range_end,
            keys_only=op.keys_only,
            limit=op.limit,
            revision=op.revision,
        )
    )


def _rev(header: pb.ResponseHeader | None) -> int:
    return header.revision if header is not None else 0


def _range_result(r: pb.RangeResponse) -> RangeResult:
    return RangeResult([KeyValue.from_pb(kv) for kv in r.kvs], _rev(r.header), r.count, r.more)


def _response_result(r: pb.ResponseOp) -> RangeResult | PutResult | DeleteResult:
    if r.response_range is not None:
        return _range_result(r.response_range)
    if r.response_put is not None:
        p = r.response_put
        return PutResult(_rev(p.header), KeyValue.from_pb(p.prev_kv) if p.prev_kv else None)
    d = r.response_delete_range
    if d is None:
        raise EtcdRequestError("nested transactions are not supported")
    return DeleteResult(_rev(d.header), d.deleted, [KeyValue.from_pb(kv) for kv in d.prev_kvs])


class _UpdateGate:
    """Turn-taking for concurrent ``atomic_update`` calls on one key (see there)."""

    __slots__ = ("known", "kv", "lock", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0
        self.kv: KeyValue | None = None  # the key as the last update left it...
        self.known = False  # ...if that is known


class EtcdClient:
    """A connection to an etcd cluster. Make one with :func:`open_client`.

    Reads and lease calls are retried on another endpoint when a member is unreachable.
    Writes are retried only when the request never reached the wire; an ambiguous write
    failure surfaces as :class:`EtcdUnavailableError` (``atomic_update`` settles it by
    re-reading instead).
    """

    def __init__(
        self,
        transport: _bridge.Transport,
        *,
        auth: Auth | None,
        request_timeout: float,
    ) -> None:
        self._transport = transport
        self._auth = auth
        self._token: str | None = None
        self._token_generation = 0
        self._auth_lock = trio.Lock()
        self.request_timeout = request_timeout
        self._keepalive: KeepAliveHub | None = None
        self._update_gates: dict[bytes, _UpdateGate] = {}

    # --- plumbing ------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The configured endpoint URLs."""
        return [e.url for e in self._transport.endpoints]

    @property
    def uses_auth(self) -> bool:
        """Whether requests carry an auth token (a user and password were given)."""
        return self._auth is not None

    @property
    def closed(self) -> bool:
        """True once :func:`open_client`'s body has ended (nothing may be sent any more)."""
        return self._keepalive is None

    @property
    def current_endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self._transport.endpoint.url

    def metadata(self, *extra: tuple[str, str]) -> list[tuple[str, str]] | None:
        """Request metadata: the auth token (when authenticated) plus ``extra``."""
        md = list(extra)
        if self._token is not None:
            md.append(("token", self._token))
        return md or None

    async def authenticate(self, seen_generation: int | None = None) -> None:
        """Get a fresh auth token (coalesced: concurrent callers share one refresh)."""
        if self._auth is None:
            return
        async with self._auth_lock:
            if seen_generation is not None and seen_generation != self._token_generation:
                return  # somebody refreshed while we waited
            reply = await self._raw(
                "/etcdserverpb.Auth/Authenticate",
                pb.AuthenticateRequest(name=self._auth.username, password=self._auth.password),
                pb.AuthenticateResponse,
                idempotent=True,
                with_token=False,
            )
            self._token = reply.token
            self._token_generation += 1

    async def _raw(
        self,
        route: str,
        request: betterproto2.Message,
        reply_type: type[RepT],
        *,
        idempotent: bool,
        with_token: bool = True,
    ) -> RepT:
        attempts = max(2, len(self._transport.endpoints))
        method = route.rsplit("/", 1)[-1]
        last: EtcdError | None = None
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(min(0.5, 0.05 * attempt) * (0.5 + random.random()))
            start = time.perf_counter()
            try:
                reply = await self._transport.unary(
                    route,
                    request,
                    reply_type,
                    timeout=self.request_timeout,
                    metadata=self.metadata() if with_token else None,
                )
            except _bridge.AmbiguousError as exc:
                metrics.ETCD_REQUEST_ERRORS.labels(method, "ambiguous").inc()
                if not idempotent:
                    raise EtcdUnavailableError(str(exc)) from None
                last = exc
            except EtcdUnavailableError as exc:
                metrics.ETCD_REQUEST_ERRORS.labels(method, "unavailable").inc()
                last = exc
            else:
                metrics.ETCD_REQUEST_SECONDS.labels(method).observe(time.perf_counter() - start)
                return reply
        assert last is not None
        raise EtcdUnavailableError(f"{method}: no etcd endpoint answered: {last}")

    async def _call(
        self,
        route: str,
        request: betterproto2.Message,
        reply_type: type[RepT],
        *,
        idempotent: bool,
    ) -> RepT:
        if self._auth is not None and self._token is None:
            await self.authenticate()
        generation = self._token_generation
        try:
            return await self._raw(route, request, reply_type, idempotent=idempotent)
        except EtcdAuthError as exc:
            # Tokens expire (simple tokens after --auth-token-ttl) or belong to another
            # member after failover: refresh once and retry.
            if self._auth is None or not _bridge.is_auth_expired(exc):
                raise
        await self.authenticate(generation)
        return await self._raw(route, request, reply_type, idempotent=idempotent)

    # --- KV ------------------------------------------------------------------------------

    async def range(
        self,
        key: str | bytes,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
    ) -> RangeResult:
        """Read a key, a prefix, or ``[key, range_end)``."""
        k, end = key_range(key, prefix=True) if prefix else (to_bytes(key), range_end or b"")
        req = pb.RangeRequest(
            key=k,
            range_end=end,
            limit=limit,
            revision=revision,
            keys_only=keys_only,
            count_only=count_only,
            serializable=serializable,
        )
        reply = await self._call("/etcdserverpb.KV/Range", req, pb.RangeResponse, idempotent=True)
        return _range_result(reply)

    async def get(self, key: str | bytes, *, revision: int = 0) -> KeyValue | None:
        """One key, or None when absent."""
        r = await self.range(key, revision=revision)
        return r.kvs[0] if r.kvs else None

    async def get_prefix(self, prefix: str | bytes, *, page: int = 1000) -> RangeResult:
        """Every key under ``prefix`` at one consistent revision, read in pages."""
        k, end = key_range(prefix, prefix=True)
        first = await self.range(k, range_end=end, limit=page)
        kvs, rev, more = list(first.kvs), first.revision, first.more
        while more:
            nxt = kvs[-1].key + b"\0"
            r = await self.range(nxt, range_end=end, limit=page, revision=rev)
            kvs.extend(r.kvs)
            more = r.more
        return RangeResult(kvs, rev, len(kvs), False)

    async def put(
        self, key: str | bytes, value: str | bytes, *, lease: int = 0, prev_kv: bool = False
    ) -> PutResult:
        """Write one key (optionally bound to ``lease``)."""
        req = pb.PutRequest(key=to_bytes(key), value=to_bytes(value), lease=lease, prev_kv=prev_kv)
        reply = await self._call("/etcdserverpb.KV/Put", req, pb.PutResponse, idempotent=False)
        return PutResult(
            _rev(reply.header), KeyValue.from_pb(reply.prev_kv) if reply.prev_kv else None
        )

    async def delete(
        self, key: str | bytes, *, prefix: bool = False, prev_kv: bool = False
    ) -> DeleteResult:
        """Delete a key, or every key under a prefix."""
        k, end = key_range(key, prefix=prefix)
        req = pb.DeleteRangeRequest(key=k, range_end=end, prev_kv=prev_kv)
        reply = await self._call(
            "/etcdserverpb.KV/DeleteRange", req, pb.DeleteRangeResponse, idempotent=False
        )
        return DeleteResult(
            _rev(reply.header), reply.deleted, [KeyValue.from_pb(kv) for kv in reply.prev_kvs]
        )

    async def txn(
        self,
        compare: Sequence[Compare] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        *,
        fence: Fence | None = None,
    ) -> TxnResult:
        """One transaction: if every compare holds, run ``success``, else ``failure``.

        With ``fence`` the Txn also requires the fence's leadership term; when that is what
        failed, :class:`NotLeaderError` (nothing was written). Read-only Txns need no fence.
        """
        term: Compare | None = None
        if fence is not None and any(not isinstance(o, Get) for o in success):
            term = fence.compare()
            compare = [*compare, term]
            failure = [*failure, Get(term.key)]
            # A process paused here (between deciding it leads and etcd hearing of it) is
            # what fencing is for.
            await hooks.reach("etcd.fenced-txn")
        if len(success) > MAX_TXN_OPS or len(failure) > MAX_TXN_OPS:
            raise EtcdRequestError(f"a transaction takes at most {MAX_TXN_OPS} operations")
        req = pb.TxnRequest(
            compare=[_compare_pb(c) for c in compare],
            success=[_op_pb(o) for o in success],
            failure=[_op_pb(o) for o in failure],
        )
        # A read-only transaction is safe to retry.
        idempotent = all(isinstance(o, Get) for o in (*success, *failure))
        reply = await self._call("/etcdserverpb.KV/Txn", req, pb.TxnResponse, idempotent=idempotent)
        responses = [_response_result(r) for r in reply.responses]
        if term is not None and not reply.succeeded:
            seen = responses.pop()
            assert isinstance(seen, RangeResult)
            Fence.check(term, seen)
        return TxnResult(reply.succeeded, _rev(reply.header), responses)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Discard history before ``revision``."""
        req = pb.CompactionRequest(revision=revision, physical=physical)
        await self._call("/etcdserverpb.KV/Compact", req, pb.CompactionResponse, idempotent=True)

    async def atomic_update(
        self,
        key: str | bytes,
        fn: UpdateFn,
        *,
        current: KeyValue | None = None,
        known_absent: bool = False,
        max_attempts: int = 20,
        backoff_cap: float = 0.05,
        fence: Fence | None = None,
    ) -> UpdateResult:
        """Read → ``fn`` → compare-and-swap on mod_revision, until it commits.

        ``fn`` gets the current KeyValue (None when absent) and returns the new value, a
        :class:`Write` (value plus ops for the same Txn), or None to leave the key alone.
        It may run several times and must not have side effects; exceptions it raises
        propagate with nothing written. ``current`` (e.g. from a watch cache) saves the
        first read; a stale one only costs a retry. A lost race re-reads through the
        failed Txn itself. After ``max_attempts`` conflicts: :class:`ContentionError`.
        An ambiguous failure (connection lost after sending) is settled by re-reading.

        ``fence``: every write also requires that leadership term (see :meth:`txn`).

        Concurrent updates of one key through this client take turns (a per-key lock):
        they could not all win anyway, and in turn each one starts from the key as the
        previous one left it, so local contention costs no failed round trips.
        """
        k = to_bytes(key)
        gate = self._update_gates.get(k)
        if gate is None:
            gate = self._update_gates[k] = _UpdateGate()
        gate.users += 1
        try:
            async with gate.lock:
                from_gate = current is None and not known_absent and gate.known
                if from_gate:
                    current, known_absent = gate.kv, gate.kv is None
                gate.known = False
                result = await self._atomic_update(
                    k, fn, current, known_absent, max_attempts, backoff_cap, from_gate, fence
                )
                gate.kv, gate.known = result.kv, True
                return result
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._update_gates[k]

    async def _atomic_update(
        self,
        k: bytes,
        fn: UpdateFn,
        current: KeyValue | None,
        known_absent: bool,
        max_attempts: int,
        backoff_cap: float,
        hinted: bool = False,
        fence: Fence | None = None,
    ) -> UpdateResult:
        kv = current if current is not None or known_absent else await self.get(k)
        for attempt in range(1, max_attempts + 1):
            result = fn(kv)
            if result is None and hinted:
                # The turn-taking hint saved a read; "leave it alone" must not rest on a
                # view another process may have changed since: decide on a fresh read.
                kv = await self.get(k)
                result = fn(kv)
            hinted = False  # from here on, kv comes from etcd
            if result is None:
                rev = kv.mod_revision if kv else 0
                return UpdateResult(kv.value if kv else None, rev, attempt, False, kv)
            write = result if isinstance(result, Write) else Write(result)
            guard = Compare.mod_revision(k, "==", kv.mod_revision) if kv else Compare.absent(k)
            lease = kv.lease if kv else 0
            try:
                r = await self.txn(
                    [guard, *write.guards],
                    [*write.before, Put(k, write.value, lease), *write.also],
                    [Get(k)],
                    fence=fence,
                )
            except EtcdUnavailableError:
                kv_now = await self.get(k)
                if (
                    kv_now is not None
                    and kv_now.value == write.value
                    and (kv is None or kv_now.mod_revision > kv.mod_revision)
                ):
                    return UpdateResult(write.value, kv_now.mod_revision, attempt, True, kv_now)
                kv = kv_now
                continue
            if r.succeeded:
                new_kv = KeyValue(
                    k,
                    write.value,
                    kv.create_revision if kv else r.revision,
                    r.revision,
                    kv.version + 1 if kv else 1,
                    lease,
                )
                return UpdateResult(write.value, r.revision, attempt, True, new_kv)
            got = r.responses[0]
            assert isinstance(got, RangeResult)
            fresh = got.kvs[0] if got.kvs else None
            if write.guards and (
                (fresh is None and kv is None)
                or (fresh is not None and kv is not None and fresh.mod_revision == kv.mod_revision)
            ):
                return UpdateResult(kv.value if kv else None, r.revision, attempt, False, kv, True)
            metrics.CAS_RETRIES.inc()
            kv = fresh
            if attempt > 1:
                await trio.sleep(random.uniform(0, min(backoff_cap, 0.002 * 2**attempt)))
        raise ContentionError(k.decode(errors="replace"), max_attempts)

    # --- leases --------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, lease_id: int = 0) -> LeaseInfo:
        """Grant a lease of ``ttl`` seconds."""
        reply = await self._call(
            "/etcdserverpb.Lease/LeaseGrant",
            pb.LeaseGrantRequest(ttl=ttl, id=lease_id),
            pb.LeaseGrantResponse,
            idempotent=lease_id != 0,
        )
        if reply.error:
            raise EtcdRequestError(f"lease grant refused: {reply.error}")
        return LeaseInfo(reply.id, reply.ttl, reply.ttl, [])

    async def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease (its keys are deleted). False when it no longer existed."""
        try:
            await self._call(
                "/etcdserverpb.Lease/LeaseRevoke",
                pb.LeaseRevokeRequest(id=lease_id),
                pb.LeaseRevokeResponse,
                idempotent=True,
            )
        except LeaseNotFoundError:
            return False
        return True

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo | None:
        """Remaining TTL of a lease, or None when it is gone."""
        reply = await self._call(
            "/etcdserverpb.Lease/LeaseTimeToLive",
            pb.LeaseTimeToLiveRequest(id=lease_id, keys=keys),
            pb.LeaseTimeToLiveResponse,
            idempotent=True,
        )
        if reply.ttl < 0:
            return None
        return LeaseInfo(reply.id, reply.ttl, reply.granted_ttl, list(reply.keys))

    async def leases(self) -> list[int]:
        """Ids of every live lease."""
        reply = await self._call(
            "/etcdserverpb.Lease/LeaseLeases",
            pb.LeaseLeasesRequest(),
            pb.LeaseLeasesResponse,
            idempotent=True,
        )
        return [s.id for s in reply.leases]

    async def keepalive_once(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Refresh a lease over the shared keepalive stream; returns its new TTL.

        Raises :class:`LeaseNotFoundError` when the lease is gone.
        """
        if self._keepalive is None:
            raise EtcdError("client is closed")
        return await self._keepalive.keepalive(lease_id, timeout or self.request_timeout)

    # --- cluster -------------------------------------------------------------------------

    async def status(self) -> MemberStatus:
        """Status of the member we are connected to."""
        reply = await self._call(
            "/etcdserverpb.Maintenance/Status",
            pb.StatusRequest(),
            pb.StatusResponse,
            idempotent=True,
        )
        h = reply.header or pb.ResponseHeader()
        return MemberStatus(
            self.current_endpoint,
            reply.version,
            reply.db_size,
            reply.leader,
            h.member_id,
            h.raft_term,
            h.revision,
            list(reply.errors),
            reply.db_size_in_use,
        )

    async def alarms(self) -> list[tuple[int, str]]:
        """Active alarms of the cluster: (member id, alarm name such as ``NOSPACE``)."""
        reply = await self._call(
            "/etcdserverpb.Maintenance/Alarm",
            pb.AlarmRequest(action=pb.AlarmRequestAlarmAction.GET),
            pb.AlarmResponse,
            idempotent=True,
        )
        return [(a.member_id, pb.AlarmType(a.alarm).name) for a in reply.alarms]

    async def disarm(self, member_id: int, alarm: str) -> None:
        """Deactivate one alarm (after the operator has fixed its cause)."""
        await self._call(
            "/etcdserverpb.Maintenance/Alarm",
            pb.AlarmRequest(
                action=pb.AlarmRequestAlarmAction.DEACTIVATE,
                member_id=member_id,
                alarm=pb.AlarmType[alarm],
            ),
            pb.AlarmResponse,
            idempotent=True,
        )

    async def defragment(self, *, timeout: float = 300.0) -> None:
        """Defragment the member we are connected to (it blocks that member meanwhile).

        Not retried on another endpoint: the caller picks the member (see
        :func:`lpmosd.etcd_ops.defragment_cluster`).
        """
        await self._transport.unary(
            "/etcdserverpb.Maintenance/Defragment",
            pb.DefragmentRequest(),
            pb.DefragmentResponse,
            timeout=timeout,
            metadata=self.metadata(),
        )

    async def member_list(self) -> list[tuple[int, str, list[str]]]:
        """(id, name, client URLs) of every member."""
        reply = await self._call(
            "/etcdserverpb.Cluster/MemberList",
            pb.MemberListRequest(),
            pb.MemberListResponse,
            idempotent=True,
        )
        return [(m.id, m.name, list(m.client_ur_ls)) for m in reply.members]

    # --- streams (used by watch.py and KeepAliveHub) -------------------------------------

    def open_stream(
        self,
        route: str,
        request_type: type[betterproto2.Message],
        reply_type: type[RepT],
        *extra_metadata: tuple[str, str],
        capacity: int = 1024,
    ) -> contextlib.AbstractAsyncContextManager[_bridge.BidiStream[betterproto2.Message, RepT]]:
        """A bidirectional stream on the current endpoint (internal to the etcd package)."""
        return self._transport.open_stream(
            route,
            request_type,
            reply_type,
            metadata=self.metadata(*extra_metadata),
            capacity=capacity,
        )

    @property
    def token_generation(self) -> int:
        """Bumped on each re-authentication (streams compare it to know they must refresh)."""
        return self._token_generation


class KeepAliveHub:
    """One LeaseKeepAlive stream shared by every lease of the client.

    ``keepalive(id)`` sends one request and waits for the answer with that id. The stream
    is re-opened (on the current endpoint) whenever it fails.
    """

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._stream: _bridge.BidiStream[betterproto2.Message, pb.LeaseKeepAliveResponse] | None = (
            None
        )
        self._ready = trio.Event()
        self._waiters: dict[int, list[_Waiter]] = {}
        #: Answers received on the current stream (a timed-out caller checks it moved).
        self._received = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the stream open until cancelled."""
        task_status.started()
        backoff = 0.05
        while True:
            try:
                async with self._client.open_stream(
                    "/etcdserverpb.Lease/LeaseKeepAlive",
                    pb.LeaseKeepAliveRequest,
                    pb.LeaseKeepAliveResponse,
                ) as stream:
                    self._stream = stream
                    self._received = 0
                    self._ready.set()
                    while True:
                        reply = await stream.receive()
                        self._received += 1
                        backoff = 0.05
                        for w in self._waiters.pop(reply.id, ()):
                            w.deliver(reply.ttl)
            except EtcdAuthError:
                # What was sent on the refused stream gets no answer: its callers re-send
                # on the next stream at once instead of waiting out their timeouts.
                self._fail_all(EtcdUnavailableError("keepalive stream re-authenticating"))
                await self._client.authenticate(self._client.token_generation)
            except EtcdError as exc:
                self._fail_all(exc)
            finally:
                self._stream = None
                self._ready = trio.Event()
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 1.0)

    def _fail_all(self, exc: EtcdError) -> None:
        waiters, self._waiters = self._waiters, {}
        for ws in waiters.values():
            for w in ws:
                w.fail(exc)

    def reset(self) -> None:
        """Drop the current stream (e.g. after a keepalive timed out on a hung member)."""
        if self._stream is not None:
            self._stream._finish(EtcdUnavailableError("keepalive stream reset"))

    async def keepalive(self, lease_id: int, timeout: float) -> int:
        """Refresh ``lease_id`` once; its new TTL. LeaseNotFoundError when it is gone.

        No answer within ``timeout`` raises :class:`EtcdUnavailableError`. The stream is
        shared by every lease: it is reset only when it looks hung — nothing received on
        it since this request went out — not because one caller ran out of time.
        """
        sent_on: object = None
        received_then = 0
        with trio.move_on_after(timeout):
            while True:
                await self._ready.wait()
                stream = self._stream
                if stream is None:
                    continue
                waiter = _Waiter()
                self._waiters.setdefault(lease_id, []).append(waiter)
                try:
                    sent_on, received_then = stream, self._received
                    stream.send(pb.LeaseKeepAliveRequest(id=lease_id))
                    ttl = await waiter.wait()
                except EtcdUnavailableError:
                    await trio.sleep(0.05)
                    continue
                finally:
                    ws = self._waiters.get(lease_id)
                    if ws and waiter in ws:
                        ws.remove(waiter)
                if ttl <= 0:
                    raise LeaseNotFoundError(f"lease {lease_id:x} not found")
                return ttl
        if sent_on is not None and sent_on is self._stream and self._received == received_then:
            self.reset()
        raise EtcdUnavailableError(f"lease {lease_id:x}: no keepalive answer in {timeout:.1f}s")


class _Waiter:
    __slots__ = ("_error", "_event", "_ttl")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._ttl = 0
        self._error: EtcdError | None = None

    def deliver(self, ttl: int) -> None:
        self._ttl = ttl
        self._event.set()

    def fail(self, exc: EtcdError) -> None:
        self._error = exc
        self._event.set()

    async def wait(self) -> int:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._ttl


@contextlib.asynccontextmanager
async def open_client(
    endpoints: Sequence[str],
    *,
    tls: _bridge.TLSFiles | None = None,
    auth: Auth | None = None,
    request_timeout: float = 10.0,
    keepalive_interval: float | None = 10.0,
    connect: bool = True,
) -> AsyncIterator[EtcdClient]:
    """Open a client to the etcd cluster at ``endpoints`` for the body's duration.

    With ``connect`` the client checks it can reach a member (and authenticates) before
    the body runs, so a wrong endpoint or password fails here, clearly.
    """
    transport = _bridge.Transport(endpoints, tls=tls, keepalive_interval=keepalive_interval)
    client = EtcdClient(transport, auth=auth, request_timeout=request_timeout)
    async with _bridge.ensure_loop():
        try:
            async with open_nursery() as nursery:
                hub = KeepAliveHub(client)
                client._keepalive = hub
                try:
                    if connect:
                        if auth is not None:
                            await client.authenticate()
                        await client.status()
                    await nursery.start(hub.run)
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            client._keepalive = None
            await transport.aclose()
