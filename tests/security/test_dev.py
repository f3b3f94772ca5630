"""``lpmosd dev`` with zero config: it prints an admin token that works, the API refuses
requests without one, and (slow) its demo install runs through the API with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from provisioning_kit import free_port


@pytest.fixture
def aio_loop() -> None:
    """No trio-asyncio loop here: the daemon is a child process."""


class Dev:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.cp_port, self.rg_port = free_port(), free_port()
        self.log = tmp / "dev.log"
        self.out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "lpmosd", "dev",
                f"--control-plane-port={self.cp_port}", f"--api-port={self.rg_port}", *args,
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )  # fmt: skip

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()


@pytest.fixture
def dev(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Dev]:
    marker = request.node.get_closest_marker("slow")
    d = Dev(tmp_path) if marker else Dev(tmp_path, "--no-demo")
    try:
        yield d
    finally:
        d.stop()


def test_dev_prints_a_working_admin_token(dev: Dev) -> None:
    token = dev.wait_for(r"admin token\s*: (lpm_[A-Za-z0-9_-]{43})", 30).group(1)
    base = f"http://127.0.0.1:{dev.cp_port}"
    with httpx.Client(base_url=base) as http:
        assert http.get("/api/v1/tasks").status_code == 401
        r = http.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"name": "dev-admin", "role": "admin"}
    assert dev.log.read_text().count(token) == 2, "printed for the developer, nowhere else"


@pytest.mark.slow
def test_dev_demo_runs_through_the_api(dev: Dev) -> None:
    dev.wait_for(r"demo: agent exited 0; task is completed", 90)
