"""Each ``lpmosd bench`` benchmark, run once in its smallest mode, so that none can rot.

These tests assert no timings (benchmarks print figures; the machine is shared and
noisy). They check that every benchmark runs to the end, writes its JSON and plot, and
that v3's correctness properties hold: no lost server, no lost update, no disagreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpmosd.bench import (
    add_server,
    boot_files,
    etcd_growth,
    fleet,
    offline,
    progress,
    watch_traffic,
)
from lpmosd.bench.common import BenchOptions


def _opts(tmp_path: Path) -> BenchOptions:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot = False
    else:
        plot = True
    return BenchOptions(
        endpoints=None,
        quick=True,
        rounds=1,
        results_dir=tmp_path / "results",
        plots_dir=tmp_path / "plots",
        plot=plot,
    )


def _written(opts: BenchOptions, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((opts.results_dir / f"{name}.json").read_text())
    assert data["benchmark"] == name
    if opts.plot:
        assert (opts.plots_dir / f"{name}.png").stat().st_size > 0
    return data


async def test_add_server(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await add_server.run(opts, ops=32, preload=10)
    _written(opts, add_server.NAME)
    rows = results["results"]
    assert {(r["variant"], r["writers"]) for r in rows} == {
        (v, w) for v in add_server.VARIANTS for w in add_server.WRITERS
    }
    for r in rows:
        assert r["added"] + r["errors"] == 32
        if r["variant"] != "v2":
            assert r["lost"] == 0 and r["missing_tasks"] == 0


async def test_progress_update(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await progress.run(opts, updates=4)
    _written(opts, progress.NAME)
    for r in results["results"]:
        if r["variant"] != "v2":
            assert r["lost"] == 0
            assert r["disagree"] == 0


async def test_watch_traffic(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await watch_traffic.run(opts, idcs=2, servers=4, steps=1)
    _written(opts, watch_traffic.NAME)
    by_name = {r["watcher"]: r for r in results["results"]}
    # Per server: v2 writes tasks + state + list, approve (tasks, state), 1 step, complete.
    assert by_name["v2 list key"]["events"]["median"] == 4
    assert by_name["v3 one server"]["events"]["median"] > 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_fleet(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await fleet.run(opts, sizes=[8], steps=3, heartbeat=1, ceiling_seconds=0.5)
    _written(opts, fleet.NAME)
    (r,) = results["results"]
    assert r["lost_updates"] == 0
    assert r["check"] == {"missing_tasks": 0, "not_completed": 0, "missing_steps": 0}
    assert r["progress_acked"] == 8 * 3
    assert r["raw_ceiling"]["rate"] > 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_offline_detection(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await offline.run(opts, agents=5, ttl=5, heartbeat=1)
    _written(opts, offline.NAME)
    assert results["total"] == 5
    assert results["never_failed"] == 0


async def test_etcd_growth(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await etcd_growth.run(
        opts, installs=12, machines=6, concurrency=3, interval=4, rate=1
    )
    _written(opts, etcd_growth.NAME)
    assert results["installs_per_compaction"] == 4
    assert len(results["samples"]) >= 2
    # Each install writes its task document many times over (what the benchmark measures).
    assert results["puts"] >= 12 * (etcd_growth.PROGRESS + etcd_growth.LOG_BATCHES)
    assert results["bytes_per_install"] > 0 and results["peak_db_in_use_bytes"] > 0


async def test_boot_files(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    results = await boot_files.run(opts, downloads=4, size_mb=8, agents=2)
    _written(opts, boot_files.NAME)
    # Every download completed in full (download_wave checks each size), for both servers.
    assert set(results["mb_per_s"]) == {"lpmosd", "nginx"}
    assert all(len(v) == 1 and v[0] > 0 for v in results["mb_per_s"].values())
    assert results["heartbeat_count"]["lpmosd"] > 0
    assert results["heartbeat_errors"] == 0
