"""The lean agent path answers exactly as the Quart app on hypercorn does.

One daemon serves its regional with the lean server (the default); the same agent service
is also served by a second app on hypercorn. Every request goes to both, and status code,
body and the headers that matter must agree — successes, and the errors 400/401/403/404/
413/429 (and 431, 202-less paths) — for the hot routes the lean server answers itself and
for the rest it hands to the app.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    HARDWARE,
    bearer,
    make_config,
    open_control_api,
    open_daemon,
)

from lpmosd import hooks
from lpmosd.agent.client import AgentClient
from lpmosd.config import Config
from lpmosd.daemon import Daemon
from lpmosd.etcd_process import EtcdProcess
from lpmosd.roles.regional import Regional
from lpmosd.web.agent_app import FAST_PATH, create_agent_app
from lpmosd.web.agent_fast import AgentFastPath
from lpmosd.web.lean import serve_lean
from lpmosd.web.server import serve_app

API = "/api/v1/agent"
HEADERS = ("content-type", "retry-after", "www-authenticate")


@dataclass
class Pair:
    daemon: Daemon
    lean: httpx.AsyncClient
    quart: httpx.AsyncClient
    cp: httpx.AsyncClient


@contextlib.asynccontextmanager
async def open_pair(config: Config) -> AsyncIterator[Pair]:
    async with open_daemon(config) as daemon, trio.open_nursery() as nursery:
        regional = daemon.regional
        assert isinstance(regional, Regional)
        url = await nursery.start(
            lambda task_status: serve_app(
                create_agent_app(regional), host="127.0.0.1", port=0, task_status=task_status
            )
        )
        async with (
            open_control_api(daemon) as cp,
            httpx.AsyncClient(base_url=daemon.urls["regional"]) as lean,
            httpx.AsyncClient(base_url=url) as quart,
        ):
            yield Pair(daemon, lean, quart, cp)
        nursery.cancel_scope.cancel()


async def both(pair: Pair, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Send the request to both servers; they must answer alike. Returns the lean answer."""
    answers = []
    for client in (pair.lean, pair.quart):
        extra = dict(kwargs)
        if callable(extra.get("content")):
            extra["content"] = extra["content"]()  # a fresh generator per request
        answers.append(await client.request(method, path, **extra))
    lean, quart = answers
    assert lean.status_code == quart.status_code, (path, lean.text, quart.text)
    assert lean.content == quart.content, (path, lean.text, quart.text)
    for name in HEADERS:
        assert lean.headers.get(name) == quart.headers.get(name), (path, name)
    return lean


async def enrol(pair: Pair, sn: str, mac: str) -> str:
    r = await pair.cp.post("/api/v1/tasks", json={**GUIDE_TASK, "sn": sn, "mac": mac})
    assert r.status_code == 201, r.text
    secret = r.json()["enrollment_secret"]
    r = await pair.cp.post(f"/api/v1/tasks/dc1/{sn}/approve", json={})
    assert r.status_code == 200, r.text
    r = await pair.lean.post(
        f"{API}/register",
        json={"sn": sn, "mac": mac, "hardware": HARDWARE, "enrollment_secret": secret},
    )
    assert r.status_code == 200, r.text
    token = r.json()["agent_token"]
    assert isinstance(token, str)
    return token


async def test_same_answers(etcd: EtcdProcess, aio_loop: None) -> None:
    config = make_config(etcd.endpoints, agent_lease_ttl=10, heartbeat_interval=3)
    async with open_pair(config) as pair:
        token = await enrol(pair, "sn-001", GUIDE_TASK["mac"])
        other = await enrol(pair, "sn-002", "52:54:00:00:00:02")
        me = bearer(token)
        sn = f"{API}/sn-001"

        # Successes.
        r = await both(pair, "POST", f"{sn}/heartbeat", headers=me)
        assert r.status_code == 200 and r.json()["status"] == "approved"
        r = await both(pair, "POST", f"{sn}/progress", headers=me, json={"step": "s", "percent": 5})
        assert r.json() == {"status": "installing", "committed": True}
        r = await both(pair, "POST", f"{sn}/logs", headers=me, json={"lines": ["a", "b"]})
        assert r.status_code == 200
        key = {**me, "Idempotency-Key": "op-1"}
        await both(pair, "POST", f"{sn}/progress", headers=key, json={"step": "t", "percent": 1})

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"step": "c",'
            yield b' "percent": 7}'

        r = await both(pair, "POST", f"{sn}/progress", headers=me, content=chunked)
        assert r.status_code == 200

        # 401: no token, a bad scheme, an unknown token. 403: another server's token.
        r = await both(pair, "POST", f"{sn}/heartbeat")
        assert r.status_code == 401
        await both(pair, "POST", f"{sn}/progress", headers={"Authorization": "Basic x"})
        r = await both(pair, "POST", f"{sn}/logs", headers=bearer("nope"), json={"line": "x"})
        assert r.status_code == 401
        r = await both(pair, "POST", f"{sn}/heartbeat", headers=bearer(other))
        assert r.status_code == 403

        # 400: bad JSON, wrong shapes, unknown fields, a bad sn, a bad Idempotency-Key.
        for body in (b"{", b"[]", b"", b'{"step": "s"}', b'{"step": "s", "percent": 101}'):
            r = await both(pair, "POST", f"{sn}/progress", headers=me, content=body)
            assert r.status_code == 400, body
        r = await both(pair, "POST", f"{sn}/heartbeat", headers=me, json={"x": 1})
        assert r.status_code == 400
        r = await both(pair, "POST", f"{sn}/logs", headers=me, json={"line": "a", "lines": []})
        assert r.status_code == 400
        r = await both(pair, "POST", f"{API}/{'x' * 300}/progress", headers=me, json={})
        assert r.status_code == 400
        bad_key = {**me, "Idempotency-Key": "no spaces"}
        r = await both(pair, "POST", f"{sn}/progress", headers=bad_key, json={"step": "s"})
        assert r.status_code == 400
        r = await both(
            pair, "POST", f"{sn}/progress", headers=bad_key, json={"step": "s", "percent": 1}
        )
        assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key"

        # 404 and 405 (the app's routing, through the lean server's hand-off).
        r = await both(pair, "POST", f"{sn}/nothing", headers=me, json={})
        assert r.status_code == 404
        r = await both(pair, "GET", f"{sn}/progress", headers=me)
        assert r.status_code == 405
        r = await both(pair, "GET", f"{sn}/task", headers=me)
        assert r.status_code == 200
        r = await both(pair, "GET", "/healthz")
        assert r.json() == {"status": "ok"}

        # 413: a body over the limit (the connection is closed after the answer).
        big = json.dumps({"lines": ["x" * 1000] * 2000}).encode()
        r = await both(pair, "POST", f"{sn}/logs", headers=me, content=big)
        assert r.status_code == 413 and r.headers["connection"] == "close"

        # 401 naming the status: the task has ended, the token is revoked.
        r = await pair.lean.post(f"{sn}/complete", headers=me)
        assert r.status_code == 200, r.text
        r = await both(pair, "POST", f"{sn}/heartbeat", headers=me)
        assert r.status_code == 401 and r.json()["task_status"] == "completed"
        r = await both(pair, "POST", f"{sn}/progress", headers=me, json={"step": "s", "percent": 1})
        assert r.status_code == 401


async def test_rate_limit_answers_429_alike(etcd: EtcdProcess, aio_loop: None) -> None:
    config = make_config(etcd.endpoints, rate_limit_per_second=0.01, rate_limit_burst=2)
    async with open_pair(config) as pair:
        codes = []
        for _ in range(3):
            r = await both(pair, "POST", f"{API}/sn-001/heartbeat", headers=bearer("x"))
            codes.append(r.status_code)
        assert codes == [401, 401, 429]
        assert int(r.headers["retry-after"]) >= 1


async def test_malformed_requests(etcd: EtcdProcess, aio_loop: None) -> None:
    """What the lean server refuses itself: never a hang, never a 500."""
    config = make_config(etcd.endpoints)
    async with open_daemon(config) as daemon:
        url = httpx.URL(daemon.urls["regional"])
        assert url.port is not None

        async def raw(data: bytes) -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", url.port or 0)
            async with stream:
                await stream.send_all(data)
                out = b""
                with trio.fail_after(5):
                    while chunk := await stream.receive_some(65536):
                        out += chunk
                return out

        huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await raw(huge)).startswith(b"HTTP/1.1 431 ")
        assert (await raw(b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw(b"GET / HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 505 ")
        both_lengths = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n"
        answer = await raw(b"POST /api/v1/agent/x/progress HTTP/1.1\r\n" + both_lengths + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        # curl's Expect: 100-continue is answered before the body is sent.
        expect = (
            b"POST /api/v1/agent/sn-001/heartbeat HTTP/1.1\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n"
        )
        stream = await trio.open_tcp_stream("127.0.0.1", url.port or 0)
        async with stream:
            await stream.send_all(expect)
            with trio.fail_after(5):
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100 Continue")
                # Two requests on one connection, the second after the first's answer; then close.
        two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
        answer = await raw(two + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 ") == 3


@pytest.mark.parametrize("server", ["lean", "hypercorn"])
async def test_http_server_setting(etcd: EtcdProcess, aio_loop: None, server: str) -> None:
    config = make_config(etcd.endpoints)
    assert config.regional is not None
    regional = dataclasses.replace(config.regional, http_server=server)
    async with (
        open_daemon(dataclasses.replace(config, regional=regional)) as daemon,
        httpx.AsyncClient(base_url=daemon.urls["regional"]) as http,
    ):
        r = await http.post(f"{API}/sn-001/heartbeat")
        assert r.status_code == 401
        assert ("date" in r.headers) and ("server" not in r.headers)


async def test_overload_answers_429_and_the_agent_retries(
    etcd: EtcdProcess, aio_loop: None
) -> None:
    """One write at a time, one queued: the next is refused 429 + Retry-After by both
    servers, nothing written; the real agent retries after it and its report lands."""
    config = make_config(etcd.endpoints)
    assert config.regional is not None
    tight = dataclasses.replace(config.regional, max_active_writes=1, max_queued_writes=1)
    async with (
        open_daemon(dataclasses.replace(config, regional=tight)) as daemon,
        trio.open_nursery() as nursery,
    ):
        regional = daemon.regional
        assert isinstance(regional, Regional)
        app = create_agent_app(regional)
        fast = app.extensions[FAST_PATH]
        assert isinstance(fast, AgentFastPath)
        lean_url = await nursery.start(
            partial(serve_lean, app.asgi_app, fast, host="127.0.0.1", port=0, max_body=1 << 20)
        )
        quart_url = await nursery.start(partial(serve_app, app, host="127.0.0.1", port=0))
        async with (
            open_control_api(daemon) as cp,
            httpx.AsyncClient(base_url=lean_url) as lean,
            httpx.AsyncClient(base_url=quart_url) as quart,
        ):
            pair = Pair(daemon, lean, quart, cp)
            tokens = [await enrol(pair, f"sn-00{i}", f"52:54:00:00:00:0{i}") for i in (1, 2, 3)]
            held, release = trio.Event(), trio.Event()

            async def hold() -> None:
                held.set()
                await release.wait()

            async def report(i: int) -> None:
                r = await lean.post(
                    f"{API}/sn-00{i}/progress",
                    headers=bearer(tokens[i - 1]),
                    json={"step": "s", "percent": i},
                )
                assert r.status_code == 200, r.text

            with hooks.install("writer.before-txn", hold):
                nursery.start_soon(report, 1)
                await held.wait()  # the one active write is held in the writer
                nursery.start_soon(report, 2)
                while fast.admission.limiter.statistics().tasks_waiting < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                body = {"step": "s", "percent": 3}
                r = await both(
                    pair, "POST", f"{API}/sn-003/progress", headers=bearer(tokens[2]), json=body
                )
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert "overloaded" in r.json()["error"]

                async with AgentClient(lean_url, "sn-003") as agent:
                    agent._token = tokens[2]  # registered above, as the agent had
                    done = trio.Event()

                    async def agent_report() -> None:
                        await agent.progress("s", 33, "")
                        done.set()

                    started = trio.current_time()
                    nursery.start_soon(agent_report)
                    await trio.sleep(0.2)
                    release.set()
                    with trio.fail_after(10):
                        await done.wait()
                    assert trio.current_time() - started >= 1.0  # after its Retry-After
            task = (await cp.get("/api/v1/tasks/dc1/sn-003")).json()
            assert {p["step"]: p["percent"] for p in task["progress"]}["s"] == 33
        nursery.cancel_scope.cancel()
