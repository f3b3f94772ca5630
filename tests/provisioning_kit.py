"""Shared helpers of the provisioning tests (store, view, roles, web, e2e).

Fixture-free on purpose: each test directory's conftest builds its fixtures from these.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import trio

from lpmosd.boot.ostypes import OsTypes
from lpmosd.config import (
    ROLE_CONTROL_PLANE,
    ROLE_REGIONAL,
    Config,
    ControlPlaneConfig,
    EtcdConfig,
    RegionalConfig,
)
from lpmosd.daemon import Daemon, run_daemon
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.plan import DEMO_PLAN, Plan
from lpmosd.store import Store
from lpmosd.timestamps import utcnow
from lpmosd.tokens import Role, TokenStore

#: The guide's curl body, verbatim.
GUIDE_TASK: dict[str, Any] = {
    "idc": "dc1",
    "sn": "sn-001",
    "mac": "00:1a:2b:3c:4d:5e",
    "os_type": "Ubuntu 22.04",
    "os_version": "22.04",
}

#: The plans of the test regionals: the demo plan, and the same simulated steps under the
#: os_types the tests' task bodies use (the guide's own among them).
TEST_PLANS: dict[str, Plan] = {
    name: Plan(os_type=name, steps=DEMO_PLAN.steps)
    for name in ("demo", "Ubuntu 22.04", "Debian 12")
}


async def publish_os_types(daemon: Daemon, idc: str, os_types: tuple[str, ...]) -> None:
    """What a regional of ``idc`` offering ``os_types`` publishes (for control-plane-only
    tests: without it the control plane refuses every task of the IDC)."""
    # A client of our own: the daemon's may live in another task's trio-asyncio loop.
    async with open_client(daemon.client.endpoints) as client:
        await Store(client).publish_os_types(
            idc, OsTypes(os_types=os_types, published_at=utcnow(), regional_url="")
        )


#: A plausible hardware report, as the agent sends it.
HARDWARE: dict[str, Any] = {
    "cpu_model": "Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz",
    "cpu_cores": 28,
    "memory_bytes": 256 * 1024**3,
    "disks": [
        {"name": "sda", "size_bytes": 960 * 10**9, "model": "SAMSUNG MZ7LH960", "rotational": False}
    ],
    "nics": [{"name": "eno1", "mac": "00:1a:2b:3c:4d:5e", "speed_mbps": 25000}],
    "dmi": {"vendor": "Dell Inc.", "product": "PowerEdge R750", "serial": "SN001"},
}

#: Keyspace snapshot: key -> (value, mod_revision, lease).
Snapshot = dict[bytes, tuple[bytes, int, int]]


async def keyspace(client: EtcdClient) -> Snapshot:
    """Every key of the cluster (the ``""`` prefix) with its value, mod revision and lease.

    etcd refuses an empty key, so "everything" is the range ``["\\0", "\\0")`` (all keys).
    """
    result = await client.range(b"\0", range_end=b"\0")
    assert not result.more
    return {kv.key: (kv.value, kv.mod_revision, kv.lease) for kv in result.kvs}


def free_port() -> int:
    """A TCP port free on the loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_config(
    endpoints: list[str],
    *,
    roles: frozenset[str] = frozenset({ROLE_CONTROL_PLANE, ROLE_REGIONAL}),
    idc: str = "dc1",
    control_plane_port: int = 0,
    regional_port: int = 0,
    agent_lease_ttl: int = 30,
    heartbeat_interval: int = 10,
    session_ttl: int = 10,
    request_timeout: float = 10.0,
    rate_limit_per_second: float = 100_000.0,
    rate_limit_burst: int = 100_000,
    state_dir: Path | None = None,
) -> Config:
    """A loopback config like ``dev_config`` but with any port (0: ephemeral) and TTLs.

    Every test client comes from 127.0.0.1, so the agent API's per-IP rate limit is lifted
    unless a test asks for one.
    """
    return Config(
        roles=roles,
        log_format="text",
        etcd=EtcdConfig(endpoints=tuple(endpoints), request_timeout=request_timeout),
        control_plane=ControlPlaneConfig(listen="127.0.0.1", port=control_plane_port)
        if ROLE_CONTROL_PLANE in roles
        else None,
        regional=RegionalConfig(
            idc=idc,
            listen="127.0.0.1",
            port=regional_port,
            agent_lease_ttl=agent_lease_ttl,
            heartbeat_interval=heartbeat_interval,
            session_ttl=session_ttl,
            rate_limit_per_second=rate_limit_per_second,
            rate_limit_burst=rate_limit_burst,
            # The regional's journal: never the system's /var/lib/lpmosd in tests.
            state_dir=state_dir or Path(tempfile.mkdtemp(prefix="lpmosd-test-state-")),
            plans=TEST_PLANS,
        )
        if ROLE_REGIONAL in roles
        else None,
    )


@contextlib.asynccontextmanager
async def open_daemon(config: Config) -> AsyncIterator[Daemon]:
    """Run the daemon in this process for the body, then stop it."""
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, config)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Poll ``predicate`` until true; returns the trio time it became true."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return trio.current_time()
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class TcpProxy:
    """A loopback TCP forwarder to ``target_port`` that a test can cut and heal.

    ``cut()`` aborts every forwarded connection and refuses new ones (accept, then close at
    once) until ``heal()``. ``freeze()`` keeps connections open but stops moving bytes,
    like a hung peer, until ``heal()``.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._blocked = False
        self._frozen = trio.Event()
        self._frozen.set()  # set == flowing
        self._scopes: set[trio.CancelScope] = set()
        self._responses = trio.Event()
        self._responses.set()  # set == flowing

    @property
    def endpoint(self) -> str:
        """The proxy's client URL."""
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`heal`."""
        self._blocked = True
        for scope in list(self._scopes):
            scope.cancel()

    def freeze(self) -> None:
        """Stop forwarding bytes (connections stay open) until :meth:`heal`."""
        self._frozen = trio.Event()

    def hold_responses(self) -> None:
        """Forward requests to etcd but hold its answers back until :meth:`heal` or :meth:`cut`.

        With a cut after that, the client's request was applied but its answer is lost:
        the ambiguous outcome of a write.
        """
        self._responses = trio.Event()

    def heal(self) -> None:
        """Accept and forward again."""
        self._blocked = False
        self._frozen.set()
        self._responses.set()

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream, answers: bool) -> None:
        while True:
            data = await src.receive_some(65536)
            await self._frozen.wait()
            if answers:
                await self._responses.wait()
            if not data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await dst.send_eof()
                return
            await dst.send_all(data)

    async def _handle(self, conn: trio.SocketStream) -> None:
        async with conn:
            if self._blocked:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, conn, upstream, False)
                        nursery.start_soon(self._pipe, upstream, conn, True)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                finally:
                    self._scopes.discard(scope)
            # Abort (RST) rather than a clean close, like a lost connection.
            with contextlib.suppress(OSError):
                conn.socket.setsockopt(
                    trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
                )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            task_status.started()


@contextlib.asynccontextmanager
async def open_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` to ``target_port`` for the body."""
    proxy = TcpProxy(target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ authentication


async def create_token(
    client: EtcdClient,
    role: Role = Role.ADMIN,
    name: str | None = None,
    *,
    expires_in: timedelta | None = None,
) -> str:
    """A fresh operator API token (named ``test-<role>`` unless ``name`` is given)."""
    _, token = await TokenStore(client).create(
        name or f"test-{role.label}",
        role,
        actor="test",
        expires_in=expires_in,
        replace_active=True,
    )
    return token


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of a bearer token."""
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def open_control_api(
    daemon: Daemon, role: Role = Role.ADMIN, name: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the daemon's control plane, authenticated with a fresh token."""
    # A client of our own: the daemon's may live in another task's trio-asyncio loop.
    async with open_client(daemon.client.endpoints) as client:
        token = await create_token(client, role, name)
    async with httpx.AsyncClient(
        base_url=daemon.urls["control-plane"], headers=bearer(token)
    ) as http:
        yield http


async def enrol(client: EtcdClient, idc: str, sn: str) -> str:
    """A fresh enrolment secret for the live task of ``sn`` (as ``POST …/enrollment``)."""
    _, secret = await Store(client).reissue_enrolment(idc, sn, actor="test")
    return secret


async def register_agent(
    http: httpx.AsyncClient,
    *,
    sn: str,
    mac: str,
    secret: str,
    hardware: dict[str, Any] | None = None,
) -> tuple[httpx.Response, dict[str, str]]:
    """``POST /api/v1/agent/register``; returns the answer and the bearer header of the
    agent token it issued (empty when refused)."""
    r = await http.post(
        "/api/v1/agent/register",
        json={
            "sn": sn,
            "mac": mac,
            "hardware": HARDWARE if hardware is None else hardware,
            "enrollment_secret": secret,
        },
    )
    token = r.json().get("agent_token") if r.status_code == 200 else None
    return r, bearer(token) if token else {}
