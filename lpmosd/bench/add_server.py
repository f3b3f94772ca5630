"""``lpmosd bench add-server``: the guide's "10x faster to add a server", measured.

Variants, interleaved in every round:

* ``v2``: the guide's v2 code (:meth:`lpmosd.migrate.v2.V2Writer.add_server`): read the
  IDC's server list, append, write it back unguarded;
* ``v3-put``: the guide's v3 code: one put of ``/os/{idc}/servers/{sn}``;
* ``lpmosd``: lpmosd's real create (:meth:`lpmosd.store.Store.create_task`): one Txn that
  creates the server entry and the task document, guarded on both being absent.

With 1 writer and with 16 concurrent writers, each IDC pre-loaded with ``--preload``
servers. Reported: latency p50/p99, throughput, and servers lost (added, acknowledged,
yet missing at the end: v2's read-modify-write race; v3 must lose none).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.bench.common import (
    BenchOptions,
    RoundResults,
    add_common_args,
    bench_client,
    etcd_target,
    header,
    latency_summary,
    machine_info,
    markdown_table,
    plot_path,
    unique_suffix,
    write_results,
)
from lpmosd.documents import ServerEntry, TaskStatus
from lpmosd.etcd import EtcdClient, put
from lpmosd.etcd.txn import MAX_TXN_OPS
from lpmosd.migrate.v2 import V2Writer, list_key
from lpmosd.store import Store
from lpmosd.timestamps import utcnow

NAME = "add-server"
VARIANTS = ("v2", "v3-put", "lpmosd")
WRITERS = (1, 16)

AddFn = Callable[[str], Awaitable[None]]


def _mac(n: int) -> str:
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


async def _preload(client: EtcdClient, variant: str, idc: str, count: int) -> None:
    """Put ``count`` existing servers in the IDC, in the variant's layout."""
    sns = [f"old-{i:05d}" for i in range(count)]
    if variant == "v2":
        await client.put(list_key(idc), json.dumps(sns))
        return
    now = utcnow()
    ops = []
    for i, sn in enumerate(sns):
        entry = ServerEntry(
            sn=sn,
            mac=_mac(i),
            status=TaskStatus.PENDING,
            added_at=now,
            updated_at=now,
            task_id=f"task-{i:012x}",
        )
        ops.append(put(schema.server_key(idc, sn), entry.to_json()))
        if len(ops) == MAX_TXN_OPS:
            await client.txn([], ops, [])
            ops = []
    if ops:
        await client.txn([], ops, [])


def _adder(client: EtcdClient, variant: str, idc: str) -> AddFn:
    if variant == "v2":
        writer = V2Writer(client, idc)
        return writer.add_server
    if variant == "v3-put":

        async def add_put(sn: str) -> None:
            now = utcnow()
            entry = ServerEntry(
                sn=sn,
                mac=_mac(hash(sn) & 0xFFFFFFFF),
                status=TaskStatus.PENDING,
                added_at=now,
                updated_at=now,
                task_id="",
            )
            await client.put(schema.server_key(idc, sn), entry.to_json())

        return add_put
    store = Store(client)

    async def add_create(sn: str) -> None:
        req = CreateTaskRequest(
            idc=idc,
            sn=sn,
            mac=_mac(hash(sn) & 0xFFFFFFFF),
            os_type="Ubuntu 22.04",
            os_version="22.04",
        )
        await store.create_task(req, actor="bench")

    return add_create


async def _count_present(
    client: EtcdClient, variant: str, idc: str, added: list[str]
) -> tuple[int, int]:
    """(servers present of those added, extra check failures) at the end of a cell."""
    if variant == "v2":
        writer = V2Writer(client, idc)
        listed = set(map(str, await writer.read_list()))
        return sum(1 for sn in added if sn in listed), 0
    servers = await client.get_prefix(schema.servers_prefix(idc))
    keys = {kv.key.decode() for kv in servers.kvs}
    present = sum(1 for sn in added if schema.server_key(idc, sn) in keys)
    bad = 0
    if variant == "lpmosd":
        tasks = await client.get_prefix(schema.machines_prefix(idc))
        tkeys = {kv.key.decode() for kv in tasks.kvs}
        bad = sum(1 for sn in added if schema.task_key(idc, sn) not in tkeys)
    return present, bad


async def run_cell(
    client: EtcdClient, variant: str, writers: int, ops: int, preload: int, run_id: str, rnd: int
) -> tuple[dict[str, Any], list[float]]:
    """One variant × writer-count measurement: ``ops`` adds split over ``writers``."""
    idc = f"bench-{run_id}-{variant.replace('-', '')}-w{writers}-r{rnd}"
    await _preload(client, variant, idc, preload)
    add = _adder(client, variant, idc)
    latencies: list[float] = []
    added: list[str] = []
    errors = 0

    async def writer(w: int) -> None:
        nonlocal errors
        for i in range(w, ops, writers):
            sn = f"new-{i:05d}"
            t0 = time.perf_counter()
            try:
                await add(sn)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            added.append(sn)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, w)
    wall = time.perf_counter() - t0
    present, bad = await _count_present(client, variant, idc, added)
    await client.delete(schema.idc_prefix(idc), prefix=True)
    await client.delete(list_key(idc))
    record = {
        "round": rnd,
        "ops": len(added),
        "errors": errors,
        "wall_s": wall,
        "throughput": len(added) / wall if wall else 0.0,
        "lost": len(added) - present,
        "missing_tasks": bad,
        **latency_summary(latencies),
    }
    return record, latencies


async def run(
    opts: BenchOptions, *, ops: int | None = None, preload: int | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    rounds = opts.rounds or (2 if opts.quick else 5)
    ops = ops or (160 if opts.quick else 800)
    preload = preload if preload is not None else (200 if opts.quick else 1000)
    run_id = unique_suffix()
    cells: dict[tuple[str, int], RoundResults] = {
        (v, w): RoundResults() for v in VARIANTS for w in WRITERS
    }
    async with etcd_target(opts) as target, bench_client(target) as client:
        print(header("add-server: v2 list RMW vs v3 put vs lpmosd create Txn", opts, target))
        print(f"{rounds} rounds x {ops} adds per cell, {preload} servers pre-loaded per IDC")
        for rnd in range(rounds):
            for writers in WRITERS:
                for variant in VARIANTS:  # interleaved: A B C A B C ...
                    record, lats = await run_cell(
                        client, variant, writers, ops, preload, run_id, rnd
                    )
                    cell = cells[(variant, writers)]
                    cell.rounds.append(record)
                    cell.samples.extend(lats)
            print(f"  round {rnd + 1}/{rounds} done")
    rows = []
    table: list[dict[str, Any]] = []
    for writers in WRITERS:
        base = cells[("v2", writers)].spread("p50_ms").median
        for variant in VARIANTS:
            cell = cells[(variant, writers)]
            p50 = cell.spread("p50_ms")
            p99 = cell.spread("p99_ms")
            thr = cell.spread("throughput")
            lost = int(cell.total("lost"))
            added = int(cell.total("ops"))
            speedup = base / p50.median if p50.median else float("nan")
            rows.append(
                [
                    variant,
                    str(writers),
                    p50.fmt(2),
                    p99.fmt(2),
                    thr.fmt(0),
                    f"{speedup:.1f}x",
                    f"{lost} of {added}",
                ]
            )
            table.append(
                {
                    "variant": variant,
                    "writers": writers,
                    "p50_ms": p50.to_dict(),
                    "p99_ms": p99.to_dict(),
                    "throughput": thr.to_dict(),
                    "speedup_p50_vs_v2": speedup,
                    "lost": lost,
                    "added": added,
                    "errors": int(cell.total("errors")),
                    "missing_tasks": int(cell.total("missing_tasks")),
                    "rounds": cell.rounds,
                }
            )
    md = markdown_table(
        ["variant", "writers", "p50 ms", "p99 ms", "adds/s", "p50 vs v2", "servers lost"], rows
    )
    print()
    print(md)
    print("(median [min–max] over rounds; lost = acknowledged adds missing at the end)")
    results = {
        "benchmark": NAME,
        "quick": opts.quick,
        "machine": machine_info(),
        "rounds": rounds,
        "ops_per_cell": ops,
        "preload": preload,
        "results": table,
        "markdown": md,
    }
    path = write_results(opts, NAME, results)
    print(f"results: {path}")
    png = plot_path(opts, NAME)
    if png is not None:
        _plot(png, cells, rounds, ops)
        print(f"plot: {png}")
        results["plot"] = str(png)
    v3_lost = sum(int(cells[(v, w)].total("lost")) for v in VARIANTS[1:] for w in WRITERS)
    if v3_lost:
        print(f"WARNING: v3 variants lost {v3_lost} servers: that is a bug")
    return results


def _plot(png: Any, cells: dict[tuple[str, int], RoundResults], rounds: int, ops: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"v2": "#d62728", "v3-put": "#2ca02c", "lpmosd": "#1f77b4"}
    for ax, writers in zip(axes, WRITERS, strict=True):
        data = [[s * 1e3 for s in cells[(v, writers)].samples] for v in VARIANTS]
        parts = ax.boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True)
        for patch, v in zip(parts["boxes"], VARIANTS, strict=True):
            patch.set_facecolor(colors[v])
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(VARIANTS) + 1), list(VARIANTS))
        ax.set_yscale("log")
        ax.set_ylabel("latency per add (ms, log)")
        lost = int(cells[("v2", writers)].total("lost"))
        ax.set_title(f"{writers} writer{'s' if writers > 1 else ''} (v2 lost {lost})")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"add-server: {rounds} rounds x {ops} adds, whiskers p1–p99")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench add-server``."""
    p = sub.add_parser(NAME, help="v2 list read-modify-write vs v3 put vs lpmosd create")
    add_common_args(p)
    p.add_argument("--ops", type=int, help="adds per cell (default 800; quick 160)")
    p.add_argument("--preload", type=int, help="servers already in each IDC (default 1000)")
    p.set_defaults(bench=lambda o, a: run(o, ops=a.ops, preload=a.preload))
