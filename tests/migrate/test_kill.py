"""``lpmosd migrate apply`` as a real process, SIGKILLed at different moments and re-run.

The process prints one line per migrated server (stdout is not a TTY), so the test kills it
after it has reported N servers (Txns in flight at that moment may land or not), or at a
random instant. After each kill every server must be wholly v2 or wholly v3; the final run
finishes the job; verify passes and the key counts are exact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio

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


def lpmosd(etcd: EtcdProcess, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lpmosd", *args, "--etcd-endpoints", etcd.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_after(etcd: EtcdProcess, lines: int | None, delay: float = 0.0) -> int:
    """Run apply and SIGKILL it after ``lines`` "migrated" lines (or ``delay`` seconds)."""
    proc = lpmosd(etcd, "migrate", "apply", "--all")
    assert proc.stdout is not None
    seen = 0
    if lines is None:
        time.sleep(delay)
    else:
        while seen < lines:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line.startswith("migrated")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return seen


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
    rng = random.Random(7)
    # Before the first Txn (the process is still starting), after the 1st server, at a
    # random instant, and after 50 and 120 more servers: each run resumes the previous.
    for lines, delay in (
        (None, 0.3),
        (1, 0.0),
        (None, rng.uniform(0.5, 0.9)),
        (50, 0.0),
        (120, 0.0),
    ):
        kill_after(etcd, lines, delay)
        progress.append(check_invariant(etcd, fleet))
    print(f"\nservers in v3 after each kill: {progress[1:]}")
    assert progress[-1] < 500, "the kills should interrupt the migration"
    assert progress == sorted(progress)  # nothing ever moved back

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
        if rng.random() < 0.5:
            kill_after(etcd, None, rng.uniform(0.2, 1.5))
        else:
            kill_after(etcd, rng.randint(0, 40), 0.0)
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
