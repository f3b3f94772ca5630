"""Only lpmosd's errors leave the client: no ExceptionGroup, asyncio or grpclib type, ever.

Also: cancelling a call that etcd never answers is prompt and leaves no asyncio task.
"""

from __future__ import annotations

import asyncio
import random

import grpclib.const
import grpclib.exceptions
import pytest
import trio

from lpmosd.errors import (
    CompactedError,
    EtcdAuthError,
    EtcdError,
    EtcdRequestError,
    EtcdUnavailableError,
    LeaseNotFoundError,
)
from lpmosd.etcd import EtcdClient, open_client, open_lease, watch
from lpmosd.etcd._bridge import AmbiguousError, map_error
from lpmosd.etcd_process import EtcdProcess

from .helpers import assert_our_error, pending_asyncio_tasks, settle_asyncio

Loop = asyncio.AbstractEventLoop


class Boom(Exception):
    """The caller's own error."""


@pytest.mark.parametrize("own_loop", [True, False], ids=["client_opens_loop", "outer_loop"])
async def test_body_errors_pass_through_unwrapped(etcd: EtcdProcess, own_loop: bool) -> None:
    """The caller's exception leaves open_client / watch / open_lease as itself."""

    async def scenario() -> None:
        with pytest.raises(Boom):
            async with open_client(etcd.endpoints):
                raise Boom
        async with open_client(etcd.endpoints) as c:
            with pytest.raises(Boom):
                async with watch(c, "x/"):
                    raise Boom
            with pytest.raises(Boom):
                async with open_lease(c, 5):
                    raise Boom
            with pytest.raises(Boom):
                async with watch(c, "x/"), open_lease(c, 5):
                    raise Boom

    if own_loop:
        await scenario()
    else:
        import trio_asyncio

        async with trio_asyncio.open_loop():
            await scenario()


@pytest.mark.parametrize("own_loop", [True, False], ids=["client_opens_loop", "outer_loop"])
async def test_failures_are_single_errors(
    etcd: EtcdProcess, private_etcd: EtcdProcess, own_loop: bool
) -> None:
    """Every failure mode we can provoke raises one error of ours."""
    caught: list[BaseException] = []

    async def expect(exc_type: type[EtcdError], coro_fn) -> None:  # type: ignore[no-untyped-def]
        try:
            await coro_fn()
        except BaseException as exc:
            caught.append(exc)
            assert isinstance(exc, exc_type), repr(exc)
        else:
            raise AssertionError(f"no {exc_type.__name__}")

    async def scenario() -> None:
        async def unreachable() -> None:
            async with open_client(["http://127.0.0.1:1"]):
                pass

        await expect(EtcdUnavailableError, unreachable)

        async with open_client(etcd.endpoints) as c:
            await expect(EtcdRequestError, lambda: c.put("", "x"))
            await expect(EtcdRequestError, lambda: c.range("k", revision=10**9))
            await expect(LeaseNotFoundError, lambda: c.keepalive_once(12345))
            await expect(LeaseNotFoundError, lambda: c.put("k", "v", lease=12345))

        async with open_client(private_etcd.endpoints, request_timeout=0.3) as c:
            r = await c.put("k", "1")
            await c.put("k", "2")
            await c.compact(r.revision + 1)
            await expect(CompactedError, lambda: c.get("k", revision=r.revision))

            async def compacted_watch() -> None:
                async with watch(c, "k", start_revision=r.revision) as stream:
                    await stream.__anext__()

            await expect(CompactedError, compacted_watch)

            private_etcd.pause()
            try:
                await expect(EtcdUnavailableError, lambda: c.get("k"))
                await expect(EtcdUnavailableError, lambda: c.put("k", "3"))
                await expect(EtcdUnavailableError, lambda: c.keepalive_once(r.revision))
            finally:
                private_etcd.resume()

            await private_etcd.astop()
            await expect(EtcdUnavailableError, lambda: c.get("k"))
            await expect(EtcdUnavailableError, lambda: c.lease_grant(5))
            await private_etcd.astart()

    if own_loop:
        await scenario()
    else:
        import trio_asyncio

        async with trio_asyncio.open_loop():
            await scenario()
    for exc in caught:
        assert_our_error(exc)
        # nothing of asyncio's or grpclib's hides in the chain either
        link: BaseException | None = exc
        while link is not None:
            assert not isinstance(link, asyncio.CancelledError | BaseExceptionGroup)
            assert not type(link).__module__.startswith(("grpclib", "asyncio")), repr(link)
            link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)


async def test_cancel_calls_to_hung_etcd(private_etcd: EtcdProcess, aio_loop: Loop) -> None:
    """etcd frozen: cancelling unary calls, a watch and the client itself is prompt."""
    async with open_client(private_etcd.endpoints) as c:
        await c.put("k", "v")
        baseline = pending_asyncio_tasks(aio_loop)
        async with watch(c, "k") as stream:
            await stream.__anext__()
            private_etcd.pause()
            try:
                for call in (
                    lambda: c.get("k"),
                    lambda: c.put("k", "x"),
                    lambda: c.lease_grant(5),
                    stream.__anext__,
                ):
                    start = trio.current_time()
                    with trio.move_on_after(0.2) as scope:
                        await call()
                    assert scope.cancelled_caught
                    assert trio.current_time() - start < 0.5
            except BaseException:
                private_etcd.resume()
                raise
        leaked = await settle_asyncio(aio_loop, baseline)
        assert not leaked, leaked
        start = trio.current_time()
    # closing the client while etcd is still frozen (keepalive stream open) is prompt too
    assert trio.current_time() - start < 1
    private_etcd.resume()
    assert not pending_asyncio_tasks(aio_loop)


async def test_cancellation_storm(client: EtcdClient, aio_loop: Loop) -> None:
    """Calls cancelled at random points: nothing escapes, nothing leaks, client still works."""
    rng = random.Random(7)
    baseline = pending_asyncio_tasks(aio_loop)
    for i in range(300):
        with trio.move_on_after(rng.uniform(0, 0.003)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.put, f"s/{i % 10}", str(i))
                nursery.start_soon(client.get, f"s/{i % 10}")
                nursery.start_soon(client.atomic_update, "s/cas", lambda kv, i=i: b"%d" % i)
    leaked = await settle_asyncio(aio_loop, baseline)
    assert not leaked, leaked
    await client.put("s/after", "ok")
    assert (await client.range("s/", prefix=True)).count >= 1


def test_map_error_covers_grpc_statuses() -> None:
    """The boundary maps every gRPC status to our tree (unit check of the mapping)."""
    S = grpclib.const.Status
    cases: list[tuple[grpclib.exceptions.GRPCError, type[EtcdError]]] = [
        (
            grpclib.exceptions.GRPCError(S.UNAUTHENTICATED, "etcdserver: invalid auth token"),
            EtcdAuthError,
        ),
        (
            grpclib.exceptions.GRPCError(S.PERMISSION_DENIED, "etcdserver: permission denied"),
            EtcdAuthError,
        ),
        (
            grpclib.exceptions.GRPCError(
                S.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"
            ),
            EtcdAuthError,
        ),
        (
            grpclib.exceptions.GRPCError(
                S.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"
            ),
            CompactedError,
        ),
        (
            grpclib.exceptions.GRPCError(S.NOT_FOUND, "etcdserver: requested lease not found"),
            LeaseNotFoundError,
        ),
        (
            grpclib.exceptions.GRPCError(S.UNAVAILABLE, "etcdserver: no leader"),
            EtcdUnavailableError,
        ),
        (grpclib.exceptions.GRPCError(S.DEADLINE_EXCEEDED, None), EtcdUnavailableError),
        (
            grpclib.exceptions.GRPCError(S.INVALID_ARGUMENT, "etcdserver: too many operations"),
            EtcdRequestError,
        ),
        (
            grpclib.exceptions.GRPCError(S.RESOURCE_EXHAUSTED, "grpc: message too large"),
            EtcdRequestError,
        ),
    ]
    for status in S:
        cases.append((grpclib.exceptions.GRPCError(status, "x"), EtcdError))
    for exc, expected in cases:
        mapped = map_error(exc)
        assert isinstance(mapped, expected), (exc, mapped)
        assert_our_error(mapped)
    assert isinstance(map_error(ConnectionResetError(), sent=True), AmbiguousError)
    assert not isinstance(map_error(ConnectionRefusedError(), sent=False), AmbiguousError)
    assert isinstance(
        map_error(grpclib.exceptions.StreamTerminatedError("x")), EtcdUnavailableError
    )
    assert type(map_error(RuntimeError("odd"))) is EtcdError
