"""A token-bucket rate limit per client (the agent API keys it by client IP address)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_CLIENTS", "RateLimiter"]

#: Buckets kept; beyond this the least recently seen client is forgotten (it then starts
#: with a full bucket again, which is the worst an address-spraying client can gain).
MAX_CLIENTS: Final = 100_000


class RateLimiter:
    """``rate`` requests per second per client, bursts of up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, stamp

    def take(self, client: str) -> float:
        """Spend one token of ``client``'s bucket: 0.0 when allowed, else the seconds until
        the next token (for Retry-After)."""
        now = self.clock()
        tokens, stamp = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
