"""Idle keep-alive connections, kept per key for the next request.

Why not httpx here: its connection pool re-scans every connection and
waiting request on each request event, which costs O(connections) per event,
so its throughput falls as concurrent requests rise (capping the pool would
win it back but also cap concurrent LLM streams). :class:`IdlePool` is a LIFO
stack of idle connections per key: O(1) to take and give back, no cap on
concurrent requests. The gateway keeps two: TCP connections to local
backends keyed by ``(host, port)`` (:class:`ConnectionPool`), and
``/libp2p-http`` streams keyed by peer. Both carry the same
:mod:`ocf.httpstream` bridge, so both hops stream and fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Generic, TypeVar
from collections.abc import AsyncIterator, Callable, Hashable

import attrs
import trio

from ..directsocket import DirectSocketStream
from .bridge import ClientBridge

log = logging.getLogger("ocf.httpstream")

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")


class IdlePool(Generic[K, C]):
    """Idle connections per key, newest first, dropped after ``idle_timeout`` seconds or once unfit.

    ``fits`` says whether an idle connection may carry another request
    (checked when it is taken, because a peer may close it while it waits);
    ``drop`` closes one without awaiting, since it runs in cleanup paths.
    At most ``max_idle_per_key`` wait per key: the oldest goes first.
    """

    def __init__(
        self, *, idle_timeout: float, max_idle_per_key: int, fits: Callable[[C], bool], drop: Callable[[C], None]
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_key = max_idle_per_key
        self._fits = fits
        self._drop = drop
        self._idle: dict[K, list[tuple[C, float]]] = {}
        self._closed = False

    def take(self, key: K) -> C | None:
        """The newest idle connection for ``key`` still fit for use, or None."""
        stack = self._idle.get(key)
        if not stack:
            return None
        now = time.monotonic()
        while stack:
            conn, since = stack.pop()
            if now - since <= self.idle_timeout and self._fits(conn):
                return conn
            self._drop(conn)
        return None

    def put(self, key: K, conn: C) -> None:
        """Keep ``conn`` for the next request to ``key`` (dropped at once after :meth:`close`)."""
        if self._closed:
            self._drop(conn)
            return
        stack = self._idle.setdefault(key, [])
        if len(stack) >= self.max_idle_per_key:
            self._drop(stack.pop(0)[0])
        stack.append((conn, time.monotonic()))

    def idle(self, key: K) -> int:
        """How many connections wait for ``key``."""
        return len(self._idle.get(key, ()))

    def close(self) -> None:
        self._closed = True
        for stack in self._idle.values():
            for conn, _ in stack:
                self._drop(conn)
        self._idle.clear()


@attrs.define(eq=False)
class PooledConnection:
    key: tuple[str, int]
    stream: DirectSocketStream
    bridge: ClientBridge = attrs.field(factory=ClientBridge)
    reused: bool = False  # came from the idle stack (may have been closed by the server meanwhile)


class ConnectionPool:
    """Keep-alive TCP connections to local backends (the LLM server behind a worker).

    ``idle_timeout`` stays below the usual server keep-alive (5 s in
    uvicorn and Hypercorn) so we rarely pick a connection the server is
    closing; one that was closed anyway is detected before reuse (readable
    idle socket = EOF or junk) and dropped.
    """

    def __init__(
        self, *, idle_timeout: float = 4.0, max_idle_per_backend: int = 256, connect_timeout: float = 10.0
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle: IdlePool[tuple[str, int], PooledConnection] = IdlePool(
            idle_timeout=idle_timeout, max_idle_per_key=max_idle_per_backend, fits=_socket_quiet, drop=_close_now
        )

    async def connect(self, host: str, port: int) -> PooledConnection:
        """An idle connection to ``host:port`` or a new one (raises OSError if refused/unreachable)."""
        key = (host, port)
        conn = self.idle.take(key)
        if conn is not None:
            conn.reused = True
            return conn
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(6, 1, 1)  # TCP_NODELAY: small SSE events must not wait for Nagle
        return PooledConnection(key, DirectSocketStream(stream))

    def release(self, conn: PooledConnection) -> None:
        """Give ``conn`` back after an exchange; kept only if its exchange finished cleanly."""
        if not conn.bridge.reusable:
            _close_now(conn)
            return
        conn.bridge.next_cycle()
        self.idle.put(conn.key, conn)

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
        self.idle.close()


def _socket_quiet(conn: PooledConnection) -> bool:
    """An idle socket with something to read has EOF or junk waiting: not fit for a new request."""
    return not conn.stream.socket.is_readable()


def _close_now(conn: PooledConnection) -> None:
    """Close without awaiting: a plain TCP socket needs no goodbye, and this runs in cleanup paths."""
    with contextlib.suppress(OSError):  # already gone
        conn.stream.socket.close()
