"""Simulated agents for the fleet benchmarks: the real agent's HTTP calls, cheaply.

Thousands of agents share one load-generating process, so the HTTP client here is a
minimal HTTP/1.1 keep-alive client on Trio sockets (two connections per agent, as a real
agent's connection pool has when a heartbeat overlaps a report; one with ``one_connection``,
for fleets of 10,000 whose 20,000 sockets would pass the file-descriptor limit), not httpx:
the load generator must cost far less CPU than what it measures.
Each agent makes the calls :mod:`lpmosd.agent` makes: ``register`` (with the enrolment
secret and bearer token when the API hands them out), ``progress`` per step, ``logs``,
``heartbeat`` every interval, ``complete``. A 429 or 503 is retried after its
``Retry-After`` (plus up to 50 % jitter, as the real agent does), else after a short backoff.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

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

API = "/api/v1/agent"
#: Seconds a simulated agent keeps retrying a call (the real agent's RetryPolicy.total).
GIVE_UP_AFTER = 600.0


class HttpError(Exception):
    """The connection failed before a whole response arrived."""


class HttpConn:
    """One HTTP/1.1 keep-alive connection (reconnects when the server closed it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()
        #: The headers of the last response (lower-case names).
        self.last_headers: dict[str, str] = {}

    async def aclose(self) -> None:
        """Close the connection."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _receive_some(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise HttpError("connection closed by the server")
        self._buf += data

    async def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            await self._receive_some()
        head = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buf) < length:
            await self._receive_some()
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return status, headers, body

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and read its response: ``(status, body)``.

        A request on a keep-alive connection that the server had closed meanwhile is sent
        once more on a fresh connection (only when no byte of a response had arrived).
        """
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        data = body or b""
        req = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
        ).encode("latin-1") + data
        for attempt in (0, 1):
            fresh = self._stream is None
            if self._stream is None:
                self._stream = await trio.open_tcp_stream(self.host, self.port)
                self._buf.clear()
            try:
                await self._stream.send_all(req)
                status, resp_headers, resp_body = await self._read_response()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, HttpError) as exc:
                partial = bool(self._buf)
                await self.aclose()
                if attempt == 0 and not fresh and not partial:
                    continue
                raise HttpError(f"{method} {path}: {exc}") from exc
            if resp_headers.get("connection", "").lower() == "close":
                await self.aclose()
            self.last_headers = resp_headers
            return status, resp_body
        raise AssertionError("unreachable")


@dataclass(eq=False)
class FleetStats:
    """What every simulated agent records (shared: one object for the whole fleet)."""

    #: (send time, latency) of each acknowledged progress report (perf_counter seconds).
    progress: list[tuple[float, float]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    heartbeats: int = 0
    #: (send time, latency) of every answered request of any kind (the agent-seen latency).
    requests: list[tuple[float, float]] = field(default_factory=list)
    #: Log reports acknowledged.
    logs: int = 0
    #: Installs that did not complete (a call failed for good).
    failed: int = 0
    #: sn -> wall-clock send time of the last heartbeat the regional acknowledged.
    last_heartbeat: dict[str, float] = field(default_factory=dict)
    completed: int = 0

    def note(self, kind: str, status: int, latency: float) -> None:
        """Count one answered request."""
        self.statuses[f"{kind} {status}"] += 1
        if 200 <= status < 300:
            self.latencies.setdefault(kind, []).append(latency)
            self.requests.append((time.perf_counter() - latency, latency))


@dataclass(eq=False)
class SimAgent:
    """One simulated agent, talking to the regional at ``host:port``."""

    host: str
    port: int
    sn: str
    mac: str
    stats: FleetStats
    enrollment_secret: str | None = None
    token: str | None = None
    heartbeat_interval: float = 10.0
    #: Heartbeats share the reports' connection (one socket per agent).
    one_connection: bool = False
    conn: HttpConn = field(init=False)
    #: Heartbeats go on a connection of their own, as from a real agent's connection pool:
    #: a heartbeat must not wait behind a slow progress report (its lease would lapse).
    hb_conn: HttpConn = field(init=False)
    _lock: trio.Lock = field(init=False, default_factory=trio.Lock)
    _hb_lock: trio.Lock = field(init=False, default_factory=trio.Lock)

    def __post_init__(self) -> None:
        self.conn = HttpConn(self.host, self.port)
        self.hb_conn = self.conn if self.one_connection else HttpConn(self.host, self.port)
        if self.one_connection:
            self._hb_lock = self._lock

    async def aclose(self) -> None:
        """Close the connections."""
        await self.conn.aclose()
        await self.hb_conn.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(
        self,
        kind: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> tuple[int, dict[str, Any]]:
        """One API call, retried on 429/503 and connection failures for up to
        ``give_up_after`` seconds, as the real agent does (0: one attempt)."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        conn, lock = (
            (self.hb_conn, self._hb_lock) if kind == "heartbeat" else (self.conn, self._lock)
        )
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            last = time.perf_counter() - started >= give_up_after
            t0 = time.perf_counter()
            try:
                async with lock:  # one HTTP/1.1 connection: one request at a time
                    status, raw = await conn.request("POST", path, data, self._headers())
            except HttpError as exc:
                self.stats.errors.append(f"{kind}: {exc}")
                if last:
                    return 0, {}
                await trio.sleep(min(1.0, 0.05 * 2**attempt))
                continue
            latency = time.perf_counter() - t0
            self.stats.note(kind, status, latency)
            if status in (429, 503) and not last:
                await trio.sleep(retry_delay(conn.last_headers.get("retry-after"), attempt))
                continue
            try:
                parsed = json.loads(raw) if raw else {}
            except ValueError:
                parsed = {}
            return status, parsed if isinstance(parsed, dict) else {}

    async def register(self) -> bool:
        """``POST /register``; keeps the agent token when one is handed out."""
        body: dict[str, Any] = {"sn": self.sn, "mac": self.mac, "hardware": HARDWARE}
        if self.enrollment_secret is not None:
            body["enrollment_secret"] = self.enrollment_secret
        status, reply = await self.call("register", f"{API}/register", body)
        if status != 200:
            self.stats.errors.append(f"register {self.sn}: {status} {reply}")
            return False
        token = reply.get("agent_token")
        self.token = token if isinstance(token, str) else None
        return True

    async def heartbeat(self) -> bool:
        """``POST /{sn}/heartbeat``; records its send time when acknowledged."""
        sent = time.time()
        status, _ = await self.call(
            "heartbeat", f"{API}/{self.sn}/heartbeat", None, give_up_after=0
        )
        if status == 200:
            self.stats.heartbeats += 1
            self.stats.last_heartbeat[self.sn] = sent
            return True
        if status == 409:
            # The lease is gone (e.g. it lapsed while the regional was down): the real agent
            # registers again with its secret and token, and so does this one.
            return await self.register()
        return False

    async def heartbeat_loop(self, stop: trio.Event) -> None:
        """Heartbeat every interval until ``stop`` is set."""
        while not stop.is_set():
            with trio.move_on_after(self.heartbeat_interval):
                await stop.wait()
            if not stop.is_set():
                await self.heartbeat()

    async def progress(self, step: str, percent: int, message: str) -> bool:
        """``POST /{sn}/progress``; records the agent-seen latency."""
        t0 = time.perf_counter()
        status, reply = await self.call(
            "progress",
            f"{API}/{self.sn}/progress",
            {"step": step, "percent": percent, "message": message},
        )
        if status not in (200, 202):  # 202: journaled (etcd away), applied later
            self.stats.errors.append(f"progress {self.sn} {step}: {status} {reply}")
            return False
        self.stats.progress.append((t0, time.perf_counter() - t0))
        return True

    async def logs(self, lines: list[str]) -> bool:
        """``POST /{sn}/logs``."""
        status, reply = await self.call("logs", f"{API}/{self.sn}/logs", {"lines": lines})
        if status not in (200, 202):
            self.stats.errors.append(f"logs {self.sn}: {status} {reply}")
            return False
        self.stats.logs += 1
        return True

    async def complete(self) -> bool:
        """``POST /{sn}/complete``."""
        status, reply = await self.call("complete", f"{API}/{self.sn}/complete", None)
        if status not in (200, 202):
            self.stats.errors.append(f"complete {self.sn}: {status} {reply}")
            return False
        self.stats.completed += 1
        return True

    async def install(self, steps: int, *, pace: float = 0.0, log_every: int = 0) -> None:
        """The whole install: register, ``steps`` progress reports, complete; heartbeats.

        ``pace`` 0 is the closed loop (each report as soon as the previous one is answered);
        otherwise reports are ``pace`` seconds apart on average (uniformly 0-2x, so agents
        do not march in step). ``log_every`` k > 0 adds a log report after every k-th step.
        """
        ok = False
        try:
            if not await self.register():
                return
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.heartbeat_loop, stop)
                try:
                    ok = await self._reports(steps, pace, log_every)
                finally:
                    stop.set()
        finally:
            if not ok:
                self.stats.failed += 1
            await self.aclose()

    async def _reports(self, steps: int, pace: float, log_every: int) -> bool:
        for k in range(1, steps + 1):
            if pace:
                await trio.sleep(random.uniform(0, 2 * pace))
            if not await self.progress(f"step{k:02d}", 100, f"step {k} of {steps}"):
                return False
            if log_every and k % log_every == 0:
                if pace:
                    await trio.sleep(random.uniform(0, 2 * pace))
                if not await self.logs([f"step {k}: line {i}" for i in range(8)]):
                    return False
        return await self.complete()


def retry_delay(retry_after: str | None, attempt: int) -> float:
    """How long a simulated agent waits before retrying a 429/503: the server's
    ``Retry-After`` plus up to 50 % jitter (so refused agents do not all come back in the
    same instant), else a short exponential backoff."""
    try:
        wait = float(retry_after) if retry_after is not None else None
    except ValueError:
        wait = None
    if wait is not None and wait >= 0:
        return wait * random.uniform(1.0, 1.5)
    backoff: float = min(1.0, 0.05 * 2**attempt)
    return backoff * random.uniform(0.8, 1.2)


def step_names(steps: int) -> list[str]:
    """The step names :meth:`SimAgent.install` reports."""
    return [f"step{k:02d}" for k in range(1, steps + 1)]


def agent_mac(n: int) -> str:
    """A unique MAC for agent number ``n``."""
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))
