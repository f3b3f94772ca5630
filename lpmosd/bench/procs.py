"""``lpmosd run`` processes for the fleet benchmarks, and their CPU and memory from /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lpmosd.bench.agents import HttpConn

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" the fields start at "state" (field 3): utime is 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def lpmosd_command() -> list[str]:
    """How to start ``lpmosd`` with this interpreter."""
    exe = Path(sys.executable).parent / "lpmosd"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lpmosd")
    return [found] if found else [sys.executable, "-m", "lpmosd"]


def write_config(
    path: Path,
    *,
    role: str,
    endpoints: Sequence[str],
    port: int,
    idc: str = "dc1",
    lease_ttl: int = 30,
    heartbeat_interval: int = 10,
    http_server: str = "lean",
) -> Path:
    """A TOML config for one role on loopback."""
    eps = ", ".join(f'"{e}"' for e in endpoints)
    text = f'roles = ["{role}"]\nlog_level = "warning"\n\n[etcd]\nendpoints = [{eps}]\n\n'
    if role == "control-plane":
        text += f'[control_plane]\nlisten = "127.0.0.1"\nport = {port}\n'
    else:
        text += (
            f'[regional]\nidc = "{idc}"\nlisten = "127.0.0.1"\nport = {port}\n'
            f"agent_lease_ttl = {lease_ttl}\nheartbeat_interval = {heartbeat_interval}\n"
            "rate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000\n"
            f'http_server = "{http_server}"\n'
            # The report journal beside the config: never the system's /var/lib/lpmosd (a
            # journal left by an earlier run would be applied to this run's tasks).
            f'state_dir = "{path.parent / "state"}"\n'
        )
    path.write_text(text)
    return path


@dataclass(eq=False)
class LpmosdProcess:
    """One ``lpmosd run`` child process."""

    name: str
    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        """Spawn ``lpmosd run --config``; output goes to ``log``."""
        env = {**os.environ, **(extra_env or {})}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*lpmosd_command(), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/readyz`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log}\n{self.tail()}")
            conn = HttpConn("127.0.0.1", self.port)
            try:
                status, _ = await conn.request("GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            finally:
                await conn.aclose()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s: {self.tail()}")
            await trio.sleep(0.2)

    def tail(self, lines: int = 20) -> str:
        """The end of the process's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running(procs: Sequence[LpmosdProcess]) -> AsyncIterator[None]:
    """Start the processes, wait until each is ready; stop them all on exit."""
    try:
        for p in procs:
            p.start()
        for p in procs:
            await p.wait_ready()
        yield
    finally:
        with trio.CancelScope(shield=True):
            for p in procs:
                await trio.to_thread.run_sync(p.stop)
