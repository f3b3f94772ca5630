"""``lpmosd bench fleet``: how many concurrent installs one regional and one etcd carry.

Set-up: a private etcd (or ``--endpoints``), and two ``lpmosd run`` processes, the control
plane and the regional of IDC ``bench-dc1``, so that each process's CPU and peak RSS can be
read from /proc.
N tasks are created and approved through :class:`~lpmosd.store.Store` (the operators' part
is not what is measured). Then N simulated agents (:mod:`lpmosd.bench.agents`) each
register, report ``--steps`` progress steps and complete, heart-beating meanwhile, through
the regional's HTTP API, as fast as the regional answers (closed loop: each agent sends its
next report when the previous one is answered). Agents start over N/500 seconds (N/100 in
the realistic model; ``--ramp``) (machines
do not all boot in the same millisecond), each with its own HTTP/1.1 connections (one for
heartbeats).

Reported per fleet size: progress updates/s over the progress phase, the agent-seen p50/p99
latency of a progress report, lost updates (every step of every task is checked in etcd at
the end: each task must be completed with every step at 100 %), CPU (cores used over the
run) and peak RSS of each process, and the raw etcd ceiling measured in the same run, just
before the fleet (64 concurrent puts of 3 KiB, the faster of grpcio and lpmosd's client).
Headline: fleet progress updates/s ÷ raw etcd puts/s. With ``--profile`` the regional is
sampled with py-spy and the share of its time per component is reported
(:mod:`lpmosd.bench.profile`; raw stacks in ``bench-results/raw/``). With the environment
variable ``LPMOSD_BENCH_KEEP=<dir>`` the daemons' configs and logs are kept in ``<dir>``.

Two load models (``--model``): ``closed`` (above: each agent sends as soon as answered;
measures the regional's ceiling) and ``realistic`` (open loop at an installing machine's
pace: a progress or log report every 5 s on average, uniformly 0-10 s apart, 20 progress
and 10 log reports per install, a heartbeat every 10 s, one connection per agent; measures
whether every agent is answered in time: the agent-seen p99 of every request, failed
installs). A 429 is retried after its Retry-After plus jitter, a failed install counted.

Fleet sizes run one after the other, each against a fresh regional and control plane, with
a ceiling measurement before each (so ceiling and fleet interleave: C F C F ...).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import trio

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.bench.agents import FleetStats, HttpConn, HttpError, SimAgent, agent_mac, step_names
from lpmosd.bench.common import (
    BenchOptions,
    EtcdTarget,
    add_common_args,
    bench_client,
    etcd_target,
    header,
    latency_summary,
    machine_info,
    markdown_table,
    plot_path,
    write_results,
)
from lpmosd.bench.procs import (
    LpmosdProcess,
    cpu_seconds,
    free_port,
    peak_rss_mib,
    running,
    write_config,
)
from lpmosd.bench.profile import Sampler
from lpmosd.bench.rawput import ceiling
from lpmosd.documents import TaskStatus
from lpmosd.etcd import EtcdClient
from lpmosd.store import Store

NAME = "fleet"
IDC = "bench-dc1"


async def create_tasks(client: EtcdClient, idc: str, n: int) -> dict[str, str | None]:
    """Create and approve ``n`` tasks; returns sn -> enrolment secret (None without one)."""
    store = Store(client)
    secrets: dict[str, str | None] = {}
    limit = trio.CapacityLimiter(64)

    async def one(i: int) -> None:
        sn = f"sn-{i:05d}"
        async with limit:
            req = CreateTaskRequest(
                idc=idc, sn=sn, mac=agent_mac(i), os_type="demo", os_version="1"
            )
            # With agent enrolment the task comes with a secret for the agent's register.
            enrolled = getattr(store, "create_enrolled_task", None)
            secret: Any = None
            if enrolled is not None:
                _, secret = await enrolled(req, actor="bench")
            else:
                await store.create_task(req, actor="bench")
            await store.approve(idc, sn, approved_by="bench")
            secrets[sn] = secret if isinstance(secret, str) else None

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return secrets


async def check_tasks(client: EtcdClient, idc: str, n: int, steps: int) -> dict[str, int]:
    """Every task completed with every step at 100 %? Counts what is missing."""
    tasks = {t.sn: t for t in await Store(client).list_tasks(idc=idc)}
    want = step_names(steps)
    missing_steps = not_completed = missing_tasks = 0
    for i in range(n):
        task = tasks.get(f"sn-{i:05d}")
        if task is None:
            missing_tasks += 1
            missing_steps += steps
            continue
        if task.status is not TaskStatus.COMPLETED:
            not_completed += 1
        have = {p.step: p.percent for p in task.progress}
        missing_steps += sum(1 for s in want if have.get(s) != 100)
    return {
        "missing_tasks": missing_tasks,
        "not_completed": not_completed,
        "missing_steps": missing_steps,
    }


def _procs_for(
    target: EtcdTarget, workdir: Path, hb: int, ttl: int, server: str
) -> list[LpmosdProcess]:
    out = []
    for role, name in (("control-plane", "control-plane"), ("regional", "regional-dc1")):
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cfg = write_config(
            d / "lpmosd.toml",
            role=role,
            endpoints=target.endpoints,
            port=port,
            idc=IDC,
            lease_ttl=ttl,
            heartbeat_interval=hb,
            http_server=server,
        )
        out.append(LpmosdProcess(name, cfg, port, d / "lpmosd.log"))
    return out


async def run_size(
    client: EtcdClient,
    target: EtcdTarget,
    n: int,
    steps: int,
    hb: int,
    ceiling_s: float,
    workdir: Path,
    profile_dir: Path | None = None,
    ramp: float = 0.0,
    model: str = "closed",
    server: str = "lean",
) -> dict[str, Any]:
    """One fleet size: ceiling, fresh processes, N agents, checks (and a profile)."""
    await client.delete(schema.idc_prefix(IDC), prefix=True)
    raw = await ceiling(client, target.endpoints[0], ceiling_s)
    print(f"  raw etcd ceiling: {raw['rate']:.0f} puts/s ({raw['client']})")
    secrets = await create_tasks(client, IDC, n)
    procs = _procs_for(target, workdir / f"n{n}-{server}", hb, max(30, 3 * hb), server)
    async with running(procs):
        regional = procs[1]
        stats = FleetStats()
        agents = [
            SimAgent(
                "127.0.0.1",
                regional.port,
                f"sn-{i:05d}",
                agent_mac(i),
                stats,
                enrollment_secret=secrets.get(f"sn-{i:05d}"),
                heartbeat_interval=hb,
                one_connection=model == "realistic",
            )
            for i in range(n)
        ]
        cpu0 = {p.name: cpu_seconds(p.pid) for p in procs}
        if target.pid:
            cpu0["etcd"] = cpu_seconds(target.pid)
        sampler = None
        if profile_dir is not None:
            raw_name = f"fleet-regional-{model}-{server}-{n}.collapsed.txt"
            sampler = Sampler(regional.pid, profile_dir / raw_name)
            if not sampler.start():
                sampler = None
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        t0_trio = trio.current_time()
        async with trio.open_nursery() as nursery:
            # Machines do not all boot in the same millisecond: start the agents over
            # ``ramp`` seconds (n / 500 by default), then let them run flat out.
            pace, log_every = (REALISTIC_PACE, 2) if model == "realistic" else (0.0, 0)
            for i, a in enumerate(agents):
                nursery.start_soon(partial(a.install, steps, pace=pace, log_every=log_every))
                if ramp and i % 50 == 49:
                    await trio.sleep_until(t0_trio + ramp * (i + 1) / n)
        wall = time.perf_counter() - t0
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        where = await trio.to_thread.run_sync(sampler.stop) if sampler is not None else {}
        metrics = await scrape_metrics(regional.port)
        cpu = {p.name: cpu_seconds(p.pid) - cpu0[p.name] for p in procs}
        rss = {p.name: peak_rss_mib(p.pid) for p in procs}
        if target.pid:
            cpu["etcd"] = cpu_seconds(target.pid) - cpu0["etcd"]
            rss["etcd"] = peak_rss_mib(target.pid)
        cpu["load generator"] = (self1.ru_utime + self1.ru_stime) - (
            self0.ru_utime + self0.ru_stime
        )
        rss["load generator"] = self1.ru_maxrss / 1024
    check = await check_tasks(client, IDC, n, steps)
    await client.delete(schema.idc_prefix(IDC), prefix=True)
    sends = sorted(t for t, _ in stats.progress)
    ends = sorted(t + lat for t, lat in stats.progress)
    span = (ends[-1] - sends[0]) if sends else 0.0
    acked = len(stats.progress)
    rate = acked / span if span else 0.0
    lat = latency_summary([lat for _, lat in stats.progress])
    series = _per_second(ends, sends[0] if sends else 0.0)
    lost = check["missing_steps"]
    requests = sum(stats.statuses.values())
    req_sends = sorted(t for t, _ in stats.requests)
    req_span = (max(t + lat for t, lat in stats.requests) - req_sends[0]) if req_sends else 0.0
    failed = max(stats.failed, check["missing_tasks"] + check["not_completed"])
    every = latency_summary([lat for _, lat in stats.requests])
    refused = sum(v for k, v in stats.statuses.items() if k.endswith(" 429"))
    req_rate = len(stats.requests) / req_span if req_span else 0.0
    result: dict[str, Any] = {
        "model": model,
        "http_server": server,
        "agents": n,
        "steps": steps,
        "heartbeat_interval": hb,
        "ramp_s": ramp,
        "wall_s": wall,
        "progress_acked": acked,
        "progress_expected": n * steps,
        "note": "realistic: one connection per agent" if model == "realistic" else "",
        "progress_per_s": rate,
        "progress_latency": lat,
        "requests": dict(stats.statuses),
        "request_latency": {k: latency_summary(v) for k, v in stats.latencies.items()},
        "heartbeats": stats.heartbeats,
        "log_reports": stats.logs,
        "requests_per_s": req_rate,
        "all_request_latency": every,
        "failed_installs": failed,
        "refused_429": refused,
        "completed": stats.completed,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:10],
        "lost_updates": lost,
        "check": check,
        "cpu_cores": {k: v / wall for k, v in cpu.items()},
        "cpu_seconds": cpu,
        "peak_rss_mib": rss,
        "raw_ceiling": raw,
        "ratio": rate / raw["rate"] if raw["rate"] else 0.0,
        "per_second": series,
        "regional_metrics": metrics,
        "api_requests": requests,
        "regional_cpu_ms_per_request": 1e3 * cpu["regional-dc1"] / requests if requests else 0.0,
        "regional_profile": where,
    }
    print(
        f"  {n} agents ({model}, {server}): {rate:.0f} progress updates/s, "
        f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms; all requests {req_rate:.0f}/s, "
        f"p99 {every['p99_ms']:.1f} ms; lost {lost}, failed installs {failed}, "
        f"errors {len(stats.errors)}, 429s {refused}, "
        f"ratio {rate / raw['rate'] if raw['rate'] else 0.0:.2f}"
    )
    return result


async def scrape_metrics(port: int) -> dict[str, float]:
    """The regional's etcd and CAS counters from ``/metrics`` (empty when not served)."""
    conn = HttpConn("127.0.0.1", port)
    try:
        status, body = await conn.request("GET", "/metrics")
    except HttpError:
        return {}
    finally:
        await conn.aclose()
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or not line.startswith(_METRICS):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


_METRICS = (
    "lpmosd_etcd_request_seconds_sum",
    "lpmosd_etcd_request_seconds_count",
    "lpmosd_cas_retries",
    "lpmosd_etcd_request_errors",
)


def _per_second(ends: list[float], start: float) -> list[int]:
    counts: Counter[int] = Counter(int(t - start) for t in ends)
    return [counts.get(s, 0) for s in range(max(counts) + 1)] if counts else []


async def run(
    opts: BenchOptions,
    *,
    sizes: list[int] | None = None,
    steps: int = 20,
    heartbeat: int | None = None,
    ceiling_seconds: float | None = None,
    profile: bool = False,
    model: str = "closed",
    servers: list[str] | None = None,
    ramp: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}")
    # bench-results/fleet.json (closed loop) and fleet-realistic.json: one file per model.
    name = NAME if model == "closed" else f"{NAME}-{model}"
    sizes = sizes or ([100] if opts.quick else [100, 1000, 5000])
    hb = heartbeat or (2 if opts.quick else 10)
    ceiling_s = ceiling_seconds or (2.0 if opts.quick else 4.0)
    results: list[dict[str, Any]] = []
    keep = os.environ.get("LPMOSD_BENCH_KEEP")  # a directory: keep the daemons' logs there
    with (
        contextlib.nullcontext(keep)
        if keep
        else tempfile.TemporaryDirectory(prefix="lpmosd-bench-fleet-")
    ) as tmp:
        async with etcd_target(opts) as target, bench_client(target) as client:
            print(header("fleet: simulated agents through the regional API", opts, target))
            print(
                f"model {model}; sizes {sizes}; {steps} progress steps per agent; "
                f"heartbeat every {hb} s"
            )
            for n in sizes:
                for server in servers or ["lean"]:
                    prof = opts.results_dir / "raw" if profile else None
                    # Closed loop: agents start over n/500 s. Realistic: n/100 s (100
                    # machines booting a second; 10,000 are all installing at once from
                    # 100 s to ~150 s, each install taking ~150 s).
                    ramp_n = (
                        ramp if ramp is not None else n / (100 if model == "realistic" else 500)
                    )
                    results.append(
                        await run_size(
                            client,
                            target,
                            n,
                            steps,
                            hb,
                            ceiling_s,
                            Path(tmp),
                            prof,
                            ramp_n,
                            model,
                            server,
                        )
                    )
    rows = []
    for r in results:
        lat = r["progress_latency"]
        cores = r["cpu_cores"]
        rss = r["peak_rss_mib"]
        rows.append(
            [
                r["model"],
                r["http_server"],
                str(r["agents"]),
                f"{r['progress_per_s']:.0f}",
                f"{lat['p50_ms']:.1f}",
                f"{lat['p99_ms']:.1f}",
                f"{r['requests_per_s']:.0f}",
                f"{r['all_request_latency']['p99_ms']:.1f}",
                f"{r['lost_updates']} of {r['progress_expected']}",
                str(r["failed_installs"]),
                str(r["refused_429"]),
                f"{r['raw_ceiling']['rate']:.0f}",
                f"{r['ratio']:.2f}",
                f"{r['regional_cpu_ms_per_request']:.2f}",
                " / ".join(f"{cores.get(k, 0):.2f}" for k in _PROCS),
                " / ".join(f"{rss.get(k, 0):.0f}" for k in _PROCS),
            ]
        )
    md = markdown_table(
        [
            "model",
            "regional HTTP",
            "agents",
            "progress/s",
            "progress p50 ms",
            "progress p99 ms",
            "requests/s",
            "all requests p99 ms",
            "lost updates",
            "failed installs",
            "429s",
            "raw etcd puts/s",
            "fleet ÷ raw",
            "regional CPU ms/request",
            "CPU cores: " + " / ".join(_PROCS),
            "peak RSS MiB: " + " / ".join(_PROCS),
        ],
        rows,
    )
    print()
    print(md)
    for r in results:
        if r["regional_profile"]:
            print(
                f"where the regional's time goes ({r['agents']} agents, {r['model']}, "
                f"{r['http_server']}; py-spy samples):"
            )
            for name, pct in r["regional_profile"].items():
                print(f"  {pct:5.1f}%  {name}")
    out: dict[str, Any] = {
        "benchmark": name,
        "quick": opts.quick,
        "machine": machine_info(),
        "results": results,
        "markdown": md,
    }
    png = plot_path(opts, name)
    if png is not None:
        _plot(png, results)
        print(f"plot: {png}")
        out["plot"] = str(png)
    path = write_results(opts, name, out)
    print(f"results: {path}")
    return out


MODELS = ("closed", "realistic")
#: Realistic model: seconds between an agent's reports on average.
REALISTIC_PACE = 5.0

_PROCS = ("regional-dc1", "control-plane", "etcd", "load generator")


def _plot(png: Any, results: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for r in results:
        series = r["per_second"]
        axes[0].plot(range(len(series)), series, label=f"{r['agents']} agents, {r['http_server']}")
        axes[0].axhline(r["raw_ceiling"]["rate"], ls=":", lw=1, color="grey")
    axes[0].set_xlabel("seconds since the first progress report")
    axes[0].set_ylabel("progress updates acknowledged / s")
    axes[0].set_title("throughput (dotted: raw etcd puts/s, 64 writers)")
    axes[0].legend()
    axes[0].grid(True, alpha=0.3)
    sizes = [f"{r['agents']}\n{r['http_server']}" for r in results]
    p50 = [r["progress_latency"]["p50_ms"] for r in results]
    p99 = [r["progress_latency"]["p99_ms"] for r in results]
    x = range(len(sizes))
    axes[1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    axes[1].set_xticks(list(x), sizes)
    axes[1].set_xlabel("agents")
    axes[1].set_ylabel("agent-seen progress latency (ms)")
    if all(v > 0 for v in p50 + p99):
        axes[1].set_yscale("log")
    axes[1].legend()
    axes[1].grid(True, axis="y", alpha=0.3)
    fig.suptitle("fleet: register → progress steps → complete, with heartbeats")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench fleet``."""
    p = sub.add_parser(NAME, help="N simulated agents through the regional API")
    add_common_args(p)
    p.add_argument(
        "--agents", help="comma-separated fleet sizes (default 100,1000,5000; quick 100)"
    )
    p.add_argument("--steps", type=int, default=20, help="progress steps per agent")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="closed",
        help="closed: each agent sends as soon as answered (default); realistic: open loop, "
        "a report every 5 s on average and a heartbeat every 10 s per agent",
    )
    p.add_argument("--heartbeat", type=int, help="heartbeat interval s (default 10; quick 2)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the regional with py-spy and report where its time goes",
    )
    p.add_argument(
        "--ramp",
        type=float,
        help="seconds over which the agents start (default n/500; realistic n/100)",
    )
    p.add_argument(
        "--http-server",
        default="lean",
        help="the regional's HTTP server(s), comma-separated, measured one after the other "
        "per size: lean (default), hypercorn (everything through Quart on hypercorn)",
    )
    p.set_defaults(
        bench=lambda o, a: run(
            o,
            sizes=[int(x) for x in a.agents.split(",")] if a.agents else None,
            steps=a.steps,
            heartbeat=a.heartbeat,
            profile=a.profile,
            model=a.model,
            servers=a.http_server.split(","),
            ramp=a.ramp,
        )
    )
