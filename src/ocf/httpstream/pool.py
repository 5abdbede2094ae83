"""Keep-alive TCP connections to local backends (the LLM server behind a worker).

Why not httpx here: its connection pool re-scans every connection and
waiting request on each request event, which costs O(connections) per event,
so its throughput falls as concurrent requests rise (capping the pool would
win it back but also cap concurrent LLM streams). This pool is a LIFO stack of idle
connections per ``(host, port)``: O(1) to take and give back, no cap on
concurrent requests, and it reuses the same :mod:`ocf.httpstream` bridge the
peer-to-peer hop uses, so both hops stream and fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator

import attrs
import trio

from ..directsocket import DirectSocketStream
from .bridge import ClientBridge

log = logging.getLogger("ocf.httpstream")


@attrs.define(eq=False)
class PooledConnection:
    key: tuple[str, int]
    stream: DirectSocketStream
    bridge: ClientBridge = attrs.field(factory=ClientBridge)
    idle_since: float = 0.0
    reused: bool = False  # came from the idle stack (may have been closed by the server meanwhile)


class ConnectionPool:
    """Idle keep-alive connections, per backend, closed after ``idle_timeout`` seconds.

    ``idle_timeout`` stays below the usual server keep-alive (5 s in
    uvicorn and Hypercorn) so we rarely pick a connection the server is
    closing; one that was closed anyway is detected before reuse (readable
    idle socket = EOF or junk) and dropped.
    """

    def __init__(self, *, idle_timeout: float = 4.0, max_idle_per_backend: int = 256, connect_timeout: float = 10.0) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_backend = max_idle_per_backend
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[PooledConnection]] = {}
        self._closed = False

    def _take_idle(self, key: tuple[str, int]) -> PooledConnection | None:
        stack = self._idle.get(key)
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            sock = conn.stream.socket
            if now - conn.idle_since > self.idle_timeout or sock.is_readable():
                _close_now(conn)
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self, host: str, port: int) -> PooledConnection:
        """An idle connection to ``host:port`` or a new one (raises OSError if refused/unreachable)."""
        key = (host, port)
        conn = self._take_idle(key)
        if conn is not None:
            return conn
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(6, 1, 1)  # TCP_NODELAY: small SSE events must not wait for Nagle
        return PooledConnection(key, DirectSocketStream(stream))

    def release(self, conn: PooledConnection) -> None:
        """Give ``conn`` back after an exchange; kept only if its exchange finished cleanly."""
        if self._closed or not conn.bridge.reusable:
            _close_now(conn)
            return
        conn.bridge.next_cycle()
        conn.idle_since = time.monotonic()
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= self.max_idle_per_backend:
            _close_now(stack.pop(0))
        stack.append(conn)

    def discard(self, conn: PooledConnection) -> None:
        _close_now(conn)

    @contextlib.asynccontextmanager
    async def connection(self, host: str, port: int) -> AsyncIterator[PooledConnection]:
        """A connection for one exchange: released if it ended cleanly, closed otherwise."""
        conn = await self.connect(host, port)
        try:
            yield conn
        except BaseException:
            self.discard(conn)
            raise
        self.release(conn)

    def close(self) -> None:
        self._closed = True
        for stack in self._idle.values():
            for conn in stack:
                _close_now(conn)
        self._idle.clear()


def _close_now(conn: PooledConnection) -> None:
    """Close without awaiting: a plain TCP socket needs no goodbye, and this runs in cleanup paths."""
    try:
        conn.stream.socket.close()
    except OSError:  # pragma: no cover - already gone
        pass
