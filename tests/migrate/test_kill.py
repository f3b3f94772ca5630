"""``lpmosd migrate apply`` as a real process, SIGKILLed at different moments and re-run.

Each run stops itself at a named point of the migration loop (``LPMOSD_FAULT_AT``, see
:mod:`lpmosd.hooks`: the n-th ``migrate.scanned``, ``migrate.before-txn`` or
``migrate.after-txn``, SIGSTOP) and the test SIGKILLs it there: never "after a while",
which a fast machine outruns. Txns of other workers in flight at that moment may land or
not. After each kill every server must be wholly v2 or wholly v3; the final run finishes
the job; verify passes and the key counts are exact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from lpmosd import hooks
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess

from .helpers import FLEET, assert_all_or_nothing, assert_content, counts, load_fleet, migrated

T = TypeVar("T")


def with_client(etcd: EtcdProcess, fn: Callable[[EtcdClient], Awaitable[T]]) -> T:
    """Run ``fn(client)`` in a fresh trio loop (these tests are synchronous)."""

    async def main() -> T:
        async with open_client(etcd.endpoints) as client:
            return await fn(client)

    return trio.run(main)


def lpmosd(etcd: EtcdProcess, *args: str, stop_at: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if stop_at is not None:
        env[hooks.ENV] = f"migrate.{stop_at}:stop"
    return subprocess.Popen(
        [sys.executable, "-m", "lpmosd", *args, "--etcd-endpoints", etcd.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def kill_at(etcd: EtcdProcess, point: str) -> None:
    """Run apply until it stops itself at ``point`` (``after-txn#50``), then SIGKILL it."""
    proc = lpmosd(etcd, "migrate", "apply", "--all", stop_at=point)
    deadline = time.monotonic() + 60
    # Wait for the stop (T), not for a time: the point is where the run is, not when.
    while _state(proc.pid) != "T":
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"apply ended before {point}: {out[-2000:]} {err[-2000:]}")
        assert time.monotonic() < deadline, f"apply never reached {point}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def check_invariant(etcd: EtcdProcess, fleet: dict[str, list[str]]) -> int:
    async def check(client: EtcdClient) -> int:
        done = 0
        for idc, sns in fleet.items():
            _, in_v3 = await assert_all_or_nothing(client, idc, sns)
            done += in_v3
        return done

    return with_client(etcd, check)


def test_sigkill_at_five_points_then_rerun(etcd: EtcdProcess) -> None:
    servers = with_client(etcd, load_fleet)
    fleet = {idc: [s.sn for s in ss] for idc, ss in servers.items()}
    progress = [0]
    # Before the first Txn, after the 1st server, with a Txn about to go out among others
    # in flight, and after 50 and 120 more servers: each run resumes the previous one.
    for point in ("scanned#1", "after-txn#1", "before-txn#37", "after-txn#50", "after-txn#120"):
        kill_at(etcd, point)
        progress.append(check_invariant(etcd, fleet))
    print(f"\nservers in v3 after each kill: {progress[1:]}")
    assert progress[1] == 0, "killed before its first Txn"
    assert progress[-1] < 500, "the kills interrupted the migration"
    assert progress == sorted(progress)  # nothing ever moved back
    assert len(set(progress[1:])) == 5, "every run migrated something before its kill"

    final = lpmosd(etcd, "migrate", "apply", "--all")
    out, err = final.communicate(timeout=60)
    assert final.returncode == 0, (out, err)
    verify = lpmosd(etcd, "migrate", "verify", "--all")
    out, err = verify.communicate(timeout=60)
    assert verify.returncode == 0, (out, err)
    assert out.count("PASSED") == 3

    async def exact(client: EtcdClient) -> None:
        for idc, n in FLEET.items():
            assert await counts(client, idc) == migrated(n)
            await assert_content(client, idc, servers[idc])

    with_client(etcd, exact)


@pytest.mark.slow
def test_sigkill_at_random_moments_soak(etcd: EtcdProcess) -> None:
    servers = with_client(etcd, load_fleet)
    fleet = {idc: [s.sn for s in ss] for idc, ss in servers.items()}
    rng = random.Random(99)
    for _ in range(25):
        kind = rng.choice(("scanned", "before-txn", "after-txn"))
        kill_at(etcd, f"{kind}#{1 if kind == 'scanned' else rng.randint(1, 40)}")
        check_invariant(etcd, fleet)
    final = lpmosd(etcd, "migrate", "apply", "--all")
    final.communicate(timeout=60)
    assert final.returncode == 0
    verify = lpmosd(etcd, "migrate", "verify", "--all")
    out, _ = verify.communicate(timeout=60)
    assert verify.returncode == 0 and out.count("PASSED") == 3

    async def exact(client: EtcdClient) -> None:
        for idc, n in FLEET.items():
            assert await counts(client, idc) == migrated(n)

    with_client(etcd, exact)
