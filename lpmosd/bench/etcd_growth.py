"""``lpmosd bench etcd-growth``: etcd bytes written per install, and the database size over
many installs with compaction.

A fleet of ``--machines`` machines is re-provisioned ``--installs`` times in all, ``--concurrency``
installs at once, through the store operations the roles make (the same documents, the
same Txns): create the task (with its enrolment), the agent registers (hardware, lease
key, agent token), approve, ``PROGRESS`` progress reports and ``LOG_BATCHES`` log batches of
``LOG_LINES`` lines, complete. A re-provisioning replaces the machine's finished task, as an
operator's new task does.

Bytes written: key + value of every put, as a watch on ``/os/`` delivers them (what etcd
keeps in its history until compaction). Compaction runs as the control plane's compactor
does, every ``--interval`` seconds of *fleet time*: the fleet installs ``--rate`` machines
per second (default: 1,000 machines installing at once, 15 minutes each), so a compaction
happens every ``rate × interval`` installs however fast the benchmark itself runs. The
database in use (Maintenance.Status ``dbSizeInUse``) is sampled after every compaction.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

import trio

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.bench.common import (
    BenchOptions,
    add_common_args,
    bench_client,
    etcd_target,
    header,
    machine_info,
    markdown_table,
    plot_path,
    write_results,
)
from lpmosd.compaction import Compactor
from lpmosd.credentials import AgentToken
from lpmosd.documents import MachineMeta, TaskStatus
from lpmosd.etcd import EtcdClient, EventType, watch
from lpmosd.store import Store
from lpmosd.timestamps import utcnow

NAME = "etcd-growth"
IDC = "bench-growth"
PROGRESS = 24  # 6 steps, 4 reports each
LOG_BATCHES = 12
LOG_LINES = 20
#: Typical installer output: apt's unpack lines, every one different (package, versions),
#: 99.5 characters on average. Log chunks are stored compressed, so one line repeated would
#: flatter the figure; varied lines compress like real output (3-4x in 20-line chunks).
_PACKAGES = [
    "linux-image-6.1.0-18-amd64",
    "libc6",
    "openssh-server",
    "systemd",
    "python3.11",
    "libssl3",
    "coreutils",
    "grub-efi-amd64",
    "bash",
    "perl-base",
    "libsystemd0",
    "udev",
    "dbus",
    "vim-tiny",
    "iproute2",
    "isc-dhcp-client",
    "tzdata",
    "locales",
    "ca-certificates",
    "openssl",
    "libgnutls30",
    "libkrb5-3",
    "e2fsprogs",
    "util-linux",
]


def log_line(machine: int, batch: int, i: int) -> str:
    """One installer-like line, different for every machine, batch and position."""
    rng = random.Random(machine * 100_003 + batch * 101 + i)
    pkg = f"{rng.choice(_PACKAGES)}{rng.randint(0, 99)}"
    new = f"{rng.randint(1, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 200)}-{rng.randint(1, 9)}"
    old = f"{rng.randint(1, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 200)}-{rng.randint(1, 9)}"
    arch = rng.choice(("amd64", "all"))
    return f"Unpacking {pkg}:{arch} ({new}) over ({old}) from ../{pkg}_{new}_{arch}.deb ..."


HARDWARE: dict[str, Any] = {
    "cpu_model": "Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz",
    "cpu_cores": 56,
    "memory_bytes": 512 << 30,
    "disks": [
        {
            "name": f"nvme{i}n1",
            "size_bytes": 3_840_755_982_336,
            "model": "PM9A3",
            "rotational": False,
        }
        for i in range(4)
    ],
    "nics": [
        {"name": f"eno{i}", "mac": f"02:00:00:00:01:0{i}", "speed_mbps": 25000} for i in range(2)
    ],
    "dmi": {"vendor": "Dell Inc.", "product": "PowerEdge R750", "serial": "SN001"},
}


def _mac(n: int) -> str:
    h = f"02{n:010x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


async def one_install(store: Store, client: EtcdClient, machine: int) -> None:
    """One install of ``machine`` through the store's operations."""
    sn = f"sn-{machine:06d}"
    req = CreateTaskRequest(idc=IDC, sn=sn, mac=_mac(machine), os_type="debian-12")
    await store.create_enrolled_task(req, actor="bench")
    lease = await client.lease_grant(60)
    meta = MachineMeta.from_report(HARDWARE, now=utcnow())
    record, _token = AgentToken.issue(task_id="t", mac=_mac(machine), now=utcnow())
    await store.register_agent(
        IDC,
        sn,
        mac=_mac(machine),
        meta=meta,
        lease_id=lease.id,
        token=record,
    )
    await store.approve(IDC, sn, approved_by="bench")
    steps = ("partitioning", "formatting", "base-system", "packages", "bootloader", "network")
    reports = [(s, pct) for s in steps for pct in (0, 33, 66, 100)][:PROGRESS]
    logs_every = max(1, len(reports) // LOG_BATCHES)
    for i, (step, pct) in enumerate(reports):
        await store.record_progress(IDC, sn, step=step, percent=pct, message=f"{step} {pct}%")
        if i % logs_every == 0:
            batch = [log_line(machine, i, j) for j in range(LOG_LINES)]
            await store.append_logs(IDC, sn, batch)
    await store.finish(IDC, sn, outcome=TaskStatus.COMPLETED)
    await client.lease_revoke(lease.id)


async def run(
    opts: BenchOptions,
    *,
    installs: int,
    machines: int,
    concurrency: int,
    interval: float,
    rate: float,
) -> dict[str, Any]:
    """Run the benchmark; returns the results written to JSON."""
    per_compaction = max(1, round(rate * interval)) if interval > 0 else math.inf
    written = {"bytes": 0, "puts": 0, "revision": 0}
    samples: list[dict[str, Any]] = []
    async with etcd_target(opts) as target, bench_client(target) as client:
        print(header("etcd-growth: bytes per install, database size with compaction", opts, target))
        print(
            f"{installs} installs on {machines} machines, {concurrency} at once; compaction every "
            f"{interval:g} s of fleet time = every {per_compaction} installs "
            f"(fleet rate {rate:.2f} installs/s)"
        )
        store = Store(client)
        compactor = Compactor(client, interval)
        await client.delete(schema.idc_prefix(IDC), prefix=True)
        start_rev = (await client.status()).revision

        async def count(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with watch(client, "/os/", start_revision=start_rev + 1) as w:
                task_status.started()
                async for batch in w:
                    for ev in batch.events:
                        if ev.type is EventType.PUT:
                            written["bytes"] += len(ev.kv.key) + len(ev.kv.value)
                            written["puts"] += 1
                    written["revision"] = batch.revision

        done = 0
        next_compaction = per_compaction
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(count)
            queue_send, queue_recv = trio.open_memory_channel[int](0)

            async def worker() -> None:
                nonlocal done
                async for n in queue_recv:
                    await one_install(store, client, n % machines)
                    done += 1

            async with trio.open_nursery() as workers:
                for _ in range(concurrency):
                    workers.start_soon(worker)
                async with queue_send:
                    for n in range(installs):
                        await queue_send.send(n)
                        if done >= next_compaction:
                            next_compaction += per_compaction
                            await compactor.run_round()
                            st = await client.status()
                            samples.append(
                                {
                                    "installs": done,
                                    "db_bytes": st.db_size,
                                    "db_in_use_bytes": st.db_size_in_use,
                                    "bytes_written": written["bytes"],
                                }
                            )
                            print(
                                f"  {done:>7} installs: db {st.db_size / 2**20:7.1f} MiB, in use "
                                f"{st.db_size_in_use / 2**20:7.1f} MiB, written "
                                f"{written['bytes'] / 2**20:9.1f} MiB",
                                flush=True,
                            )
            elapsed = time.perf_counter() - t0
            final_rev = (await client.status()).revision
            with trio.move_on_after(60):
                while written["revision"] < final_rev:  # noqa: ASYNC110 - the watch's counter
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        st = await client.status()
        await client.delete(schema.idc_prefix(IDC), prefix=True)
    per_install = written["bytes"] / max(1, installs)
    peak_in_use = max([s["db_in_use_bytes"] for s in samples] + [st.db_size_in_use])
    rows = [
        ["installs", f"{installs}"],
        ["etcd bytes written per install", f"{per_install / 1024:.1f} KiB"],
        ["puts per install", f"{written['puts'] / max(1, installs):.1f}"],
        ["database in use, peak", f"{peak_in_use / 2**20:.1f} MiB"],
        ["database file at the end", f"{st.db_size / 2**20:.1f} MiB"],
        ["installs per second (benchmark)", f"{installs / elapsed:.1f}"],
    ]
    print(markdown_table(["figure", "value"], rows))
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": opts.quick,
        "machine": machine_info(),
        "installs": installs,
        "machines": machines,
        "concurrency": concurrency,
        "interval": interval,
        "fleet_rate": rate,
        "installs_per_compaction": per_compaction if interval > 0 else None,
        "bytes_written": written["bytes"],
        "bytes_per_install": per_install,
        "puts": written["puts"],
        "peak_db_in_use_bytes": peak_in_use,
        "final_db_bytes": st.db_size,
        "elapsed_s": elapsed,
        "samples": samples,
    }
    png = plot_path(opts, NAME)
    if png is not None and samples:
        _plot(png, samples, per_compaction)
        print(f"plot: {png}")
        data["plot"] = str(png)
    path = write_results(opts, NAME, data)
    print(f"results: {path}")
    return data


def _plot(png: Any, samples: list[dict[str, Any]], per_compaction: float) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = [s["installs"] for s in samples]
    mib = float(1 << 20)
    ax.plot(xs, [s["db_in_use_bytes"] / mib for s in samples], label="database in use")
    ax.plot(xs, [s["db_bytes"] / mib for s in samples], label="database file")
    ax.axhline(256, color="red", ls="--", label="goal: in use < 256 MiB")
    ax.set_xlabel(f"installs (a compaction every {per_compaction:g})")
    ax.set_ylabel("MiB")
    ax.set_title("etcd-growth: etcd's database over many installs, with compaction")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench etcd-growth``."""
    p = sub.add_parser(NAME, help="etcd bytes per install; database size with compaction")
    add_common_args(p)
    p.add_argument("--installs", type=int, help="installs in all (default 50000; quick 100)")
    p.add_argument("--machines", type=int, default=5000, help="fleet size (default 5000)")
    p.add_argument("--concurrency", type=int, default=32, help="installs at once (default 32)")
    p.add_argument(
        "--interval", type=float, default=300.0, help="compaction interval, fleet seconds"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=1000 / 900,
        help="fleet installs per second (default: 1,000 at once, 15 min each)",
    )
    p.set_defaults(
        bench=lambda o, a: run(
            o,
            installs=a.installs or (100 if o.quick else 50_000),
            machines=a.machines,
            concurrency=a.concurrency,
            interval=a.interval,
            rate=a.rate,
        )
    )
