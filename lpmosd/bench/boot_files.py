"""``lpmosd bench boot-files``: a wave of machines pulling an OS image from the regional.

A boot server's real load is images: each machine of a wave downloads hundreds of MB.
``--downloads`` parallel downloads (curl ``--parallel``, to ``/dev/null``) of one
``--size-mb`` image from the regional's ``/boot/files/``, against nginx (Debian's
``nginx-light``, one worker, ``sendfile on``, started by the benchmark on loopback) serving
the same file in the same run; the variants alternate over the rounds. Reported: aggregate
MB/s of each and their ratio (goal ≥ 0.8x), the regional's CPU and RSS while serving (RSS
must stay flat: files are streamed, never read whole), and the agent API's heartbeat p99
(simulated agents heartbeat throughout) idle, during the regional's downloads and during
nginx's (agents must not starve while images stream).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from lpmosd.bench.agents import FleetStats, SimAgent, agent_mac
from lpmosd.bench.common import (
    BenchOptions,
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
from lpmosd.bench.procs import LpmosdProcess, cpu_seconds, free_port, running, write_config

NAME = "boot-files"
IMAGE = "images/bench.img"
NGINX = "/usr/sbin/nginx"


def rss_mib(pid: int) -> float:
    """Current resident set size (VmRSS) of ``pid`` in MiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def make_image(root: Path, size_mb: int) -> Path:
    """A ``size_mb`` MiB file of random bytes (incompressible, as images are)."""
    path = root / IMAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    # nginx started as root serves as "nobody": the image must be world-readable.
    for d in (root.parent, root, path.parent):
        d.chmod(0o755)
    block = os.urandom(4 * 1024 * 1024)
    with path.open("wb") as f:
        for i in range(size_mb // 4):
            f.write(block[i % 7 :] + block[: i % 7])  # not one repeated block
        f.write(block[: (size_mb % 4) * 1024 * 1024])
    return path


def nginx_conf(workdir: Path, artifacts: Path, port: int) -> Path:
    """One worker, sendfile, the artifacts at ``/boot/files/`` like the regional."""
    conf = workdir / "nginx.conf"
    tmp = workdir / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    conf.write_text(
        f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    server {{
        listen 127.0.0.1:{port};
        location /boot/files/ {{ alias {artifacts}/; }}
    }}
}}
"""
    )
    return conf


def spawn_nginx(workdir: Path, conf: Path) -> subprocess.Popen[bytes]:
    """nginx in the foreground (its master and worker)."""
    return subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log"),
         "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


async def start_nginx(workdir: Path, conf: Path, port: int) -> subprocess.Popen[bytes]:
    """:func:`spawn_nginx`, ready when it accepts."""
    proc = await trio.to_thread.run_sync(spawn_nginx, workdir, conf)
    deadline = time.monotonic() + 10
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "nginx-error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx did not start: {log[-2000:]}") from None
            await trio.sleep(0.05)
        else:
            await stream.aclose()
            return proc


def worker_pids(master: int) -> list[int]:
    """The master's children (nginx's worker)."""
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


async def download_wave(port: int, downloads: int, size: int) -> float:
    """``downloads`` parallel GETs of the image with curl; returns the wall seconds."""
    url = f"http://127.0.0.1:{port}/boot/files/{IMAGE}"
    argv = ["curl", "--parallel", "--parallel-immediate", "--parallel-max", str(downloads),
            "--silent", "--show-error", "--fail", "-w", "%{size_download}\n"]  # fmt: skip
    for _ in range(downloads):
        argv += ["-o", "/dev/null", url]
    t0 = time.perf_counter()
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    elapsed = time.perf_counter() - t0
    sizes = [int(x) for x in result.stdout.split()]
    if result.returncode != 0 or sizes != [size] * downloads:
        raise RuntimeError(
            f"download wave failed (rc {result.returncode}): {result.stderr.decode()[-500:]}"
        )
    return elapsed


async def heartbeats(agents: list[SimAgent], stop: trio.Event, interval: float) -> None:
    """Every agent heartbeats every ``interval`` seconds until ``stop``."""

    async def one(agent: SimAgent) -> None:
        while not stop.is_set():
            await agent.heartbeat()
            with trio.move_on_after(interval):
                await stop.wait()

    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(one, agent)


def p99_ms(samples: list[float]) -> float:
    return percentile(samples, 99) * 1000 if samples else 0.0


async def run(
    opts: BenchOptions, *, downloads: int, size_mb: int | None, agents: int
) -> dict[str, Any]:
    """Run the benchmark; print the table; return (and write) the results."""
    if shutil.which("curl") is None or shutil.which(NGINX) is None:
        raise RuntimeError("needs curl and nginx-light (scripts/bootstrap installs them)")
    size_mb = size_mb or (16 if opts.quick else 250)
    rounds = opts.rounds or (1 if opts.quick else 3)
    async with etcd_target(opts) as target:
        print(header(f"Boot files: {downloads} x {size_mb} MiB image downloads", opts, target))
        with tempfile.TemporaryDirectory(prefix="lpmosd-bench-boot-") as tmp:
            workdir = Path(tmp)
            artifacts = workdir / "artifacts"
            image = await trio.to_thread.run_sync(make_image, artifacts, size_mb)
            size = image.stat().st_size
            rg_port, nginx_port = free_port(), free_port()
            conf = write_config(
                workdir / "regional.toml",
                role="regional",
                idc=IDC,
                endpoints=target.endpoints,
                port=rg_port,
                lease_ttl=30,
                heartbeat_interval=10,
            )
            with conf.open("a") as f:
                f.write(f'\n[regional.boot]\nartifacts_dir = "{artifacts}"\n')
            regional = LpmosdProcess("regional", conf, rg_port, workdir / "regional.log")
            nginx = await start_nginx(
                workdir, nginx_conf(workdir, artifacts, nginx_port), nginx_port
            )
            try:
                async with running([regional]), bench_client(target) as client:
                    secrets = await create_tasks(client, IDC, agents)
                    stats = FleetStats()
                    sims = [
                        SimAgent("127.0.0.1", rg_port, sn, agent_mac(i), stats, secret)
                        for i, (sn, secret) in enumerate(sorted(secrets.items()))
                    ]
                    for sim in sims:
                        if not await sim.register():
                            raise RuntimeError(f"register failed: {stats.errors[-1:]}")
                    results = await _measure(
                        regional.pid, nginx, sims, stats, rg_port, nginx_port,
                        downloads=downloads, size=size, rounds=rounds,
                    )  # fmt: skip
                    for sim in sims:
                        await sim.aclose()
            finally:
                nginx.terminate()
                await trio.to_thread.run_sync(nginx.wait, 10)
    results.update(
        benchmark=NAME,
        downloads=downloads,
        size_mib=size_mb,
        rounds=rounds,
        agents=agents,
        machine=machine_info(),
    )
    _print(results)
    write_results(opts, NAME, results)
    png = plot_path(opts, NAME)
    if png is not None:
        _plot(png, results)
    return results


async def _measure(
    rg_pid: int,
    nginx: subprocess.Popen[bytes],
    sims: list[SimAgent],
    stats: FleetStats,
    rg_port: int,
    nginx_port: int,
    *,
    downloads: int,
    size: int,
    rounds: int,
) -> dict[str, Any]:
    hb_interval = 0.1
    total_mb = downloads * size / 1e6
    phases: dict[str, list[float]] = {"idle": [], "lpmosd": [], "nginx": []}
    mbps: dict[str, list[float]] = {"lpmosd": [], "nginx": []}
    cpu: dict[str, list[float]] = {"lpmosd": [], "nginx": []}
    rss_samples: list[float] = []
    rss_before = rss_mib(rg_pid)

    async def sample_rss(done: trio.Event) -> None:
        while not done.is_set():
            rss_samples.append(rss_mib(rg_pid))
            with trio.move_on_after(0.2):
                await done.wait()

    async def phase(name: str) -> float:
        """One phase with agents heartbeating: idle (3 s) or a download wave."""
        stats.latencies.pop("heartbeat", None)
        stop, done = trio.Event(), trio.Event()
        elapsed = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats, sims, stop, hb_interval)
            if name == "lpmosd":
                nursery.start_soon(sample_rss, done)
            try:
                if name == "idle":
                    await trio.sleep(3)
                else:
                    port = rg_port if name == "lpmosd" else nginx_port
                    elapsed = await download_wave(port, downloads, size)
            finally:
                stop.set()
                done.set()
        phases[name] += stats.latencies.get("heartbeat", [])
        return elapsed

    await phase("idle")
    for _ in range(rounds):
        for variant in ("lpmosd", "nginx"):
            pids = [rg_pid] if variant == "lpmosd" else [nginx.pid, *worker_pids(nginx.pid)]
            cpu0 = sum(cpu_seconds(p) for p in pids)
            elapsed = await phase(variant)
            mbps[variant].append(total_mb / elapsed)
            cpu[variant].append(sum(cpu_seconds(p) for p in pids) - cpu0)
    best = {k: max(v) for k, v in mbps.items()}
    return {
        "mb_per_s": mbps,
        "ratio": best["lpmosd"] / best["nginx"],
        "cpu_seconds": cpu,
        "cpu_seconds_per_gb": {k: sum(v) / (len(v) * total_mb / 1000) for k, v in cpu.items()},
        "regional_rss_mib": {
            "before": rss_before,
            "min_while_serving": min(rss_samples, default=0.0),
            "max_while_serving": max(rss_samples, default=0.0),
        },
        "heartbeat_p99_ms": {k: p99_ms(v) for k, v in phases.items()},
        "heartbeat_count": {k: len(v) for k, v in phases.items()},
        "heartbeat_errors": len(stats.errors),
    }


def _print(r: dict[str, Any]) -> None:
    rows = [
        [
            name,
            " / ".join(f"{x:.0f}" for x in r["mb_per_s"][name]),
            f"{max(r['mb_per_s'][name]):.0f}",
            f"{r['cpu_seconds_per_gb'][name]:.2f}",
            f"{r['heartbeat_p99_ms'][name]:.1f}",
        ]
        for name in ("lpmosd", "nginx")
    ]
    print(
        markdown_table(
            ["server", "MB/s per round", "best MB/s", "server CPU s per GB", "heartbeat p99 ms"],
            rows,
        )
    )
    rss = r["regional_rss_mib"]
    print(
        f"ratio lpmosd/nginx (best rounds): {r['ratio']:.2f}x; regional RSS {rss['before']:.0f} "
        f"MiB before, {rss['min_while_serving']:.0f}-{rss['max_while_serving']:.0f} MiB while "
        f"serving; heartbeat p99 idle {r['heartbeat_p99_ms']['idle']:.1f} ms "
        f"({r['heartbeat_errors']} heartbeat errors)"
    )


def _plot(png: Any, r: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = ["lpmosd", "nginx"]
    axes[0].bar(names, [max(r["mb_per_s"][n]) for n in names], color=["tab:blue", "tab:grey"])
    axes[0].set_ylabel("aggregate MB/s (best round)")
    axes[0].set_title(f"{r['downloads']} x {r['size_mib']} MiB downloads: ratio {r['ratio']:.2f}x")
    phases = ["idle", "lpmosd", "nginx"]
    axes[1].bar(phases, [r["heartbeat_p99_ms"][p] for p in phases], color="tab:orange")
    axes[1].set_ylabel("agent heartbeat p99 (ms)")
    axes[1].set_title("agent API while images stream (x: what is serving)")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lpmosd bench boot-files``."""
    p = sub.add_parser(NAME, help="parallel image downloads from the regional vs nginx")
    add_common_args(p)
    p.add_argument("--downloads", type=int, default=32, help="parallel downloads (default 32)")
    p.add_argument("--size-mb", type=int, help="image size in MiB (default 250; quick 16)")
    p.add_argument("--agents", type=int, default=8, help="heartbeating agents (default 8)")
    p.set_defaults(
        bench=lambda o, a: run(o, downloads=a.downloads, size_mb=a.size_mb, agents=a.agents)
    )
