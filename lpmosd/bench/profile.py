"""Where a process's time goes: py-spy samples of a running lpmosd, summed by component.

``lpmosd bench fleet --profile`` samples the regional with py-spy (``pip install
py-spy``; it needs ptrace rights, e.g. root) while the agents run, keeps the raw collapsed
stacks in ``bench-results/raw/`` and reports the share of samples per component. Each
sample is charged to the innermost frame that belongs to a component; time in Trio's
socket and scheduler code is charged to the component that called it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: (component, substrings of a frame that belong to it), innermost match wins.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TaskWriter (apply, serialize, build Txn)", ("lpmosd/taskwriter.py",)),
    (
        "etcd client (grpclib, betterproto, trio-asyncio)",
        (
            "grpclib",
            "betterproto2",
            "trio_asyncio",
            "lpmosd/etcd/",
            "h2/",
            "hpack/",
            "hyperframe/",
        ),
    ),
    (
        "agent API handlers (auth, models, JSON)",
        (
            "lpmosd/web/agent_app.py",
            "lpmosd/agent_service.py",
            "lpmosd/fields.py",
            "lpmosd/documents.py",
            "lpmosd/lifecycle.py",
            "lpmosd/api_requests.py",
            "lpmosd/timestamps.py",
            "lpmosd/credentials.py",
            "lpmosd/store.py",
            "json/",
        ),
    ),
    ("lean HTTP server + fast agent routes", ("lpmosd/web/lean.py", "lpmosd/web/agent_fast.py")),
    ("lease keepalives (throttled)", ("lpmosd/leasekeeper.py",)),
    ("Quart request/response", ("quart/", "quart_trio/", "werkzeug/")),
    ("hypercorn + h11 (HTTP/1.1)", ("hypercorn/", "h11/")),
    ("watch cache (view)", ("lpmosd/view.py", "lpmosd/roles/regional.py")),
    ("metrics", ("prometheus_client",)),
)
_TRIO = ("trio/",)


def py_spy() -> str | None:
    """The py-spy executable, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Sampler:
    """A py-spy ``record`` of one process, from :meth:`start` to :meth:`stop`."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        """Start sampling; False when py-spy is not available."""
        exe = py_spy()
        if exe is None:
            print("(py-spy is not installed: no profile; pip install py-spy)", file=sys.stderr)
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        log = self.out.with_suffix(".py-spy.log").open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate),
                "--idle",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(self.out),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return True

    def stop(self) -> dict[str, float]:
        """Stop sampling; the share of samples (%) per component."""
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return breakdown(self.out)


def _component(frames: list[str]) -> str:
    if frames and any(w in frames[-1] for w in ("epoll", "get_events", "select")):
        return "idle (waiting for I/O)"
    fallback = "other"
    for frame in reversed(frames):
        for name, parts in COMPONENTS:
            if any(p in frame for p in parts):
                return name
        if fallback == "other" and any(p in frame for p in _TRIO):
            fallback = "Trio scheduler"
    return fallback


def breakdown(raw: Path) -> dict[str, float]:
    """Share of samples (%) per component, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    try:
        text = raw.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[_component(stack.split(";"))] += int(n)
    total = sum(counts.values())
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()} if total else {}
