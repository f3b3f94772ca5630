"""``lpmosd bench offline-detection``: how soon a dead agent's task is marked failed.

Set-up as the fleet benchmark: a private etcd, ``lpmosd run`` for the control plane (whose
reaper fails tasks whose agent lease key vanished) and for the dc1 regional (which holds
one lease per agent, refreshed by its heartbeats). ``--agents`` simulated agents register,
report a step (the task is then installing) and heartbeat; after a few heartbeats all of
them stop at once, as if their machines lost power.

For every task the benchmark watches ``/os/dc1/machines/`` and measures, from the send
time of the agent's last acknowledged heartbeat (the moment the lease was last refreshed,
at the latest): when the lease key was deleted (etcd expired the lease) and when the task
turned ``failed`` (the reaper). Goal: failed − last heartbeat ≤ TTL + 1 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from lpmosd import schema
from lpmosd.bench.agents import FleetStats, SimAgent, agent_mac
from lpmosd.bench.common import (
    BenchOptions,
    EtcdTarget,
    add_common_args,
    bench_client,
    etcd_target,
    header,
    machine_info,
    markdown_table,
    percentile,
    plot_path,
    write_results,
)
from lpmosd.bench.fleet import IDC, create_tasks
from lpmosd.bench.procs import LpmosdProcess, free_port, running, write_config
from lpmosd.etcd import EtcdClient, EventType, watch

NAME = "offline-detection"


async def _watch_outcomes(
    client: EtcdClient,
    lease_deleted: dict[str, float],
    failed: dict[str, float],
    reasons: dict[str, str],
    target: list[int],
    all_failed: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with watch(client, schema.machines_prefix(IDC)) as stream:
        task_status.started()
        async for batch in stream:
            now = time.time()
            for ev in batch.events:
                parsed = schema.parse_key(ev.kv.key.decode(errors="replace"))
                if parsed is None:
                    continue
                if parsed.kind == "lease" and ev.type is EventType.DELETE:
                    lease_deleted.setdefault(parsed.sn, now)
                elif parsed.kind == "task" and ev.type is EventType.PUT:
                    doc = json.loads(ev.kv.value)
                    if doc.get("status") == "failed" and parsed.sn not in failed:
                        failed[parsed.sn] = now
                        reasons[parsed.sn] = str(doc.get("error") or "")
                        if len(failed) >= target[0]:
                            all_failed.set()


async def _dying_agent(agent: SimAgent, die: trio.Event, registered: list[str]) -> None:
    """Register, report a step, heartbeat until ``die``, then go silent (no complete)."""
    try:
        if not await agent.register():
            return
        if not await agent.progress("partitioning", 10, "started"):
            return
        registered.append(agent.sn)
        await agent.heartbeat()
        await agent.heartbeat_loop(die)
    finally:
        await agent.aclose()


async def run_round(
    client: EtcdClient,
    target: EtcdTarget,
    n: int,
    ttl: int,
    hb: int,
    workdir: Path,
    rnd: int,
) -> dict[str, Any]:
    """One round: n agents die at once; returns per-agent delays."""
    await client.delete(schema.idc_prefix(IDC), prefix=True)
    secrets = await create_tasks(client, IDC, n)
    procs = []
    for role, name in (("control-plane", "control-plane"), ("regional", "regional-dc1")):
        d = workdir / f"r{rnd}" / name
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
        )
        procs.append(LpmosdProcess(name, cfg, port, d / "lpmosd.log"))
    lease_deleted: dict[str, float] = {}
    failed: dict[str, float] = {}
    reasons: dict[str, str] = {}
    stats = FleetStats()
    registered: list[str] = []
    async with running(procs), trio.open_nursery() as nursery:
        expected = [n + 1]  # known once the agents have died: how many registered
        all_failed = trio.Event()
        await nursery.start(
            _watch_outcomes, client, lease_deleted, failed, reasons, expected, all_failed
        )
        die = trio.Event()
        async with trio.open_nursery() as agents:
            for i in range(n):
                sn = f"sn-{i:05d}"
                agent = SimAgent(
                    "127.0.0.1",
                    procs[1].port,
                    sn,
                    agent_mac(i),
                    stats,
                    enrollment_secret=secrets.get(sn),
                    heartbeat_interval=hb,
                )
                agents.start_soon(_dying_agent, agent, die, registered)
            # Let every agent heartbeat a few times, then they all die at once.
            await trio.sleep(max(3.0, 2.5 * hb))
            killed_at = time.time()
            die.set()
        expected[0] = len(registered)
        if len(failed) >= expected[0]:
            all_failed.set()
        with trio.move_on_after(3 * ttl + 15):
            await all_failed.wait()
        nursery.cancel_scope.cancel()
    await client.delete(schema.idc_prefix(IDC), prefix=True)
    rows = []
    for sn in registered:
        last = stats.last_heartbeat.get(sn)
        if last is None:
            continue
        rows.append(
            {
                "sn": sn,
                "last_heartbeat": last,
                "lease_deleted_after": lease_deleted[sn] - last if sn in lease_deleted else None,
                "failed_after": failed[sn] - last if sn in failed else None,
                "reason": reasons.get(sn, ""),
            }
        )
    return {
        "round": rnd,
        "agents": n,
        "registered": len(registered),
        "killed_at": killed_at,
        "never_failed": sum(1 for r in rows if r["failed_after"] is None),
        "agents_detail": rows,
        "http": dict(stats.statuses),
        "errors": stats.errors[:10],
    }


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


async def run(
    opts: BenchOptions, *, agents: int = 100, ttl: int | None = None, heartbeat: int | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    ttl = ttl or (5 if opts.quick else 30)
    hb = heartbeat or (2 if ttl < 20 else 10)
    rounds = opts.rounds or 1
    out_rounds = []
    with tempfile.TemporaryDirectory(prefix="lpmosd-bench-offline-") as tmp:
        async with etcd_target(opts) as target, bench_client(target) as client:
            print(header("offline-detection: agents die, tasks fail", opts, target))
            print(f"{agents} agents; lease TTL {ttl} s; heartbeat every {hb} s; {rounds} round(s)")
            for rnd in range(rounds):
                r = await run_round(client, target, agents, ttl, hb, Path(tmp), rnd)
                out_rounds.append(r)
                print(
                    f"  round {rnd + 1}: {r['registered']} died, {r['never_failed']} never failed"
                )
    details = [a for r in out_rounds for a in r["agents_detail"]]
    failed = [a["failed_after"] for a in details if a["failed_after"] is not None]
    expired = [a["lease_deleted_after"] for a in details if a["lease_deleted_after"] is not None]
    reaper = [
        a["failed_after"] - a["lease_deleted_after"]
        for a in details
        if a["failed_after"] is not None and a["lease_deleted_after"] is not None
    ]
    within = sum(1 for v in failed if v <= ttl + 1)
    never = sum(r["never_failed"] for r in out_rounds)
    dist_f, dist_e, dist_r = _dist(failed), _dist(expired), _dist(reaper)

    def fmt(d: dict[str, float], key: str) -> str:
        return f"{d[key]:.2f}" if key in d else "-"

    rows = [
        [label] + [fmt(d, k) for k in ("min", "p50", "p90", "p99", "max")]
        for label, d in (
            ("lease key deleted − last heartbeat", dist_e),
            ("task failed − lease key deleted (reaper)", dist_r),
            ("task failed − last heartbeat", dist_f),
        )
    ]
    md = markdown_table(["seconds", "min", "p50", "p90", "p99", "max"], rows)
    print()
    print(md)
    print(
        f"{within} of {len(details)} tasks failed within TTL + 1 s = {ttl + 1} s "
        f"(goal: all); {never} never failed"
    )
    results: dict[str, Any] = {
        "benchmark": NAME,
        "quick": opts.quick,
        "machine": machine_info(),
        "agents": agents,
        "ttl": ttl,
        "heartbeat_interval": hb,
        "within_goal": within,
        "total": len(details),
        "never_failed": never,
        "failed_after": dist_f,
        "lease_deleted_after": dist_e,
        "reaper": dist_r,
        "rounds": out_rounds,
        "markdown": md,
    }
    png = plot_path(opts, NAME)
    if png is not None:
        _plot(png, failed, expired, ttl, hb, agents)
        print(f"plot: {png}")
        results["plot"] = str(png)
    path = write_results(opts, NAME, results)
    print(f"results: {path}")
    return results


def _plot(png: Any, failed: list[float], expired: list[float], ttl: int, hb: int, n: int) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    lo = min([*failed, *expired, ttl - 1.0])
    hi = max([*failed, *expired, ttl + 1.5])
    bins = [lo + i * (hi - lo) / 40 for i in range(41)]
    ax.hist(expired, bins=bins, alpha=0.6, label="lease key deleted (etcd expiry)")
    ax.hist(failed, bins=bins, alpha=0.6, label="task marked failed (reaper)")
    ax.axvline(ttl, color="grey", ls=":", label=f"TTL {ttl} s")
    ax.axvline(ttl + 1, color="red", ls="--", label="goal: TTL + 1 s")
    ax.set_xlabel("seconds after the agent's last acknowledged heartbeat")
    ax.set_ylabel("agents")
    ax.set_title(f"offline-detection: {n} agents die at once (heartbeat every {hb} s)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench offline-detection``."""
    p = sub.add_parser(NAME, help="kill agents at once; time until their tasks fail")
    add_common_args(p)
    p.add_argument("--agents", type=int, default=100, help="agents that die (default 100)")
    p.add_argument("--ttl", type=int, help="agent lease TTL s (default 30; quick 5)")
    p.add_argument("--heartbeat", type=int, help="heartbeat interval s (default TTL/3)")
    p.set_defaults(bench=lambda o, a: run(o, agents=a.agents, ttl=a.ttl, heartbeat=a.heartbeat))
