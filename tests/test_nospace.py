"""etcd's NOSPACE alarm: readyz says what to do, writes fail clearly, and lpmosd recovers by
itself once the operator has run ``lpmosd etcd compact``, ``defrag`` and ``disarm``."""

from __future__ import annotations

import sys

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    make_config,
    open_control_api,
    open_daemon,
    publish_os_types,
    wait_for,
)

from lpmosd.config import ROLE_CONTROL_PLANE
from lpmosd.errors import EtcdNoSpaceError
from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdCluster, EtcdProcess

QUOTA = 4 << 20


async def lpmosd_etcd(action: str, endpoint: str) -> str:
    """``lpmosd etcd ACTION`` as its own process, as an operator runs it."""
    argv = [sys.executable, "-m", "lpmosd", "etcd", action, f"--etcd-endpoints={endpoint}"]
    proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    return out


async def test_nospace_alarm_and_operator_recovery(etcd_factory) -> None:  # type: ignore[no-untyped-def]
    server: EtcdProcess = etcd_factory(extra_args=[f"--quota-backend-bytes={QUOTA}"])
    endpoint = server.endpoints[0]
    config = make_config(server.endpoints, roles=frozenset({ROLE_CONTROL_PLANE}))
    async with (
        open_client(server.endpoints) as client,
        open_daemon(config) as daemon,
        open_control_api(daemon) as api,
    ):
        # What the IDC's regional would publish (a control plane alone refuses unknown OS
        # types with a 400 before any write): the create below must reach etcd's refusal.
        await publish_os_types(daemon, GUIDE_TASK["idc"], (GUIDE_TASK["os_type"],))
        # History fills the database: one key rewritten until etcd refuses.
        with pytest.raises(EtcdNoSpaceError) as info:
            for _ in range(200):
                await client.put("/filler", b"x" * (256 << 10))
        assert "compact" in str(info.value) and "defrag" in str(info.value)

        async def readyz() -> httpx.Response:
            return await api.get("/readyz")

        async def not_ready() -> bool:
            return (await readyz()).status_code == 503

        await wait_for(not_ready, what="readyz 503")
        body = (await readyz()).json()
        assert "NOSPACE" in body["reason"] and "lpmosd etcd defrag" in body["reason"]
        r = await api.post("/api/v1/tasks", json=GUIDE_TASK)
        assert r.status_code == 503 and "NOSPACE" in r.json()["error"], r.text
        assert "alarm NOSPACE" in await lpmosd_etcd("status", endpoint)

        # The operator's recovery (README): compact, defragment, disarm.
        await lpmosd_etcd("compact", endpoint)
        assert "done:" in await lpmosd_etcd("defrag", endpoint)
        assert "disarmed NOSPACE" in await lpmosd_etcd("disarm", endpoint)

        async def ready() -> bool:
            return (await readyz()).status_code == 200

        await wait_for(ready, what="readyz 200 again")
        r = await api.post("/api/v1/tasks", json=GUIDE_TASK)
        assert r.status_code == 201, r.text
        metrics = (await api.get("/metrics")).text
        assert "lpmosd_etcd_db_bytes{" in metrics and "lpmosd_etcd_db_in_use_bytes{" in metrics


async def test_defrag_goes_through_every_member_one_at_a_time() -> None:
    """``lpmosd etcd defrag`` given one endpoint of a 3-member cluster finds the members
    (MemberList) and defragments each in turn: three before/after lines, in order."""
    with EtcdCluster(3) as cluster:
        async with open_client(cluster.endpoints) as client:
            for n in range(50):
                await client.put("/filler", b"x" * (64 << 10) + str(n).encode())
            await client.compact((await client.status()).revision)
        out = await lpmosd_etcd("defrag", cluster.endpoints[0])
    lines = out.splitlines()
    started = [line for line in lines if line.startswith("defragmenting ")]
    done = [line for line in lines if line.strip().startswith("done: ")]
    assert len(started) == 3 and len(done) == 3, out
    # One at a time: each member's "done" comes before the next one starts.
    order = [("start" if line.startswith("defragmenting") else "done") for line in lines]
    assert order == ["start", "done"] * 3, out
    endpoints = {line.split()[1].rstrip(":") for line in started}
    assert len(endpoints) == 3


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
