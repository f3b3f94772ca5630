"""What every benchmark shares: an etcd to run against, statistics, tables, JSON, plots.

Benchmarks are programs that print figures; they assert no timings. Each one runs its
compared variants interleaved (A B A B ... for several rounds) so that a noisy neighbour
slows every variant alike, and reports per-round figures as the median with the min and
max over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess

#: Where results and plots go by default (relative to the current directory).
RESULTS_DIR = Path("bench-results")
PLOTS_DIR = Path("docs/bench")


@dataclass(slots=True)
class BenchOptions:
    """Options every benchmark takes (see :func:`add_common_args`)."""

    endpoints: list[str] | None
    quick: bool
    rounds: int | None
    results_dir: Path
    plots_dir: Path
    plot: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        """From parsed command-line arguments."""
        endpoints = args.endpoints.split(",") if args.endpoints else None
        return cls(
            endpoints=endpoints,
            quick=args.quick,
            rounds=args.rounds,
            results_dir=Path(args.results_dir),
            plots_dir=Path(args.plots_dir),
            plot=not args.no_plot,
        )


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options of every ``lpmosd bench`` sub-command."""
    p.add_argument(
        "--endpoints",
        help="etcd endpoints (comma-separated URLs); default: start a private etcd. "
        "Keys are written under /os/bench-*/ and deleted afterwards",
    )
    p.add_argument("--quick", action="store_true", help="small run (well under 2 minutes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per variant")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    p.add_argument("--plots-dir", default=str(PLOTS_DIR), help="where the PNG goes")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


# --------------------------------------------------------------------------- etcd


@dataclass(slots=True)
class EtcdTarget:
    """The etcd a benchmark runs against; ``process`` is set when we started it."""

    endpoints: list[str]
    process: EtcdProcess | None = None

    @property
    def pid(self) -> int | None:
        """The etcd server's pid when it is ours (for CPU/RSS figures)."""
        return self.process.pid if self.process is not None else None


@contextlib.asynccontextmanager
async def etcd_target(opts: BenchOptions) -> AsyncIterator[EtcdTarget]:
    """The given endpoints, or a private single-member etcd for the body's duration.

    The private etcd keeps its data on disk (fsync as in production) and uses etcd's
    default raft timers.
    """
    if opts.endpoints:
        yield EtcdTarget(list(opts.endpoints))
        return
    proc = EtcdProcess(name="lpmosd-bench", heartbeat_ms=100, election_ms=1000, log_level="warn")
    await proc.astart()
    try:
        yield EtcdTarget(proc.endpoints, proc)
    finally:
        with trio.CancelScope(shield=True):
            await proc.aclose()


@contextlib.asynccontextmanager
async def bench_client(target: EtcdTarget) -> AsyncIterator[EtcdClient]:
    """An lpmosd etcd client for the target."""
    async with open_client(target.endpoints, request_timeout=30.0) as client:
        yield client


def etcd_version(target: EtcdTarget) -> str:
    """``etcd --version``'s first line when we started it, else "external"."""
    if target.process is None:
        return "external"
    try:
        out = subprocess.run(
            [target.process.binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` (nearest rank on sorted data)."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = max(0, min(len(data) - 1, round(q / 100 * (len(data) - 1))))
    return data[k]


def latency_summary(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies given in seconds, reported in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 50) * 1e3,
        "p90_ms": percentile(samples, 90) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "max_ms": max(samples) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
    }


@dataclass(slots=True)
class Spread:
    """Median and range of one figure over the rounds."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Of the per-round values (NaNs ignored)."""
        vals = [v for v in values if v == v]
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(statistics.median(vals), min(vals), max(vals))

    def fmt(self, digits: int = 1) -> str:
        """``median [min–max]``."""
        if self.median != self.median:
            return "-"
        if self.lo == self.hi:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.lo:.{digits}f}–{self.hi:.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        """For the JSON results."""
        return {"median": self.median, "min": self.lo, "max": self.hi}


@dataclass(slots=True)
class RoundResults:
    """Per-round records of one (variant, configuration) cell, in run order."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)

    def spread(self, key: str) -> Spread:
        """The figure ``key`` over the rounds."""
        return Spread.of(float(r[key]) for r in self.rounds if key in r)

    def total(self, key: str) -> float:
        """The sum of ``key`` over the rounds."""
        return float(sum(r.get(key, 0) for r in self.rounds))


# --------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (also readable in a terminal)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(cells)) + " |"

    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                mem_gib = int(text.split()[1]) / (1 << 20)
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg": os.getloadavg(),
    }


def write_results(opts: BenchOptions, name: str, data: Mapping[str, Any]) -> Path:
    """Write ``bench-results/<name>.json``; returns the path."""
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def plot_path(opts: BenchOptions, name: str) -> Path | None:
    """``docs/bench/<name>.png`` (directory created), or None when plots are off/unavailable."""
    if not opts.plot:
        return None
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    opts.plots_dir.mkdir(parents=True, exist_ok=True)
    return opts.plots_dir / f"{name}.png"


def header(title: str, opts: BenchOptions, target: EtcdTarget) -> str:
    """The first lines printed by a benchmark."""
    info = machine_info()
    where = "private etcd" if target.process else "etcd at " + ",".join(target.endpoints)
    return (
        f"# {title}{' (quick)' if opts.quick else ''}\n"
        f"machine: {info['cores']} cores, {info['memory_gib']} GiB, {info['cpu']}; "
        f"{where} ({etcd_version(target)}); load avg {info['load_avg'][0]:.2f}"
    )


def unique_suffix() -> str:
    """A short run id for key names, so runs against a shared etcd never collide."""
    return os.urandom(3).hex()
