"""Fixtures of the multi-process tests: ``lpmosd run`` and ``lpmosd agent`` as real processes.

Each daemon gets a TOML file written under the test's tmp_path (free loopback ports picked
just before), its output goes to a log file there (printed when a test fails), and every
process a test started is SIGKILLed at teardown if it is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import bearer, create_token, free_port

from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import Role

#: Simulated install steps of the test plan for the guide's os_type.
FAST_PLAN = (
    ("partitioning", 0.3),
    ("base_system", 0.3),
    ("packages", 0.3),
    ("bootloader", 0.3),
)


def toml_value(value: Any) -> str:
    """A TOML literal for ``value`` (JSON strings and arrays are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def control_plane_toml(endpoints: Sequence[str], port: int, workdir: Path) -> str:
    return "\n".join(
        [
            'roles = ["control-plane"]',
            'log_format = "text"',
            "shutdown_timeout = 5",
            "[etcd]",
            f"endpoints = {toml_value(list(endpoints))}",
            "[control_plane]",
            'listen = "127.0.0.1"',
            f"port = {port}",
            "",
        ]
    )


def regional_toml(
    endpoints: Sequence[str],
    port: int,
    *,
    idc: str = "dc1",
    agent_lease_ttl: int = 5,
    heartbeat_interval: int = 2,
    session_ttl: int = 3,
    plan: Sequence[tuple[str, float]] = FAST_PLAN,
    os_type: str = "Ubuntu 22.04",
) -> str:
    steps = [{"name": name, "simulate": seconds, "timeout": 600} for name, seconds in plan]
    return "\n".join(
        [
            'roles = ["regional"]',
            'log_format = "text"',
            "shutdown_timeout = 5",
            "[etcd]",
            f"endpoints = {toml_value(list(endpoints))}",
            "[regional]",
            f"idc = {toml_value(idc)}",
            'listen = "127.0.0.1"',
            f"port = {port}",
            f"agent_lease_ttl = {agent_lease_ttl}",
            f"heartbeat_interval = {heartbeat_interval}",
            f"session_ttl = {session_ttl}",
            f"[regional.plans.{toml_value(os_type)}]",
            f"steps = {toml_value(steps)}",
            "",
        ]
    )


@dataclass(eq=False)
class Proc:
    """A child process of the test, its command line and its log file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    url: str = ""
    #: For a control plane: the Authorization header of an admin token.
    headers: dict[str, str] = field(default_factory=dict)
    #: Extra environment, e.g. ``LPMOSD_FAULT_AT`` (lpmosd.hooks).
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("ab") as out:
            out.write(f"\n--- start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds (AssertionError past it)."""
        assert self.popen is not None
        with trio.move_on_after(timeout):
            while self.popen.poll() is None:  # noqa: ASYNC110 - polling a child process
                await trio.sleep(0.02)
            return self.popen.returncode
        raise AssertionError(f"{self.name} still running after {timeout}s\n{self.tail()}")

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until ``/readyz`` answers 200 (the role synced and holds its session)."""
        async with httpx.AsyncClient(timeout=2) as http:
            with trio.move_on_after(timeout):
                while True:
                    if not self.running():
                        raise AssertionError(f"{self.name} exited early\n{self.tail()}")
                    try:
                        r = await http.get(self.url + "/readyz")
                        if r.status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout}s\n{self.tail()}")

    def kill(self) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(10)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return f"--- {self.name} ({self.log}):\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """The processes of one test."""

    tmp: Path
    endpoints: list[str]
    procs: list[Proc] = field(default_factory=list)

    def _proc(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def daemon(self, name: str, toml: str, url: str) -> Proc:
        """An ``lpmosd run`` process (not started) for the config text ``toml``."""
        path = self.tmp / f"{name}.toml"
        path.write_text(toml)
        proc = self._proc(name, [sys.executable, "-m", "lpmosd", "run", "--config", str(path)])
        proc.url = url
        return proc

    async def start_control_plane(
        self, name: str = "control-plane", env: dict[str, str] | None = None
    ) -> Proc:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.daemon(name, control_plane_toml(self.endpoints, port, self.tmp), url)
        proc.env = env or {}
        async with open_client(self.endpoints) as client:
            # Named like the guide's approver: the API records whoever authenticated.
            token = await create_token(client, Role.ADMIN, "admin@example.com")
            proc.headers = bearer(token)
        proc.start()
        return proc

    async def start_regional(
        self, name: str = "regional", env: dict[str, str] | None = None, **options: Any
    ) -> Proc:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.daemon(name, regional_toml(self.endpoints, port, **options), url)
        proc.env = env or {}
        proc.start()
        return proc

    def secret_file(self, sn: str) -> Path:
        """Where the enrolment secret of ``sn``'s task is kept (the machine's boot
        parameters, in real life); :meth:`agent` passes it when it exists."""
        return self.tmp / f"{sn}.enrollment-secret"

    def agent(self, regional_url: str, sn: str, mac: str, *extra: str) -> Proc:
        """An ``lpmosd agent`` process (not started)."""
        secret = self.secret_file(sn)
        if secret.exists():
            extra = (f"--enrollment-secret-file={secret}", *extra)
        argv = [
            sys.executable,
            "-m",
            "lpmosd",
            "agent",
            "--regional-url",
            regional_url,
            "--sn",
            sn,
            "--mac",
            mac,
            "--poll-interval",
            "0.2",
            "--register-retry-interval",
            "0.5",
            "--log-level",
            "debug",
            *extra,
        ]
        return self._proc(f"agent-{sn}", argv)

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@pytest.fixture
def cluster(etcd: EtcdProcess, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Processes on the shared etcd; their logs are printed when the test fails."""
    c = Cluster(tmp_path, list(etcd.endpoints))
    yield c
    for proc in c.procs:
        proc.kill()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(c.tails())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item (``rep_call``) for the fixtures above."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
