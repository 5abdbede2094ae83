"""Per-client token buckets: admin calls and worker registrations, keyed by the client's address.

Sans-IO (the clock is passed in). The table of clients is bounded: a flood
of distinct addresses evicts the buckets that are full again (clients that
have been quiet), then the least recently seen, so memory stays flat however
many addresses an attacker has.
"""

from __future__ import annotations

import math
from collections import OrderedDict

MAX_CLIENTS = 4096


class RateLimiter:
    """``rate`` calls per second per client, with bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float:
        """Spend one token; 0.0 if allowed, else the seconds until one is available (for Retry-After)."""
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        """Down to three quarters of the cap, so a flood of addresses costs O(1) per call, amortised."""
        for client in [c for c, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]:
            del self._buckets[client]
        keep = self.max_clients * 3 // 4
        while len(self._buckets) > keep:
            self._buckets.popitem(last=False)  # least recently seen first


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
