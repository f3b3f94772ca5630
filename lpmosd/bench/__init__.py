"""``lpmosd bench …``: benchmarks that prove or refute the v3 guide's performance claims.

Each sub-command starts its own etcd (or takes ``--endpoints``), runs its variants
interleaved over several rounds, prints a markdown table, writes
``bench-results/<name>.json`` and draws ``docs/bench/<name>.png``. ``--quick`` runs each in
well under two minutes. Benchmarks print figures; they assert no timings.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from lpmosd.bench.common import BenchOptions

BenchFn = Callable[["BenchOptions", argparse.Namespace], Awaitable[dict[str, Any]]]


def _run(args: argparse.Namespace) -> int:
    from lpmosd.bench.common import BenchOptions
    from lpmosd.etcd import ensure_loop

    opts = BenchOptions.from_args(args)
    fn: BenchFn = args.bench

    async def main() -> None:
        async with ensure_loop():
            await fn(opts, args)

    trio.run(main)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lpmosd bench`` and its sub-commands to the CLI."""
    from lpmosd.bench import (
        add_server,
        boot_files,
        etcd_growth,
        fleet,
        offline,
        progress,
        watch_traffic,
    )

    p = sub.add_parser("bench", help="benchmarks: the guide's claims and fleet scale")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for module in (add_server, progress, watch_traffic, fleet, offline, etcd_growth, boot_files):
        module.register(bsub)
    p.set_defaults(handler=_run)
