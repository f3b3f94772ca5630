"""``lpmosd bench watch-traffic``: the guide's "90% less watch traffic", measured.

Workload (the same logical operations in both layouts, interleaved v2, v3, v2, v3 ...):
10 IDCs × 100 servers; each server is added, approved, reports ``--steps`` progress
updates and completes. v2 writes its ``tasks``/``state`` documents and appends to the
IDC's server list (read-modify-write, serialised per IDC so no add is lost here); v3 runs
lpmosd's real :class:`~lpmosd.store.Store` operations (each one Txn writing the task and
the server entry).

What one dc1 regional receives, counted per watcher (events, and key + value bytes of the
events, about their protobuf payload):

* ``v2 list key``: a watch on ``/os/dc1/servers`` only (the guide's v2 watch). It sees
  adds, never a status change: status lives in the per-machine ``state`` documents.
* ``v2 regional``: what a v2 regional must watch to do its job: the list key plus the
  ``/os/dc1/machines/`` prefix.
* ``v2 regional + list re-read``: the same, re-reading the whole list on each list event
  (what a v2 regional that diffs the list against its own state does).
* ``v3 servers/ prefix``: a prefix watch on ``/os/dc1/servers/``.
* ``v3 regional``: what lpmosd's regional watches: ``/os/dc1/servers/`` and
  ``/os/dc1/machines/``.
* ``v3 one server``: the guide's example, a watch on ``/os/dc1/servers/{sn}`` of one server.

No watcher of either layout sees another IDC's traffic: both keep IDCs under their own
prefix. The ratio reported against the guide's "90% less" is v3 regional ÷ v2 regional.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.bench.common import (
    BenchOptions,
    Spread,
    add_common_args,
    bench_client,
    etcd_target,
    header,
    machine_info,
    markdown_table,
    plot_path,
    unique_suffix,
    write_results,
)
from lpmosd.documents import TaskStatus
from lpmosd.etcd import EtcdClient, watch
from lpmosd.migrate.v2 import V2Writer, list_key, state_doc, task_doc, tasks_key
from lpmosd.store import Store
from lpmosd.timestamps import format_ts, utcnow

NAME = "watch-traffic"
LAYOUTS = ("v2", "v3")
WATCHERS = {
    "v2": ("v2 list key", "v2 regional", "v2 regional + list re-read"),
    "v3": ("v3 servers/ prefix", "v3 regional", "v3 one server"),
}


@dataclass(slots=True)
class Counter:
    """Events and bytes one watcher received."""

    events: int = 0
    nbytes: int = 0
    reread_bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, key: bytes, value: bytes) -> None:
        """Count one event."""
        self.events += 1
        self.nbytes += len(key) + len(value)
        kind = key.rsplit(b"/", 1)[-1].decode(errors="replace")
        if b"/servers/" in key:
            kind = "server entry"
        elif key.endswith(b"/servers"):
            kind = "server list"
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def _mac(n: int) -> str:
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


async def _workload(
    client: EtcdClient, layout: str, idcs: list[str], servers: int, steps: int
) -> None:
    """Add, approve, progress and complete every server of every IDC."""
    store = Store(client)

    async def one_idc(idc: str) -> None:
        v2 = V2Writer(client, idc)
        list_lock = trio.Lock()
        limit = trio.CapacityLimiter(8)

        async def machine(n: int) -> None:
            sn = f"sn-{n:04d}"
            async with limit:
                if layout == "v2":
                    await v2_machine(v2, list_lock, idc, sn, n)
                else:
                    await v3_machine(store, idc, sn, n)

        async with trio.open_nursery() as nursery:
            for n in range(servers):
                nursery.start_soon(machine, n)

    async def v2_machine(v2: V2Writer, lock: trio.Lock, idc: str, sn: str, n: int) -> None:
        now = utcnow()
        await v2.write_task(sn, task_doc(sn, task_id=f"task-{n:06x}", mac=_mac(n), created_at=now))
        await v2.write_state(sn, state_doc("pending", updated_at=now))
        async with lock:  # serialised: this benchmark counts traffic, not lost adds
            await v2.add_server(sn)
        kv = await client.get(tasks_key(idc, sn))
        assert kv is not None
        doc = json.loads(kv.value)
        doc["approval"] = {
            "approved": True,
            "approved_by": "bench",
            "approved_at": format_ts(utcnow()),
            "notes": "",
        }
        await v2.write_task(sn, doc)
        await v2.update_state(sn, lambda s: {**s, "status": "approved"})
        for i in range(steps):
            await v2.report_progress(sn, f"step{i}", 100, "ok", now=utcnow())
        await v2.update_state(sn, lambda s: {**s, "status": "completed"})

    async def v3_machine(store: Store, idc: str, sn: str, n: int) -> None:
        req = CreateTaskRequest(idc=idc, sn=sn, mac=_mac(n), os_type="Ubuntu 22.04")
        await store.create_task(req, actor="bench")
        await store.approve(idc, sn, approved_by="bench")
        for i in range(steps):
            await store.record_progress(idc, sn, step=f"step{i}", percent=100, message="ok")
        await store.finish(idc, sn, outcome=TaskStatus.COMPLETED)

    async with trio.open_nursery() as nursery:
        for idc in idcs:
            nursery.start_soon(one_idc, idc)


async def _watch_into(
    client: EtcdClient,
    key: str,
    prefix: bool,
    counter: Counter,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    on_event: Callable[[], Awaitable[None]] | None = None,
) -> None:
    async with watch(client, key, prefix=prefix) as stream:
        task_status.started()
        async for batch in stream:
            for ev in batch.events:
                counter.add(ev.kv.key, ev.kv.value)
                if on_event is not None:
                    await on_event()


async def run_round(
    client: EtcdClient, layout: str, run_id: str, rnd: int, idcs: int, servers: int, steps: int
) -> dict[str, Counter]:
    """One layout's workload with the dc1 regional's watchers attached."""
    names = [f"bench-{run_id}-{layout}-r{rnd}-dc{i + 1}" for i in range(idcs)]
    dc1 = names[0]
    counters = {w: Counter() for w in WATCHERS[layout]}
    async with trio.open_nursery() as nursery:
        if layout == "v2":
            lst, reg, rer = (counters[w] for w in WATCHERS["v2"])

            async def reread() -> None:
                kv = await client.get(list_key(dc1))
                rer.reread_bytes += len(kv.value) if kv else 0

            await nursery.start(_watch_into, client, list_key(dc1), False, lst)
            for c, hook in ((reg, None), (rer, reread)):
                await nursery.start(partial_watch(client, list_key(dc1), False, c, hook))
                await nursery.start(
                    partial_watch(client, schema.machines_prefix(dc1), True, c, None)
                )
        else:
            srv, reg, one = (counters[w] for w in WATCHERS["v3"])
            await nursery.start(_watch_into, client, schema.servers_prefix(dc1), True, srv)
            await nursery.start(_watch_into, client, schema.servers_prefix(dc1), True, reg)
            await nursery.start(_watch_into, client, schema.machines_prefix(dc1), True, reg)
            await nursery.start(_watch_into, client, schema.server_key(dc1, "sn-0000"), False, one)
        await _workload(client, layout, names, servers, steps)
        await trio.sleep(1.0)  # let the watches drain
        nursery.cancel_scope.cancel()
    for name in names:
        await client.delete(schema.idc_prefix(name), prefix=True)
        await client.delete(list_key(name))
    return counters


def partial_watch(
    client: EtcdClient,
    key: str,
    prefix: bool,
    counter: Counter,
    hook: Callable[[], Awaitable[None]] | None,
) -> Callable[..., Awaitable[None]]:
    """A ``nursery.start``-able watcher bound to its arguments."""

    async def go(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await _watch_into(client, key, prefix, counter, task_status, hook)

    return go


async def run(
    opts: BenchOptions, *, idcs: int = 10, servers: int | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    rounds = opts.rounds or (1 if opts.quick else 3)
    servers = servers or (30 if opts.quick else 100)
    steps = steps if steps is not None else (2 if opts.quick else 5)
    run_id = unique_suffix()
    per_round: dict[str, list[Counter]] = {w: [] for ws in WATCHERS.values() for w in ws}
    async with etcd_target(opts) as target, bench_client(target) as client:
        print(header("watch-traffic: what one dc1 regional receives", opts, target))
        print(
            f"{rounds} rounds; {idcs} IDCs x {servers} servers; each: add, approve, "
            f"{steps} progress updates, complete"
        )
        for rnd in range(rounds):
            for layout in LAYOUTS:
                counters = await run_round(client, layout, run_id, rnd, idcs, servers, steps)
                for w, c in counters.items():
                    per_round[w].append(c)
            print(f"  round {rnd + 1}/{rounds} done")

    def spread(w: str, attr: str) -> Spread:
        return Spread.of(float(getattr(c, attr)) for c in per_round[w])

    v2_reg_bytes = spread("v2 regional", "nbytes").median
    v2_reg_events = spread("v2 regional", "events").median
    rows = []
    table: list[dict[str, Any]] = []
    for layout in LAYOUTS:
        for w in WATCHERS[layout]:
            ev, by = spread(w, "events"), spread(w, "nbytes")
            rr = spread(w, "reread_bytes").median
            total = by.median + rr
            kinds = per_round[w][-1].by_kind
            rows.append(
                [
                    w,
                    f"{ev.median:.0f}",
                    f"{by.median / 1024:.1f}",
                    f"{rr / 1024:.1f}" if rr else "-",
                    f"{total / 1024:.1f}",
                    f"{100 * (ev.median / v2_reg_events - 1):+.0f}%" if v2_reg_events else "-",
                    f"{100 * (total / v2_reg_bytes - 1):+.0f}%" if v2_reg_bytes else "-",
                    ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                ]
            )
            table.append(
                {
                    "watcher": w,
                    "layout": layout,
                    "events": ev.to_dict(),
                    "event_bytes": by.to_dict(),
                    "reread_bytes": rr,
                    "total_bytes": total,
                    "events_by_kind": kinds,
                }
            )
    md = markdown_table(
        [
            "watcher (dc1 regional)",
            "events",
            "event KiB",
            "re-read KiB",
            "total KiB",
            "events vs v2 regional",
            "bytes vs v2 regional",
            "events by key kind",
        ],
        rows,
    )
    v3_total = next(r["total_bytes"] for r in table if r["watcher"] == "v3 regional")
    v3_events = next(r["events"]["median"] for r in table if r["watcher"] == "v3 regional")
    v2_rer = next(r["total_bytes"] for r in table if r["watcher"] == "v2 regional + list re-read")
    summary = {
        "bytes_reduction_vs_v2_regional_pct": 100 * (1 - v3_total / v2_reg_bytes),
        "bytes_reduction_vs_v2_rereading_pct": 100 * (1 - v3_total / v2_rer),
        "events_reduction_vs_v2_regional_pct": 100 * (1 - v3_events / v2_reg_events),
        "guide_claim_pct": 90,
    }
    print()
    print(md)
    print(
        f"v3 regional receives {100 * v3_total / v2_reg_bytes:.0f}% of the bytes and "
        f"{100 * v3_events / v2_reg_events:.0f}% of the events a v2 regional receives "
        f"({100 * v3_total / v2_rer:.0f}% of the bytes of one re-reading its list); "
        'the guide claims 10% ("90% less")'
    )
    results: dict[str, Any] = {
        "benchmark": NAME,
        "quick": opts.quick,
        "machine": machine_info(),
        "rounds": rounds,
        "idcs": idcs,
        "servers_per_idc": servers,
        "progress_steps": steps,
        "results": table,
        "summary": summary,
        "markdown": md,
    }
    png = plot_path(opts, NAME)
    if png is not None:
        _plot(png, table, idcs, servers, steps)
        print(f"plot: {png}")
        results["plot"] = str(png)
    path = write_results(opts, NAME, results)
    print(f"results: {path}")
    return results


def _plot(png: Any, table: list[dict[str, Any]], idcs: int, servers: int, steps: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    names = [r["watcher"] for r in table]
    colors = ["#d62728" if r["layout"] == "v2" else "#2ca02c" for r in table]
    axes[0].barh(names, [r["events"]["median"] for r in table], color=colors)
    axes[0].set_xlabel("events delivered")
    axes[1].barh(names, [r["event_bytes"]["median"] / 1024 for r in table], color=colors)
    axes[1].barh(
        names,
        [r["reread_bytes"] / 1024 for r in table],
        left=[r["event_bytes"]["median"] / 1024 for r in table],
        color="#ff9896",
        label="list re-reads",
    )
    axes[1].set_xlabel("KiB delivered (key + value)")
    axes[1].legend()
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    axes[1].set_yticks([])
    fig.suptitle(
        f"watch-traffic to one dc1 regional: {idcs} IDCs x {servers} servers, "
        f"add + approve + {steps} steps + complete"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench watch-traffic``."""
    p = sub.add_parser(NAME, help="events and bytes one dc1 regional receives, v2 vs v3")
    add_common_args(p)
    p.add_argument("--idcs", type=int, default=10, help="IDCs (default 10)")
    p.add_argument("--servers", type=int, help="servers per IDC (default 100; quick 30)")
    p.add_argument("--steps", type=int, help="progress updates per server (default 5)")
    p.set_defaults(bench=lambda o, a: run(o, idcs=a.idcs, servers=a.servers, steps=a.steps))
