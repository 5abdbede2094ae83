"""One HTTP exchange with the next hop: a local backend or another peer's gateway.

Both hops are the same exchange (:class:`Exchange`) over a different byte
stream: a keep-alive TCP connection from :class:`~ocf.httpstream.pool.ConnectionPool`
(:class:`BackendUpstream`) or a ``/libp2p-http`` transport stream kept in an
:class:`~ocf.httpstream.pool.IdlePool` keyed by peer (:class:`PeerUpstream`).
An idle connection may have died while it waited; an exchange on one that
fails before any answer is retried once on a fresh one, but only when the
body can be replayed, so a reused connection never costs a request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..errors import ProviderFailed, UpstreamError
from ..httpstream.bridge import ClientBridge
from ..httpstream.client import Response, exchange
from ..httpstream.pool import ConnectionPool, IdlePool
from .access import strip_credentials
from ..web.asgi import RequestBody

if TYPE_CHECKING:
    from ..transport.muxer import MuxedStream
    from ..ports import LocalService
    from .metrics import GatewayMetrics

HOPS_HEADER = b"x-ocf-hops"
IDENTITY_HEADER = b"x-ocf-identity-group"
#: How long an idle peer stream is kept. The far side (:func:`ocf.httpstream.server.serve_stream`)
#: drops a stream after 75 s idle; ours go well before, so we rarely pick one it is closing.
PEER_IDLE_TIMEOUT = 30.0
MAX_IDLE_PER_PEER = 64


class Conn(Protocol):
    """A byte stream with the HTTP bridge that has been speaking on it."""

    stream: Any
    bridge: ClientBridge
    reused: bool  # came from an idle pool (may have been closed by the far side meanwhile)


class Upstream(Protocol):
    """Where an :class:`Exchange` gets its byte stream, and where the stream goes afterwards."""

    kind: str  # the metrics label of this hop
    host: bytes | None  # the Host header to send (None: the client's)
    metrics: GatewayMetrics

    async def acquire(self, replayable: bool) -> Conn:
        """A stream to send on; an idle one only if ``replayable`` or if it was checked unread."""
        ...

    def failed(self, exc: UpstreamError) -> BaseException:
        """What to raise when the exchange failed before an answer and will not be retried."""
        ...

    def discard(self, conn: Conn) -> None: ...

    def done(self, conn: Conn) -> None:
        """The exchange ended cleanly: keep ``conn`` for the next request if it can carry one."""
        ...


@attrs.define(eq=False, slots=True)
class PooledStream:
    """A ``/libp2p-http`` stream kept between requests to one peer."""

    key: str
    stream: MuxedStream
    bridge: ClientBridge = attrs.field(factory=ClientBridge)
    reused: bool = False


def peer_stream_pool() -> IdlePool[str, PooledStream]:
    """Idle peer streams: fit while neither side reset or closed them and nothing is unread."""
    return IdlePool(
        idle_timeout=PEER_IDLE_TIMEOUT, max_idle_per_key=MAX_IDLE_PER_PEER, fits=_stream_reusable, drop=_reset
    )


def _stream_reusable(conn: PooledStream) -> bool:
    return conn.stream.reusable


def _reset(conn: PooledStream) -> None:
    conn.stream.reset()


class BackendUpstream:
    """A local backend (``target``: a registered service with host and port) over a pooled TCP connection."""

    kind = "backend"

    def __init__(self, pool: ConnectionPool, metrics: GatewayMetrics, target: LocalService) -> None:
        self.pool, self.metrics, self.target = pool, metrics, target
        self.host: bytes | None = f"{target.host}:{target.port}".encode()

    async def acquire(self, replayable: bool) -> Conn:
        # The pool checks an idle socket for EOF or junk before handing it out, so it reuses
        # one whatever the body; a connection closed in the meantime still gets one retry.
        target = self.target
        try:
            return await self.pool.connect(target.host, target.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
            raise ProviderFailed(
                f"service '{target.name}' at {target.host}:{target.port} is unreachable: {reason}",
                code="backend_unreachable",
            ) from None

    def failed(self, exc: UpstreamError) -> BaseException:
        target = self.target
        return ProviderFailed(
            f"service '{target.name}' at {target.host}:{target.port} failed: {exc}", code="backend_failed"
        )

    def discard(self, conn: Conn) -> None:
        self.pool.discard(conn)  # type: ignore[arg-type]

    def done(self, conn: Conn) -> None:
        self.pool.release(conn)  # type: ignore[arg-type]
        self.metrics.count_forward("backend", "ok")


class PeerUpstream:
    """Another peer's gateway over a ``/libp2p-http`` stream, idle ones kept per peer in ``pool``."""

    host: bytes | None = None

    def __init__(
        self,
        pool: IdlePool[str, PooledStream],
        metrics: GatewayMetrics,
        open_stream: Callable[[str], Awaitable[MuxedStream]],
        peer: str,
        kind: str,
    ) -> None:
        self.pool, self.metrics, self.open_stream, self.peer, self.kind = pool, metrics, open_stream, peer, kind

    async def acquire(self, replayable: bool) -> Conn:
        # An idle stream's death shows only when it is used: take one only for a replayable body.
        if replayable:
            conn = self.pool.take(self.peer)
            if conn is not None:
                conn.reused = True
                return conn
        return PooledStream(self.peer, await self.open_stream(self.peer))

    def failed(self, exc: UpstreamError) -> BaseException:
        return exc

    def discard(self, conn: Conn) -> None:
        conn.stream.reset()

    def done(self, conn: Conn) -> None:
        if conn.bridge.reusable:
            self.metrics.count_forward(self.kind, "ok")
            conn.bridge.next_cycle()
            self.pool.put(self.peer, conn)  # type: ignore[arg-type]
        else:
            conn.stream.reset()


class Exchange:
    """``async with``: one request to ``upstream`` and its :class:`Response`, the stream kept or dropped afterwards."""

    def __init__(
        self, upstream: Upstream, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: RequestBody
    ) -> None:
        self.upstream, self.method, self.target, self.headers, self.body = upstream, method, target, headers, body
        self._cm: Any = None
        self._conn: Any = None

    async def __aenter__(self) -> Response:
        up, body = self.upstream, self.body
        t0 = time.perf_counter()
        for attempt in range(2):
            conn = await up.acquire(body.replayable and attempt == 0)
            cm = exchange(
                conn.stream, self.method, self.target, self.headers, body.source(),
                bridge=conn.bridge, content_length=None if body.replayable else body.content_length, host=up.host,
            )  # fmt: skip
            try:
                response = await cm.__aenter__()
            except UpstreamError as exc:
                up.discard(conn)
                if conn.reused and not exc.response_started and body.replayable and attempt == 0:
                    continue  # the far side had closed that idle stream; a fresh one will do
                error = up.failed(exc)
                if error is exc:
                    raise
                raise error from None
            except BaseException:
                up.discard(conn)
                raise
            self._cm, self._conn = cm, conn
            up.metrics.observe_latency(up.kind, time.perf_counter() - t0)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            suppress = await self._cm.__aexit__(*exc_info)
        except BaseException:
            self.upstream.discard(self._conn)
            raise
        if exc_info[0] is None:
            self.upstream.done(self._conn)
        else:
            self.upstream.discard(self._conn)
        return bool(suppress)


def backend_headers(scope: dict, target: LocalService) -> list[tuple[bytes, bytes]]:
    """The client's headers for a local backend: its credentials swapped for the backend's own key, if any.

    The client's credentials were for the entry gateway, and the hop count
    and identity are ours.
    """
    headers = [(k, v) for k, v in strip_credentials(scope["headers"]) if k not in (HOPS_HEADER, IDENTITY_HEADER)]
    api_key = target.api_key
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    return headers


def peer_headers(scope: dict, hops: int) -> list[tuple[bytes, bytes]]:
    """The client's headers for another gateway: never its credentials (they were for this one), one hop more."""
    headers = [(k, v) for k, v in strip_credentials(scope["headers"]) if k != HOPS_HEADER]
    headers.append((HOPS_HEADER, str(hops + 1).encode()))
    return headers


class entered:
    """``async with`` for a context manager whose ``__aenter__`` the caller already awaited."""

    def __init__(self, cm: Any, value: Any) -> None:
        self.cm, self.value = cm, value

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc_info: Any) -> bool:
        return bool(await self.cm.__aexit__(*exc_info))
