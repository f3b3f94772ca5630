#!/usr/bin/env python3
"""lpmosd's etcd client against the grpcio-based ``etcd3`` package, on one etcd, in one run.

Not a test: a program. ::

    python tests/bench/bench_client.py [--quick] [--endpoints URL] [--rounds N]

It starts a private etcd (``EtcdProcess``) unless ``--endpoints`` is given, then runs the two
clients in turn, A B A B ..., each round in a fresh child process (so CPU time is the
client's own and nothing warms the other), and measures:

* sequential put latency, p50 / p99 (one caller, one put at a time);
* puts/s with 64 concurrent callers (Trio tasks for lpmosd; threads for etcd3, which is
  synchronous), on one client and so one HTTP/2 connection each;
* client CPU per put (process CPU time / puts) in both of those phases;
* CAS throughput: 16 writers incrementing one key with read → compare-and-swap on
  mod_revision (``atomic_update`` for lpmosd; the same loop, re-reading through the failed
  Txn with the same jittered backoff, written with etcd3's transaction API).

It prints a table with the median of the rounds and the ratio lpmosd / etcd3, and writes
every figure to ``bench-results/client.json``.

``etcd3`` (0.12, last released 2020) is installed only in a bench environment, e.g.::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install -e . etcd3
    /tmp/benchvenv/bin/python tests/bench/bench_client.py

or keep lpmosd's venv for lpmosd and point ``--etcd3-python`` at an interpreter that has
etcd3. Its generated ``*_pb2`` modules predate protobuf 4 and fail to import with a current
protobuf; rather than pinning ``protobuf<4`` (whose pure-Python codec would make etcd3 look
slow), the worker rebuilds those modules from the descriptors they embed, so etcd3 runs on
the current protobuf's C (upb) codec.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench-results" / "client.json"

VALUE = b"v" * 128
CONCURRENCY = 64
CAS_WRITERS = 16

SIZES = {
    # name: (sequential puts, concurrent puts, CAS increments per writer, rounds)
    "quick": (300, 3000, 10, 2),
    "full": (2000, 20000, 40, 4),
}

METRICS: list[tuple[str, str, bool]] = [
    # key, label, higher is better
    ("seq_p50_ms", "sequential put p50 (ms)", False),
    ("seq_p99_ms", "sequential put p99 (ms)", False),
    ("seq_cpu_ms_per_put", "client CPU per put, sequential (ms)", False),
    ("conc_puts_per_s", f"puts/s, {CONCURRENCY} concurrent", True),
    ("conc_cpu_ms_per_put", f"client CPU per put, {CONCURRENCY} concurrent (ms)", False),
    ("cas_commits_per_s", f"CAS commits/s, {CAS_WRITERS} writers on one key", True),
    ("cas_attempts_per_commit", "CAS attempts per commit", False),
]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _cpu() -> float:
    return time.process_time()


# --- the lpmosd worker -------------------------------------------------------------------


def run_lpmosd(endpoint: str, n_seq: int, n_conc: int, n_cas: int) -> dict[str, Any]:
    import trio

    from lpmosd.etcd import KeyValue, open_client

    out: dict[str, Any] = {}

    async def main() -> None:
        async with open_client([endpoint]) as c:
            for i in range(200):  # warm-up
                await c.put(f"bench/warm/{i % 10}", VALUE)

            lat: list[float] = []
            cpu0 = _cpu()
            for i in range(n_seq):
                t0 = time.perf_counter()
                await c.put(f"bench/seq/{i % 100}", VALUE)
                lat.append(time.perf_counter() - t0)
            out["seq_cpu_ms_per_put"] = (_cpu() - cpu0) / n_seq * 1e3
            out["seq_p50_ms"] = _pct(lat, 0.50) * 1e3
            out["seq_p99_ms"] = _pct(lat, 0.99) * 1e3

            left = n_conc

            async def putter(w: int) -> None:
                nonlocal left
                i = 0
                while left > 0:
                    left -= 1
                    i += 1
                    await c.put(f"bench/conc/{w}/{i % 20}", VALUE)

            cpu0, t0 = _cpu(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for w in range(CONCURRENCY):
                    nursery.start_soon(putter, w)
            wall = time.perf_counter() - t0
            out["conc_puts_per_s"] = n_conc / wall
            out["conc_cpu_ms_per_put"] = (_cpu() - cpu0) / n_conc * 1e3

            await c.put("bench/cas", b"0")
            attempts = 0

            def incr(kv: KeyValue | None) -> bytes:
                return b"%d" % (int(kv.value) + 1 if kv else 1)

            async def writer() -> None:
                nonlocal attempts
                for _ in range(n_cas):
                    r = await c.atomic_update("bench/cas", incr, max_attempts=10_000)
                    attempts += r.attempts

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(CAS_WRITERS):
                    nursery.start_soon(writer)
            wall = time.perf_counter() - t0
            kv = await c.get("bench/cas")
            commits = CAS_WRITERS * n_cas
            assert kv is not None and int(kv.value) == commits, "lost update"
            out["cas_commits_per_s"] = commits / wall
            out["cas_attempts_per_commit"] = attempts / commits

    trio.run(main)
    return out


# --- the etcd3 worker --------------------------------------------------------------------


def import_etcd3() -> Any:
    """Import etcd3; on a protobuf ≥ 4, rebuild its stale generated modules first."""
    try:
        import etcd3

        return etcd3
    except TypeError:
        pass  # "Descriptors cannot be created directly": pb2 code older than protobuf 4
    import ast
    import importlib.util
    import types

    from google.protobuf import descriptor_pool  # type: ignore[import-untyped,unused-ignore]
    from google.protobuf.internal import builder  # type: ignore[import-untyped,unused-ignore]

    for name in [m for m in sys.modules if m == "etcd3" or m.startswith("etcd3.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("etcd3")
    assert spec is not None and spec.submodule_search_locations
    rpc_dir = Path(next(iter(spec.submodule_search_locations))) / "etcdrpc"
    pool = descriptor_pool.Default()
    for name in ("kv", "auth", "rpc"):  # dependencies first
        tree = ast.parse((rpc_dir / f"{name}_pb2.py").read_text())
        blob: bytes | None = None
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
                value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
                raw = ast.literal_eval(value)
                blob = raw.encode("latin1") if isinstance(raw, str) else raw
                break
        assert blob is not None, f"no serialized descriptor in etcd3's {name}_pb2.py"
        modname = f"etcd3.etcdrpc.{name}_pb2"
        module = types.ModuleType(modname)
        try:
            desc = pool.AddSerializedFile(blob)
        except TypeError:
            desc = pool.FindFileByName(f"{name}.proto")
        builder.BuildMessageAndEnumDescriptors(desc, module.__dict__)
        builder.BuildTopDescriptorsAndMessages(desc, modname, module.__dict__)
        sys.modules[modname] = module
    import etcd3

    return etcd3


def run_etcd3(endpoint: str, n_seq: int, n_conc: int, n_cas: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    etcd3 = import_etcd3()
    parts = urlsplit(endpoint)
    c = etcd3.client(host=parts.hostname, port=parts.port)
    out: dict[str, Any] = {}
    for i in range(200):
        c.put(f"bench/warm/{i % 10}", VALUE)

    lat: list[float] = []
    cpu0 = _cpu()
    for i in range(n_seq):
        t0 = time.perf_counter()
        c.put(f"bench/seq/{i % 100}", VALUE)
        lat.append(time.perf_counter() - t0)
    out["seq_cpu_ms_per_put"] = (_cpu() - cpu0) / n_seq * 1e3
    out["seq_p50_ms"] = _pct(lat, 0.50) * 1e3
    out["seq_p99_ms"] = _pct(lat, 0.99) * 1e3

    lock = threading.Lock()
    left = [n_conc]

    def putter(w: int) -> None:
        i = 0
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            i += 1
            c.put(f"bench/conc/{w}/{i % 20}", VALUE)

    pool = ThreadPoolExecutor(max(CONCURRENCY, CAS_WRITERS))
    list(pool.map(lambda _: None, range(CONCURRENCY)))  # start the threads beforehand
    cpu0, t0 = _cpu(), time.perf_counter()
    list(pool.map(putter, range(CONCURRENCY)))
    wall = time.perf_counter() - t0
    out["conc_puts_per_s"] = n_conc / wall
    out["conc_cpu_ms_per_put"] = (_cpu() - cpu0) / n_conc * 1e3

    key = "bench/cas"
    c.put(key, b"0")
    attempts = [0]

    def writer(_: int) -> None:
        tx = c.transactions
        for _ in range(n_cas):
            value, meta = c.get(key)
            attempt = 0
            while True:  # the same loop as atomic_update: CAS, re-read via the failed Txn
                attempt += 1
                new = b"%d" % (int(value) + 1)
                ok, responses = c.transaction(
                    compare=[tx.mod(key) == meta.mod_revision],
                    success=[tx.put(key, new)],
                    failure=[tx.get(key)],
                )
                if ok:
                    break
                value, meta = responses[0][0]
                if attempt > 1:
                    time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
            with lock:
                attempts[0] += attempt

    t0 = time.perf_counter()
    list(pool.map(writer, range(CAS_WRITERS)))
    wall = time.perf_counter() - t0
    commits = CAS_WRITERS * n_cas
    value, _ = c.get(key)
    assert int(value) == commits, "lost update"
    out["cas_commits_per_s"] = commits / wall
    out["cas_attempts_per_commit"] = attempts[0] / commits
    pool.shutdown()
    c.close()
    return out


WORKERS: dict[str, Callable[[str, int, int, int], dict[str, Any]]] = {
    "lpmosd": run_lpmosd,
    "etcd3": run_etcd3,
}


# --- the driver --------------------------------------------------------------------------


def _versions(python: str, client: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "names = {'lpmosd': ['betterproto2', 'grpclib', 'h2', 'trio', 'trio-asyncio'],"
        " 'etcd3': ['etcd3', 'grpcio', 'protobuf']}[sys.argv[1]]\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: out[n] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([python, "-c", code, client], capture_output=True, text=True)
    try:
        return dict(json.loads(res.stdout))
    except ValueError:
        return {}


def run_worker(
    python: str, client: str, endpoint: str, size: tuple[int, int, int]
) -> dict[str, Any]:
    cmd = [python, __file__, "--worker", client, "--endpoints", endpoint]
    cmd += ["--sizes", ",".join(map(str, size))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{client} worker failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def etcd3_available(python: str) -> bool:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import bench_client as b; b.import_etcd3()"
    res = subprocess.run(
        [python, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True
    )
    return res.returncode == 0


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    return {
        client: {k: statistics.median(r[k] for r in rs) for k, _, _ in METRICS}
        for client, rs in rounds.items()
        if rs
    }


def print_table(summary: dict[str, dict[str, float]]) -> None:
    a, b = summary.get("lpmosd", {}), summary.get("etcd3", {})
    print(f"\n{'metric':<46} {'lpmosd':>10} {'etcd3':>10} {'lpmosd/etcd3':>13}")
    print("-" * 82)
    for key, label, higher in METRICS:
        va, vb = a.get(key), b.get(key)
        ratio = f"{va / vb:13.2f}" if va is not None and vb else f"{'-':>13}"
        fa = f"{va:10.3f}" if va is not None else f"{'-':>10}"
        fb = f"{vb:10.3f}" if vb is not None else f"{'-':>10}"
        print(f"{label:<46} {fa} {fb} {ratio}  ({'higher' if higher else 'lower'} is better)")
    if a and b:
        print(
            f"\nputs/s ratio lpmosd/etcd3: {a['conc_puts_per_s'] / b['conc_puts_per_s']:.2f}"
            " (target >= 0.8)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (~1 min)")
    ap.add_argument("--endpoints", help="use this etcd (URL) instead of starting one")
    ap.add_argument("--rounds", type=int, help="rounds of A B (default: 2 quick, 4 full)")
    ap.add_argument(
        "--etcd3-python", default=sys.executable, help="interpreter with etcd3 installed"
    )
    ap.add_argument("--only", choices=sorted(WORKERS), help="measure one client only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        n_seq, n_conc, n_cas = map(int, args.sizes.split(","))
        result = WORKERS[args.worker](args.endpoints, n_seq, n_conc, n_cas)
        print(json.dumps(result))
        return 0

    *size, default_rounds = SIZES["quick" if args.quick else "full"]
    n_rounds = args.rounds or default_rounds
    pythons = {"lpmosd": sys.executable, "etcd3": args.etcd3_python}
    clients = [args.only] if args.only else ["lpmosd", "etcd3"]
    if "etcd3" in clients and not etcd3_available(args.etcd3_python):
        print(
            f"etcd3 is not importable by {args.etcd3_python}; measuring lpmosd only.\n"
            "Install it in a bench environment, e.g.:\n"
            "  python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install -e . etcd3\n"
            "  /tmp/benchvenv/bin/python tests/bench/bench_client.py\n"
            "(or --etcd3-python /tmp/benchvenv/bin/python)",
            file=sys.stderr,
        )
        clients = ["lpmosd"]

    server = None
    if args.endpoints:
        endpoint = args.endpoints.split(",")[0]
    else:
        sys.path.insert(0, str(ROOT))
        from lpmosd.etcd_process import EtcdProcess

        server = EtcdProcess(name="lpmosd-bench-client")
        server.start()
        endpoint = server.endpoint
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
    try:
        for r in range(n_rounds):
            order = clients if r % 2 == 0 else list(reversed(clients))
            for client in order:
                res = run_worker(pythons[client], client, endpoint, tuple(size))  # type: ignore[arg-type]
                rounds[client].append(res)
                print(
                    f"round {r + 1}/{n_rounds} {client:>6}: "
                    + ", ".join(f"{k}={v:.3f}" for k, v in res.items()),
                    flush=True,
                )
    finally:
        if server is not None:
            server.close()

    summary = summarize(rounds)
    print_table(summary)
    ratios = {}
    if "lpmosd" in summary and "etcd3" in summary:
        ratios = {k: summary["lpmosd"][k] / summary["etcd3"][k] for k, _, _ in METRICS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size": "quick" if args.quick else "full",
        "sizes": {
            "sequential_puts": size[0],
            "concurrent_puts": size[1],
            "cas_per_writer": size[2],
        },
        "concurrency": CONCURRENCY,
        "cas_writers": CAS_WRITERS,
        "value_bytes": len(VALUE),
        "endpoint_given": bool(args.endpoints),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_after": os.getloadavg(),
        },
        "versions": {c: _versions(pythons[c], c) for c in clients},
        "rounds": rounds,
        "median": summary,
        "ratio_lpmosd_over_etcd3": ratios,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
