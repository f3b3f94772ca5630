"""``lpmosd bench progress-update``: the guide's "2x faster progress, consistency guaranteed".

Variants, interleaved in every round:

* ``v2``: the guide's "Bad (v2.x)" code: read-modify-write the ``tasks`` document (append
  the step), then read-modify-write the ``state`` document (status, step, log line) with
  :meth:`lpmosd.migrate.v2.V2Writer.report_progress`; both unguarded;
* ``v3``: the guide's "Good (v3.0)" ``AtomicUpdate``: read the merged task document, append
  the step, set the status, append a log line, compare-and-swap it in one Txn (lpmosd's
  :meth:`~lpmosd.etcd.EtcdClient.atomic_update`, read first as the guide does);
* ``lpmosd``: lpmosd's real path (:meth:`lpmosd.store.Store.record_progress`): the model's
  validation and one CAS Txn that writes the task and its server entry, against the
  revision the writer already holds (as the regional does with its watch cache).

Configurations: 1 writer; 16 writers on 16 machines; 8 writers on one machine. A reader
runs alongside, reading both documents of a random machine in one snapshot (a read-only
Txn) and counting how often they disagree: v2's ``tasks`` and ``state`` (their step counts),
v3's task status and server entry status. Lost updates: for ``v2`` and ``v3`` every update
appends one step, so lost = acknowledged updates − steps present at the end (for v2, in
either document); for ``lpmosd`` (one entry per step, updated in place) each writer owns a
step, and a lost update shows as that step not holding the writer's last value.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from lpmosd.etcd import EtcdClient, KeyValue, RangeResult, get
from lpmosd.migrate.v2 import V2Writer, state_doc, state_key, task_doc, tasks_key
from lpmosd.store import Store
from lpmosd.timestamps import format_ts, utcnow

NAME = "progress-update"
VARIANTS = ("v2", "v3", "lpmosd")


@dataclass(frozen=True, slots=True)
class Shape:
    """A writer configuration: ``writers`` writers over ``machines`` machines."""

    label: str
    writers: int
    machines: int


SHAPES = (
    Shape("1 writer", 1, 1),
    Shape("16 writers, 16 machines", 16, 16),
    Shape("8 writers, 1 machine", 8, 1),
)

UpdateFn = Callable[[int, int, int], Awaitable[None]]  # (machine, writer, i)


def _mac(n: int) -> str:
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def _step(writer: int, i: int) -> dict[str, Any]:
    return {
        "step": f"w{writer:02d}-{i:04d}",
        "percent": i % 101,
        "timestamp": format_ts(utcnow()),
        "message": f"writer {writer} update {i}",
    }


class Cell:
    """One variant × shape measurement: setup, the update function, the final checks."""

    def __init__(self, client: EtcdClient, variant: str, shape: Shape, idc: str) -> None:
        self.client = client
        self.variant = variant
        self.shape = shape
        self.idc = idc
        self.sns = [f"m-{m:03d}" for m in range(shape.machines)]
        self.store = Store(client)
        self.v2 = V2Writer(client, idc)
        #: lpmosd: the task KeyValue each writer last saw (the regional's watch cache).
        self.cache: dict[str, KeyValue] = {}
        #: lpmosd: last percent acknowledged per (machine, writer).
        self.last_sent: dict[tuple[int, int], int] = {}

    async def setup(self) -> None:
        """Create the machines' documents, approved and ready for progress."""
        now = utcnow()
        for m, sn in enumerate(self.sns):
            if self.variant == "v2":
                doc = task_doc(sn, task_id=f"task-{m:06x}", mac=_mac(m), created_at=now)
                doc["progress"] = []  # the guide's v2 appends steps to the tasks document
                await self.v2.write_task(sn, doc)
                await self.v2.write_state(sn, state_doc("approved", updated_at=now))
                await self.v2.add_server(sn)
            else:
                req = CreateTaskRequest(idc=self.idc, sn=sn, mac=_mac(m), os_type="Ubuntu 22.04")
                await self.store.create_task(req, actor="bench")
                await self.store.approve(self.idc, sn, approved_by="bench")
                stored = await self.store.get_task(self.idc, sn)
                assert stored.kv is not None
                self.cache[sn] = stored.kv

    async def update(self, machine: int, writer: int, i: int) -> None:
        """One progress report of ``writer`` on ``machine``."""
        sn = self.sns[machine]
        if self.variant == "v2":
            step = _step(writer, i)

            def add_to_tasks(doc: dict[str, Any]) -> dict[str, Any]:
                doc.setdefault("progress", []).append(step)
                return doc

            kv = await self.client.get(tasks_key(self.idc, sn))
            doc = add_to_tasks(json.loads(kv.value) if kv else {})
            await self.v2.write_task(sn, doc)
            await self.v2.report_progress(
                sn, step["step"], step["percent"], step["message"], now=utcnow()
            )
        elif self.variant == "v3":
            step = _step(writer, i)

            def fn(kv: KeyValue | None) -> bytes:
                assert kv is not None
                task = json.loads(kv.value)
                task["progress"].append(step)
                task["status"] = "installing"
                task["logs"].append(f"{step['timestamp']} [INFO] {step['step']} started")
                task["updated_at"] = step["timestamp"]
                return json.dumps(task, separators=(",", ":")).encode()

            await self.client.atomic_update(schema.task_key(self.idc, sn), fn)
        else:
            percent = i % 101
            stored = await self.store.record_progress(
                self.idc,
                sn,
                step=f"w{writer:02d}",
                percent=percent,
                message=f"update {i}",
                current=self.cache.get(sn),
            )
            if stored.kv is not None:
                old = self.cache.get(sn)
                if old is None or old.mod_revision < stored.kv.mod_revision:
                    self.cache[sn] = stored.kv
            self.last_sent[(machine, writer)] = percent

    async def consistent_snapshot(self) -> bool:
        """Read one random machine's two documents in one snapshot: do they agree?"""
        sn = random.choice(self.sns)
        if self.variant == "v2":
            keys = (tasks_key(self.idc, sn), state_key(self.idc, sn))
        else:
            keys = (schema.task_key(self.idc, sn), schema.server_key(self.idc, sn))
        r = await self.client.txn([], [get(k) for k in keys], [])
        a, b = (
            res.kvs[0].value if isinstance(res, RangeResult) and res.kvs else b"{}"
            for res in r.responses
        )
        da, db = json.loads(a), json.loads(b)
        if self.variant == "v2":
            return len(da.get("progress", [])) == len(db.get("progress", []))
        if self.variant == "v3":
            # The guide's v3 update writes the merged task only: status and steps agree?
            return bool((da.get("status") == "installing") == bool(da.get("progress")))
        return bool(da.get("status") == db.get("status"))  # lpmosd: task and server entry

    async def lost(self, acked: dict[int, int]) -> int:
        """Acknowledged updates whose effect is missing now (``acked``: machine -> count)."""
        lost = 0
        for m, sn in enumerate(self.sns):
            if self.variant == "v2":
                t = await self.client.get(tasks_key(self.idc, sn))
                s = await self.client.get(state_key(self.idc, sn))
                nt = len(json.loads(t.value).get("progress", [])) if t else 0
                ns = len(json.loads(s.value).get("progress", [])) if s else 0
                lost += acked.get(m, 0) - min(nt, ns)
            elif self.variant == "v3":
                kv = await self.client.get(schema.task_key(self.idc, sn))
                n = len(json.loads(kv.value)["progress"]) if kv else 0
                lost += acked.get(m, 0) - n
            else:
                task = (await self.store.get_task(self.idc, sn)).task
                have = {p.step: p.percent for p in task.progress}
                for (mm, w), percent in self.last_sent.items():
                    if mm == m and have.get(f"w{w:02d}") != percent:
                        lost += 1
        return lost

    async def cleanup(self) -> None:
        """Delete the cell's keys."""
        await self.client.delete(schema.idc_prefix(self.idc), prefix=True)
        await self.client.delete(schema.ROOT + self.idc + "/servers")


async def run_cell(
    client: EtcdClient, variant: str, shape: Shape, updates: int, run_id: str, rnd: int
) -> tuple[dict[str, Any], list[float]]:
    """``updates`` progress reports per writer, with a consistency reader alongside."""
    idc = f"bench-{run_id}-{variant}-{shape.writers}x{shape.machines}-r{rnd}"
    cell = Cell(client, variant, shape, idc)
    await cell.setup()
    latencies: list[float] = []
    acked: dict[int, int] = {}
    errors = 0
    reads = disagree = 0
    done = trio.Event()

    async def writer(w: int) -> None:
        nonlocal errors
        machine = w % shape.machines
        for i in range(updates):
            t0 = time.perf_counter()
            try:
                await cell.update(machine, w, i)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            acked[machine] = acked.get(machine, 0) + 1

    async def reader() -> None:
        nonlocal reads, disagree
        while not done.is_set():
            reads += 1
            if not await cell.consistent_snapshot():
                disagree += 1
            await trio.sleep(0.002)

    t0 = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(reader)
        async with trio.open_nursery() as nursery:
            for w in range(shape.writers):
                nursery.start_soon(writer, w)
        wall = time.perf_counter() - t0
        done.set()
    lost = await cell.lost(acked)
    await cell.cleanup()
    n = len(latencies)
    record = {
        "round": rnd,
        "updates": n,
        "errors": errors,
        "wall_s": wall,
        "throughput": n / wall if wall else 0.0,
        "lost": lost,
        "reads": reads,
        "disagree": disagree,
        "disagree_pct": 100.0 * disagree / reads if reads else 0.0,
        **latency_summary(latencies),
    }
    return record, latencies


async def run(opts: BenchOptions, *, updates: int | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    rounds = opts.rounds or (2 if opts.quick else 5)
    updates = updates or (25 if opts.quick else 100)
    run_id = unique_suffix()
    cells = {(v, s.label): RoundResults() for v in VARIANTS for s in SHAPES}
    async with etcd_target(opts) as target, bench_client(target) as client:
        print(header("progress-update: v2 two RMWs vs v3 one CAS Txn", opts, target))
        print(f"{rounds} rounds x {updates} updates per writer")
        for rnd in range(rounds):
            for shape in SHAPES:
                for variant in VARIANTS:
                    record, lats = await run_cell(client, variant, shape, updates, run_id, rnd)
                    cell = cells[(variant, shape.label)]
                    cell.rounds.append(record)
                    cell.samples.extend(lats)
            print(f"  round {rnd + 1}/{rounds} done")
    rows = []
    table: list[dict[str, Any]] = []
    for shape in SHAPES:
        base = cells[("v2", shape.label)].spread("p50_ms").median
        for variant in VARIANTS:
            c = cells[(variant, shape.label)]
            p50, p99, thr = c.spread("p50_ms"), c.spread("p99_ms"), c.spread("throughput")
            reads, disagree = int(c.total("reads")), int(c.total("disagree"))
            lost, acked = int(c.total("lost")), int(c.total("updates"))
            errs = int(c.total("errors"))
            speedup = base / p50.median if p50.median else float("nan")
            pct = 100.0 * disagree / reads if reads else 0.0
            rows.append(
                [
                    variant,
                    shape.label,
                    p50.fmt(2),
                    p99.fmt(2),
                    thr.fmt(0),
                    f"{speedup:.1f}x",
                    f"{lost} of {acked}" + (f" ({errs} gave up)" if errs else ""),
                    f"{disagree} of {reads} ({pct:.1f}%)",
                ]
            )
            table.append(
                {
                    "variant": variant,
                    "shape": shape.label,
                    "writers": shape.writers,
                    "machines": shape.machines,
                    "p50_ms": p50.to_dict(),
                    "p99_ms": p99.to_dict(),
                    "throughput": thr.to_dict(),
                    "speedup_p50_vs_v2": speedup,
                    "lost": lost,
                    "acked": acked,
                    "reads": reads,
                    "disagree": disagree,
                    "errors": int(c.total("errors")),
                    "rounds": c.rounds,
                }
            )
    md = markdown_table(
        [
            "variant",
            "writers",
            "p50 ms",
            "p99 ms",
            "updates/s",
            "p50 vs v2",
            "lost updates",
            "reader saw disagreement",
        ],
        rows,
    )
    print()
    print(md)
    print(
        "(median [min–max] over rounds; lost and disagreement summed over rounds; "
        "'gave up': CAS still conflicting after 20 attempts, reported to the caller)"
    )
    results: dict[str, Any] = {
        "benchmark": NAME,
        "quick": opts.quick,
        "machine": machine_info(),
        "rounds": rounds,
        "updates_per_writer": updates,
        "results": table,
        "markdown": md,
    }
    png = plot_path(opts, NAME)
    if png is not None:
        _plot(png, cells, rounds, updates)
        print(f"plot: {png}")
        results["plot"] = str(png)
    path = write_results(opts, NAME, results)
    print(f"results: {path}")
    bad = [r for r in table if r["variant"] != "v2" and (r["lost"] or r["disagree"])]
    if bad:
        print(f"WARNING: v3 lost updates or disagreed: {bad}: that is a bug")
    return results


def _plot(png: Any, cells: dict[tuple[str, str], RoundResults], rounds: int, updates: int) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(14, 4.2))
    colors = {"v2": "#d62728", "v3": "#2ca02c", "lpmosd": "#1f77b4"}
    for ax, shape in zip(axes, SHAPES, strict=True):
        data = [[s * 1e3 for s in cells[(v, shape.label)].samples] for v in VARIANTS]
        parts = ax.boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True)
        for patch, v in zip(parts["boxes"], VARIANTS, strict=True):
            patch.set_facecolor(colors[v])
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(VARIANTS) + 1), list(VARIANTS))
        ax.set_yscale("log")
        ax.set_ylabel("latency per update (ms, log)")
        lost = int(cells[("v2", shape.label)].total("lost"))
        ax.set_title(f"{shape.label}\n(v2 lost {lost} updates)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"progress-update: {rounds} rounds x {updates} updates/writer, whiskers p1–p99")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench progress-update``."""
    p = sub.add_parser(NAME, help="v2 two read-modify-writes vs v3 one CAS Txn")
    add_common_args(p)
    p.add_argument("--updates", type=int, help="updates per writer (default 100; quick 25)")
    p.set_defaults(bench=lambda o, a: run(o, updates=a.updates))
