"""Installs in flight for the fault tests: simulated agents on the real regional's API.

Each :class:`Agent` reports numbered log lines (and progress every few lines) through the
regional's HTTP API as fast as it is answered, retrying a line until it is acknowledged,
like the real agent. Every acknowledgement is recorded, so after a fault the test can say
how many acknowledged steps were lost or stored twice, and how long writes stopped.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass, field

import httpx
import trio
from provisioning_kit import GUIDE_TASK, register_agent

from lpmosd.api_requests import CreateTaskRequest
from lpmosd.etcd import EtcdClient
from lpmosd.store import Store

IDC = "dc1"
#: Under the task's log cap (500 lines): an agent stops reporting after this many.
MAX_LINES = 400


@dataclass(eq=False)
class Agent:
    """One machine's agent: its token and what the regional acknowledged."""

    sn: str
    mac: str
    headers: dict[str, str] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    failures: int = 0
    percent: int = 0

    def line(self) -> str:
        return f"{self.sn} step {len(self.acked)}"


@dataclass
class Verdict:
    """What etcd holds compared with what the agents were told."""

    acked: int
    lost: int
    duplicated: int


@dataclass(eq=False)
class Fleet:
    """``n`` agents installing through the regional at ``url``."""

    url: str
    store: Store
    n: int = 6
    #: Pause between an agent's acknowledged writes (long faults: slower, under the cap).
    interval: float = 0.02
    agents: list[Agent] = field(default_factory=list)
    #: trio times of every acknowledged write, in order.
    acks: list[float] = field(default_factory=list)

    async def enrol(self) -> None:
        """Create, register and approve every machine's task."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            for i in range(self.n):
                sn, mac = f"sn-{i:03d}", f"00:1a:2b:3c:4d:{i:02x}"
                req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn, "mac": mac})
                _, secret = await self.store.create_enrolled_task(req, actor="test")
                r, headers = await register_agent(http, sn=sn, mac=mac, secret=secret)
                assert r.status_code == 200, r.text
                await self.store.approve(IDC, sn, approved_by="test")
                self.agents.append(Agent(sn, mac, headers))

    async def run(self, stop: trio.Event) -> None:
        """Report until ``stop`` is set (or every agent reached :data:`MAX_LINES`)."""
        async with trio.open_nursery() as nursery:
            for agent in self.agents:
                nursery.start_soon(self._report, agent, stop)
                nursery.start_soon(self._heartbeat, agent, stop)

    async def _heartbeat(self, agent: Agent, stop: trio.Event) -> None:
        """Keep the agent's lease alive, as the real agent does (every 2 s)."""
        async with httpx.AsyncClient(base_url=self.url, headers=agent.headers, timeout=5) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.TransportError):
                    await http.post(f"/api/v1/agent/{agent.sn}/heartbeat")
                with trio.move_on_after(2):
                    await stop.wait()

    async def _report(self, agent: Agent, stop: trio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=agent.headers, timeout=5) as http:
            while not stop.is_set() and len(agent.acked) < MAX_LINES:
                line = agent.line()
                # Like the real agent: one Idempotency-Key per report, the same on every
                # resend. A report answered 202 (journaled: etcd did not take it) and sent
                # again is then applied once, not once by the journal and once by the resend.
                key = {"Idempotency-Key": f"log-{len(agent.acked)}"}
                try:
                    r = await http.post(
                        f"/api/v1/agent/{agent.sn}/logs", json={"lines": [line]}, headers=key
                    )
                    ok = r.status_code == 200
                    if ok and len(agent.acked) % 10 == 0:
                        percent = min(99, 1 + len(agent.acked) // 4)
                        body = {"step": "install", "percent": percent, "message": line}
                        p = await http.post(f"/api/v1/agent/{agent.sn}/progress", json=body)
                        if p.status_code == 200:
                            agent.percent = percent
                except httpx.TransportError:
                    ok = False
                if ok:
                    agent.acked.append(line)
                    self.acks.append(trio.current_time())
                    await trio.sleep(self.interval)
                else:
                    agent.failures += 1
                    await trio.sleep(0.05)

    def resumed_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first acknowledged write after it (None: none yet)."""
        later = [a for a in self.acks if a > t]
        return later[0] - t if later else None

    def longest_gap(self, since: float) -> float:
        """The longest time without any acknowledged write, from ``since`` on."""
        times = [since, *(a for a in self.acks if a > since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def verify(self, client: EtcdClient) -> Verdict:
        """Compare etcd's task documents with the acknowledgements."""
        acked = lost = duplicated = 0
        for agent in self.agents:
            task = (await Store(client).get_task(IDC, agent.sn)).task  # lines assembled
            assert task.logs_dropped == 0, "the test must stay under the log cap"
            texts = Counter(line.split("] ", 1)[1] for line in task.logs if "] " in line)
            acked += len(agent.acked)
            lost += sum(1 for line in agent.acked if texts[line] == 0)
            duplicated += sum(
                c - 1 for text, c in texts.items() if text.startswith(agent.sn) and c > 1
            )
            install = [p for p in task.progress if p.step == "install"]
            if agent.percent:
                assert install and install[0].percent >= agent.percent, "acknowledged progress lost"
        return Verdict(acked, lost, duplicated)
