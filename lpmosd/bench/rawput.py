"""The raw etcd ceiling: how many puts per second etcd takes from 64 concurrent writers.

Two clients are measured and the faster one is the ceiling: grpcio's C core (``grpc.aio``,
in a child process of its own, hand-encoded ``PutRequest``s; grpcio is a dev dependency)
and lpmosd's own client. Run as a module, it is the grpcio child::

    python -m lpmosd.bench.rawput --endpoint 127.0.0.1:2379 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import trio

from lpmosd.bench.common import latency_summary
from lpmosd.etcd import EtcdClient

#: Value size of the raw puts: a task document in the middle of an install.
VALUE_SIZE = 3072
CONCURRENCY = 64


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_put(key: bytes, value: bytes) -> bytes:
    """A serialized etcd ``PutRequest`` (fields 1: key, 2: value)."""
    return b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value


async def _grpc_main(endpoint: str, seconds: float, concurrency: int, size: int) -> dict[str, Any]:
    import grpc  # type: ignore[import-untyped,unused-ignore]

    value = b"x" * size
    lat: list[float] = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        put = channel.unary_unary(
            "/etcdserverpb.KV/Put",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        await put(encode_put(b"/bench-raw/warmup", value))
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await put(encode_put(f"/bench-raw/g{w}/{i % 64}".encode(), value))
                lat.append(time.perf_counter() - t0)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "client": "grpcio",
        "puts": len(lat),
        "wall_s": wall,
        "rate": len(lat) / wall,
        **latency_summary(lat),
    }


async def grpcio_ceiling(
    endpoint: str, seconds: float, *, concurrency: int = CONCURRENCY, size: int = VALUE_SIZE
) -> dict[str, Any] | None:
    """Run the grpcio client in a child process; None when grpcio is not installed."""
    parts = urlsplit(endpoint)
    target = f"{parts.hostname}:{parts.port}"
    cmd = [
        sys.executable,
        "-m",
        "lpmosd.bench.rawput",
        "--endpoint",
        target,
        "--seconds",
        str(seconds),
        "--concurrency",
        str(concurrency),
        "--size",
        str(size),
    ]
    proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        print(f"(grpcio ceiling unavailable: {err[0]})", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


async def lpmosd_ceiling(
    client: EtcdClient, seconds: float, *, concurrency: int = CONCURRENCY, size: int = VALUE_SIZE
) -> dict[str, Any]:
    """64 concurrent put loops through lpmosd's client, in this process."""
    value = b"x" * size
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await client.put(f"/bench-raw/l{w}/{i % 64}", value)
            lat.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    wall = time.perf_counter() - t0
    return {
        "client": "lpmosd",
        "puts": len(lat),
        "wall_s": wall,
        "rate": len(lat) / wall,
        **latency_summary(lat),
    }


async def ceiling(client: EtcdClient, endpoint: str, seconds: float) -> dict[str, Any]:
    """Both clients, one after the other; the ceiling is the faster one's rate."""
    runs = [await lpmosd_ceiling(client, seconds)]
    g = await grpcio_ceiling(endpoint, seconds)
    if g is not None:
        runs.append(g)
    await client.delete("/bench-raw/", prefix=True)
    best = max(runs, key=lambda r: float(r["rate"]))
    return {"rate": best["rate"], "client": best["client"], "runs": runs}


def main(argv: list[str] | None = None) -> None:
    """The grpcio child: print one JSON object with the rate."""
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--size", type=int, default=VALUE_SIZE)
    a = p.parse_args(argv)
    result = asyncio.run(_grpc_main(a.endpoint, a.seconds, a.concurrency, a.size))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
