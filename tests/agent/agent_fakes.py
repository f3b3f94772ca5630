"""An in-memory regional implementing the agent API contract, for agent tests.

It runs inside the test's process as an :class:`httpx.MockTransport`, so tests can flip it
"down" (connection refused) or "restarting" (503), revoke tokens, cancel or approve tasks,
and inspect every call the agent made.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

API = "/api/v1/agent"

DEMO_PLAN: dict[str, Any] = {
    "name": "demo",
    "steps": [
        {"name": "partitioning", "command": [], "timeout": 60, "simulate": 0.05},
        {"name": "base_system", "command": [], "timeout": 60, "simulate": 0.05},
        {"name": "bootloader", "command": [], "timeout": 60, "simulate": 0.05},
    ],
}


@dataclass
class FakeTask:
    """A task as the fake regional keeps it."""

    sn: str
    mac: str
    status: str = "pending"
    task_id: str = "task-001"
    idc: str = "dc1"
    os_type: str = "demo"
    os_version: str = "1"
    disk_layout: str = "auto"
    network_config: str = "dhcp"
    resume_from: str | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None
    hardware: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "idc": self.idc,
            "sn": self.sn,
            "mac": self.mac,
            "os_type": self.os_type,
            "os_version": self.os_version,
            "disk_layout": self.disk_layout,
            "network_config": self.network_config,
            "status": self.status,
            "approval": None,
            "resume_from": self.resume_from,
            "progress": self.progress,
        }

    def percent(self, step: str) -> int | None:
        for p in self.progress:
            if p["step"] == step:
                return int(p["percent"])
        return None

    @property
    def log_lines(self) -> list[str]:
        return [line for _, line in self.logs]


class FakeRegional:
    """The agent API over a dict of tasks; see the module docstring."""

    def __init__(
        self,
        *,
        plan: dict[str, Any] | None = None,
        heartbeat_interval: float = 0.05,
        issue_tokens: bool = False,
        secret: str | None = None,
    ) -> None:
        self.tasks: dict[str, FakeTask] = {}
        self.plan: dict[str, Any] | None = DEMO_PLAN if plan is None else plan
        self.serve_plan = True
        self.heartbeat_interval = heartbeat_interval
        self.issue_tokens = issue_tokens
        self.secret = secret
        self.tokens: dict[str, str] = {}  # token -> sn
        self.down = False  # connection refused
        self.unavailable = 0  # answer this many calls with 503
        self.calls: list[tuple[str, str, Any]] = []
        self.progress_calls: list[tuple[str, int]] = []
        self.log_batches: list[list[str]] = []
        self.registrations = 0
        self.heartbeats = 0
        self.lease_lost: set[str] = set()  # heartbeats of these sns get 409 until re-register

    def add_task(self, sn: str = "sn-001", mac: str = "00:1a:2b:3c:4d:5e", **kw: Any) -> FakeTask:
        task = FakeTask(sn=sn, mac=mac, **kw)
        self.tasks[sn] = task
        return task

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @staticmethod
    def _error(status: int, message: str, field_: str | None = None) -> httpx.Response:
        return httpx.Response(status, json={"error": message, "field": field_})

    def _payload(self, task: FakeTask) -> dict[str, Any]:
        return {"task": task.view(), "plan": self.plan if self.serve_plan else None}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler."""
        return self.handle_sync(request)

    def handle_sync(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (also used by :func:`serve_http`)."""
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.calls.append((request.method, path, body))
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.unavailable > 0:
            self.unavailable -= 1
            return self._error(503, "regional is restarting; retry")
        if path == f"{API}/register" and request.method == "POST":
            return self._register(body)
        parts = path.removeprefix(API + "/").split("/")
        if len(parts) != 2:
            return self._error(404, "no such endpoint")
        sn, action = parts
        if self.issue_tokens:
            auth = request.headers.get("authorization", "")
            if self.tokens.get(auth.removeprefix("Bearer ")) != sn:
                return self._error(401, "unknown agent token")
        task = self.tasks.get(sn)
        if task is None:
            return self._error(404, f"no task for {sn}", "sn")
        return self._action(task, action, request.method, body)

    def _register(self, body: Any) -> httpx.Response:
        assert isinstance(body, dict)
        self.registrations += 1
        if self.secret is not None and body.get("enrollment_secret") != self.secret:
            return self._error(401, "bad enrollment secret", "enrollment_secret")
        task = self.tasks.get(body["sn"])
        if task is None:
            return self._error(404, f"no task for {body['sn']}", "sn")
        if body["mac"] != task.mac:
            return self._error(409, "MAC does not match the task", "mac")
        if task.status in ("completed", "failed", "cancelled"):
            return self._error(409, f"task is {task.status}", "status")
        task.hardware = body["hardware"]
        self.lease_lost.discard(task.sn)
        out = self._payload(task)
        out.update(lease_ttl=30, heartbeat_interval=self.heartbeat_interval)
        if self.issue_tokens:
            token = f"tok-{self.registrations}"
            self.tokens[token] = task.sn
            out["agent_token"] = token
        return httpx.Response(200, json=out)

    def _action(self, task: FakeTask, action: str, method: str, body: Any) -> httpx.Response:
        live = task.status in ("approved", "installing")
        if action == "task" and method == "GET":
            return httpx.Response(200, json=self._payload(task))
        if method != "POST" or not isinstance(body, dict):
            return self._error(400, "bad request")
        if action == "heartbeat":
            self.heartbeats += 1
            if task.sn in self.lease_lost:
                return self._error(409, f"agent of {task.sn} holds no live lease; register again")
            return httpx.Response(200, json={"status": task.status, "lease_ttl": 30})
        if action == "progress":
            if not live:
                return self._error(409, f"task is {task.status}", "status")
            task.status = "installing"
            self.progress_calls.append((body["step"], body["percent"]))
            for p in task.progress:
                if p["step"] == body["step"]:
                    p.update(percent=body["percent"], message=body.get("message", ""))
                    break
            else:
                task.progress.append(
                    {
                        "step": body["step"],
                        "percent": body["percent"],
                        "timestamp": "2026-01-30T12:00:00Z",
                        "message": body.get("message", ""),
                    }
                )
            return httpx.Response(200, json={"status": task.status})
        if action == "logs":
            lines = body["lines"]
            assert 1 <= len(lines) <= 100, len(lines)
            assert all(len(line) <= 2000 for line in lines)
            self.log_batches.append(list(lines))
            task.logs.extend((body.get("level", "INFO"), line) for line in lines)
            return httpx.Response(200, json={"status": task.status})
        if action == "complete":
            if task.status != "installing":
                return self._error(409, f"task is {task.status}", "status")
            task.status = "completed"
            return httpx.Response(200, json={"status": "completed"})
        if action == "fail":
            if not live:
                return self._error(409, f"task is {task.status}", "status")
            task.status = "failed"
            task.reason = body["reason"]
            return httpx.Response(200, json={"status": "failed"})
        return self._error(404, "no such endpoint")


@contextlib.contextmanager
def serve_http(regional: FakeRegional) -> Iterator[str]:
    """Serve ``regional`` over real HTTP on 127.0.0.1 (for agents in other processes).

    Yields the base URL. Requests are answered one at a time (the fake is not thread-safe).
    """
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = httpx.Request(
                self.command,
                f"http://127.0.0.1{self.path}",
                headers=dict(self.headers.items()),
                content=self.rfile.read(length) if length else b"",
            )
            with lock:
                try:
                    response = regional.handle_sync(request)
                except httpx.ConnectError:
                    self.close_connection = True
                    return
            content = response.read()
            self.send_response(response.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-regional", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
