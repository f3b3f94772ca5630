"""Two regionals for one IDC, two control planes: one leads, the other stands by.

Real ``lpmosd run`` processes on a real etcd. Faults happen at named points
(:mod:`lpmosd.hooks`): the active regional SIGSTOPs itself just before it sends a batch
of task writes, so the standby takes over while the paused one still believes it leads and
holds a write in hand; woken, that write must be refused by etcd (0 keys written).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import trio
from fault_table import record

from lpmosd import schema
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.hooks import ENV as FAULT_ENV

from .conftest import Cluster, Proc
from .test_processes import IDC, MAC, SN, approve, create_task, wait_task

TTL = 3


def is_stopped(proc: Proc) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc/<pid>/stat."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def readyz(proc: Proc) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=2) as http:
        r = await http.get(proc.url + "/readyz")
        body: dict[str, Any] = r.json()
        return r.status_code, body


async def wait_leadership(proc: Proc, leadership: str, *, timeout: float = 20) -> float:
    """Until the role's session runs with ``leadership``; returns the trio time."""
    with trio.move_on_after(timeout):
        while True:
            try:
                _, body = await readyz(proc)
                if body.get("session") == "running" and body.get("leadership") == leadership:
                    return trio.current_time()
            except httpx.TransportError:
                pass
            await trio.sleep(0.02)
    raise AssertionError(f"{proc.name} not {leadership} after {timeout}s\n{proc.tail()}")


async def metric(proc: Proc, name: str) -> str:
    async with httpx.AsyncClient(timeout=2) as http:
        text = (await http.get(proc.url + "/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith(name)]
    assert lines, f"no {name} in {proc.name}'s metrics"
    return lines[0]


async def writes_since(client: EtcdClient, revision: int, *, ignore: str) -> list[str]:
    """Keys under /os/ modified after ``revision``, except under ``ignore``."""
    listing = await client.get_prefix(schema.ROOT)
    return [
        kv.key.decode()
        for kv in listing.kvs
        if kv.mod_revision > revision and not kv.key.decode().startswith(ignore)
    ]


async def test_standby_regional_takes_over_and_the_paused_one_writes_nothing(
    cluster: Cluster,
) -> None:
    cp = await cluster.start_control_plane()
    # The active regional stops itself when it is about to write the first progress batch.
    first = await cluster.start_regional(
        "regional-a", env={FAULT_ENV: "writer.before-txn:stop"}, session_ttl=TTL
    )
    await cp.wait_ready()
    await first.wait_ready()
    second = await cluster.start_regional("regional-b", session_ttl=TTL)
    await wait_leadership(second, "standby")
    status, body = await readyz(second)
    assert status == 503 and body["leadership"] == "standby", "a standby must not take traffic"
    assert (await readyz(first))[1]["leadership"] == "active"
    assert (await metric(second, "lpmosd_role_active")).endswith(" 0.0")
    assert (await metric(first, "lpmosd_role_active")).endswith(" 1.0")
    async with httpx.AsyncClient(base_url=second.url) as http:
        r = await http.get(f"/api/v1/agent/{SN}/task")
        assert r.status_code == 503 and "standby" in r.json()["error"]
        page = (await http.get("/")).text
        assert 'id="leadership">standby' in page

    election = schema.regional_election_prefix(IDC)
    async with open_client(cluster.endpoints) as client:
        await create_task(cp)
        # The agent knows both PXE hosts; it moves on when one does not answer.
        agent = cluster.agent(f"{first.url},{second.url}", SN, MAC, "--request-timeout=2")
        agent.start()
        await wait_task(
            client,
            lambda d: any(p["step"] == "hardware_collect" for p in d["progress"]),
            timeout=20,
            what="hardware report",
            cluster=cluster,
        )
        await approve(cp)
        with trio.fail_after(20):
            while not is_stopped(first):  # noqa: ASYNC110 - polling a child process
                await trio.sleep(0.01)
        stopped_at = trio.current_time()

        became_active = await wait_leadership(second, "active")
        takeover = became_active - stopped_at
        print(f"\nstandby regional took over {takeover:.2f}s after the active one stopped")
        assert takeover <= TTL + 2, f"takeover took {takeover:.2f}s (session TTL {TTL}s)"

        # The agent carries on with the new active regional, to the end.
        assert await agent.wait(60) == 0, cluster.tails()
        doc = await wait_task(
            client, lambda d: d["status"] == "completed", timeout=10, what="done", cluster=cluster
        )
        steps = [p["step"] for p in doc["progress"]]
        assert len(steps) == len(set(steps)), steps

        # Everything is quiet. Wake the old leader: it sends the write it held.
        before = (await client.get_prefix(schema.ROOT)).revision
        first.send_signal(signal.SIGCONT)
        await wait_leadership(first, "standby")
        assert await writes_since(client, before, ignore=election) == [], first.tail()
        assert "lost the leadership" in first.log.read_text(), first.tail()
        assert (await metric(first, "lpmosd_role_active")).endswith(" 0.0")
        record(
            "active regional SIGSTOPped before a write (processes, 1 etcd)",
            f"standby active after {takeover:.1f} s (session TTL {TTL} s); the agent finished "
            "through its second URL; woken, the old one's Txn was refused: 0 keys written",
        )
        leaders = (await client.get_prefix(election)).kvs
        assert (
            len(leaders) == 2
            and json.loads(min(leaders, key=lambda kv: kv.create_revision).value)["url"]
            == second.url
        )
