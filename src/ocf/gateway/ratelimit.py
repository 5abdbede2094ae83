"""Per-client token buckets: admin calls and worker registrations, keyed by the client's address.

Sans-IO (the clock is passed in). The table of clients is bounded: a flood
of distinct addresses evicts the buckets that are full again (clients that
have been quiet), and if none is, the oldest, so memory stays flat however
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
        full = [c for c, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for client in full[: max(1, len(self._buckets) - self.max_clients)]:
            del self._buckets[client]
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
