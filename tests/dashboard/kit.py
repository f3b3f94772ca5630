"""Helpers of the dashboard tests: a daemon on its own thread, logins, SSE parsing.

The browser tests drive Chromium with Playwright's *sync* API from the test's thread, so
the daemon cannot share that thread's event loop: :class:`DaemonThread` runs
:func:`~lpmosd.daemon.run_daemon` under ``trio.run`` on a thread of its own (with its own
trio-asyncio loop for etcd) and lets the test call into it (create tokens, start agents).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import outcome
import trio
from provisioning_kit import make_config

from lpmosd.agent.facts import HardwareFacts
from lpmosd.config import ROLE_CONTROL_PLANE, ROLE_REGIONAL, Config
from lpmosd.daemon import Daemon, run_daemon
from lpmosd.documents import Disk, Dmi, Nic
from lpmosd.etcd import ensure_loop
from lpmosd.plan import Plan, PlanStep
from lpmosd.store import Store
from lpmosd.tokens import Role, TokenStore

T = TypeVar("T")

MAC = "00:1a:2b:3c:4d:5e"
#: HTTP timeout of the tests' clients: generous, for CI machines under load.
TIMEOUT = 30.0

#: A machine as the test agents report it (no /proc or /sys reading: fast and stable).
FACTS = HardwareFacts(
    cpu_model="Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz",
    cpu_cores=56,
    memory_bytes=256 * 1024**3,
    disks=(Disk(name="sda", size_bytes=960 * 10**9, model="SAMSUNG MZ7LH960", rotational=False),),
    nics=(Nic(name="eno1", mac=MAC, speed_mbps=25000),),
    dmi=Dmi(vendor="Dell Inc.", product="PowerEdge R750", serial="SN001"),
    default_mac=MAC,
)


def quick_config(endpoints: list[str], *, step_seconds: float = 0.4, **kwargs: Any) -> Config:
    """Both roles on ephemeral loopback ports; the demo plan's six steps ``step_seconds`` each."""
    config = make_config(endpoints, roles=frozenset({ROLE_CONTROL_PLANE, ROLE_REGIONAL}), **kwargs)
    assert config.regional is not None
    demo = Plan(
        os_type="demo",
        steps=tuple(
            PlanStep(name=name, timeout=30.0, simulate=step_seconds)
            for name in ("partitioning", "base_system", "packages", "bootloader", "network")
        ),
    )
    return dataclasses.replace(
        config, regional=dataclasses.replace(config.regional, plans={"demo": demo})
    )


class DaemonThread:
    """``run_daemon(config)`` on a thread of its own, for synchronous (browser) tests."""

    def __init__(self, config: Config, *, start_timeout: float = 30) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._daemon: Daemon | None = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._calls: trio.MemorySendChannel[tuple[Callable[..., Any], tuple[Any, ...]]]
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    @property
    def daemon(self) -> Daemon:
        """The running daemon (its roles, client and URLs)."""
        assert self._daemon is not None
        return self._daemon

    @property
    def store(self) -> Store:
        """Store operations over the daemon's etcd client (use through :meth:`call`)."""
        return Store(self.daemon.client)

    @property
    def control_url(self) -> str:
        """Base URL of the control plane (API + dashboard)."""
        return self.daemon.urls["control-plane"]

    @property
    def regional_url(self) -> str:
        """Base URL of the regional (agent API + status page)."""
        return self.daemon.urls["regional"]

    async def _main(self) -> None:
        try:
            async with ensure_loop(), trio.open_nursery() as nursery:
                self._daemon = await nursery.start(run_daemon, self.config)
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                send, receive = trio.open_memory_channel[
                    tuple[Callable[..., Any], tuple[Any, ...]]
                ](100)
                self._calls = send
                nursery.start_soon(self._dispatch, receive)
                self._ready.set()
                await trio.sleep_forever()
        except BaseException as exc:  # reported to the test thread by __enter__
            self._error = exc
            self._ready.set()
            if not isinstance(exc, trio.Cancelled | KeyboardInterrupt):
                raise

    async def _dispatch(
        self, receive: trio.MemoryReceiveChannel[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> None:
        # Tasks started from here run inside ensure_loop()'s context, so they can reach
        # etcd (a task trio.from_thread starts directly would not see the asyncio loop).
        assert self._nursery is not None
        async for fn, args in receive:
            self._nursery.start_soon(fn, *args)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise RuntimeError(f"the daemon did not start within {self.start_timeout} s")
        if self._error is not None:
            raise RuntimeError("the daemon failed to start") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nursery is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(20)
        assert not self._thread.is_alive(), "the daemon did not stop within 20 s"

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = 60) -> T:
        """Run ``await fn(*args)`` beside the daemon and return its result (or raise)."""
        done: queue.Queue[outcome.Outcome[T]] = queue.Queue(maxsize=1)

        async def run() -> None:
            done.put(await outcome.acapture(fn, *args))

        self.spawn(run)
        return done.get(timeout=timeout).unwrap()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` as a task beside the daemon (cancelled when it stops)."""
        trio.from_thread.run_sync(self._calls.send_nowait, (fn, args), trio_token=self._token)

    def token(self, name: str, role: Role) -> str:
        """A fresh operator token (stored hashed in etcd, as ``lpmosd token create`` does)."""

        async def create() -> str:
            _, token = await TokenStore(self.daemon.client).create(
                name, role, actor="test", replace_active=True
            )
            return token

        return self.call(create)


def login(http: httpx.Client, token: str) -> str:
    """Log ``http`` in through ``/login`` (it keeps the session cookie); returns the CSRF
    token of the session, read from the dashboard page."""
    r = http.post("/login", data={"token": token, "next": "/"})
    assert r.status_code == 303, r.text
    page = http.get("/")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    """The ``<meta name="csrf-token">`` of a dashboard page."""
    marker = '<meta name="csrf-token" content="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def since_of(html: str) -> str:
    """The event id a dashboard page was rendered at (``data-since``)."""
    marker = 'data-since="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


@dataclasses.dataclass
class SseEvent:
    """One server-sent event."""

    id: str
    event: str
    data: dict[str, Any]


def read_events(
    http: httpx.Client,
    path: str,
    *,
    count: int,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
    skip: tuple[str, ...] = ("hello", "counts"),
) -> list[SseEvent]:
    """Open ``path`` as an event stream and return its first ``count`` events, leaving out
    the kinds in ``skip`` (by default the stream's greeting and the table's counts)."""
    events: list[SseEvent] = []
    with http.stream("GET", path, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for fields in _frames(r.iter_lines()):
            if "event" in fields and fields["event"] not in skip:
                data = json.loads(fields["data"])
                events.append(SseEvent(fields.get("id", ""), fields["event"], data))
                if len(events) == count:
                    break
    return events


def _frames(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
