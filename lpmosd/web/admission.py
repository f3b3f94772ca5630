"""Admission control for the agent API's writes, and the global overload answer.

At most ``max_active`` agent writes (everything but heartbeats) run at once; the others wait
their turn in arrival order. An overloaded regional then queues requests instead of
stretching every etcd call, its own session keepalives included, past their deadlines
(measured: 1,000 agents flat out made the session lease lapse, and with it every agent's
task). Heartbeats are exempt: they keep leases alive and are answered from memory.

Beyond ``max_waiting`` queued writes the regional is overloaded: a new write is answered
429 with ``Retry-After`` at once, before latency explodes (a queue that long already takes
about a second to drain), and nothing is written. Agents retry after it, with jitter
(:mod:`lpmosd.agent.client`); a refused report is retried, never dropped, so overload never
fails an install.
"""

from __future__ import annotations

from typing import Final

import trio
from prometheus_client import Counter

from lpmosd.metrics import REGISTRY

__all__ = ["OVERLOAD_MESSAGE", "Admission"]

OVERLOADED = Counter(
    "lpmosd_overload_refused_total",
    "Agent API writes refused with 429 because too many were already queued.",
    registry=REGISTRY,
)

OVERLOAD_MESSAGE: Final = "regional overloaded; retry after Retry-After seconds"


class Admission:
    """At most ``max_active`` writes at once; beyond ``max_waiting`` queued, refuse."""

    def __init__(self, max_active: int, max_waiting: int, retry_after: int = 1) -> None:
        self.limiter = trio.CapacityLimiter(max_active)
        self.max_waiting = max_waiting
        self.retry_after = retry_after

    def overloaded(self) -> bool:
        """Whether a new write must be refused now (counted)."""
        if self.limiter.statistics().tasks_waiting < self.max_waiting:
            return False
        OVERLOADED.inc()
        return True
