"""Loopback ports for servers that tests start as separate processes (they cannot be handed a socket).

A port is picked, checked free, then bound by another process a moment
later. Picked from the kernel's ephemeral range (what binding port 0
returns), it can be taken in that moment by any outgoing connection on the
machine, which gets its local port from the same range: a CI run failed so,
a node's gateway refusing to start on a port an HTTP client had just been
given. So ports come from below that range, at random, each handed out once
per test process, and are checked free for TCP and UDP.
"""

from __future__ import annotations

import random
import socket

_FLOOR = 10_000  # below: well-known and registered services more often listen
_handed: set[int] = set()


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    lo, hi = _ephemeral()
    ranges = [r for r in (range(_FLOOR, lo), range(hi + 1, 65536)) if len(r) > 1000]
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.choice(rng.choice(ranges)) if ranges else rng.randrange(1024, 65536)
        if port not in _handed and _free(port):
            _handed.add(port)
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range after 1,000 tries")
