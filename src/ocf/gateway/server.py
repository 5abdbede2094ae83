"""Serve the gateway's Quart-Trio app on its TCP port and to other peers' streams.

Both doors use ocf's own HTTP/1.1 engine (:mod:`ocf.httpstream.server`); the
TCP side (:func:`ocf.httpstream.listener.serve_http`) replaced Hypercorn,
which cost twice the CPU per request (see that module). It reports the bound
addresses through ``task_status``, which is how a node started with
``--port 0`` learns (and reports) its real port.

Both doors get the ``--http.*`` limits: deadlines for request heads, bodies
and writes, and the largest head. The TCP port also has a connection cap,
with a reserve that may only reach ``/v1/health`` so that a node full of
busy (or hostile) connections can still be checked on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, cast
from collections.abc import AsyncIterator

import attrs
import trio

from .. import log as logfmt
from ..errors import OcfError, find_in_group
from ..httpstream.admission import ConnectionLimits, ServerStats
from ..httpstream.deadlines import Timeouts
from ..httpstream.listener import serve_http
from ..httpstream.metrics import HttpServerCollector
from ..httpstream.server import serve_stream
from .app import GatewayParts, create_app
from .forward import LIBP2P_HTTP

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from ..config import Config
    from ..transport.muxer import MuxedStream
    from ..web.asgi import ASGIApp

log = logging.getLogger("ocf.gateway")


class GatewayError(OcfError):
    """The gateway could not start (usually: the port is taken)."""


@attrs.define
class Gateway:
    url: str
    binds: list[str]
    app: QuartTrio  # an ASGI callable, e.g. for in-process requests in tests
    admin_token: str  # read from, or created in, the data directory (or --admin-token)


@attrs.frozen
class HttpLimits:
    """What ``--http.*`` says, in the shapes the HTTP engine takes."""

    timeouts: Timeouts
    connections: ConnectionLimits
    max_header_size: int
    keep_alive_timeout: float

    @classmethod
    def from_config(cls, config: Config) -> HttpLimits:
        return cls(
            timeouts=Timeouts(
                head=config.http_head_timeout,
                body=config.http_body_timeout,
                min_body_rate=float(config.http_min_body_rate),
                write=config.http_write_timeout,
            ),
            connections=ConnectionLimits(config.http_max_connections, config.http_reserve_connections, RESERVED_PATHS),
            max_header_size=config.http_max_header_size,
            keep_alive_timeout=config.http_keep_alive_timeout,
        )


async def serve_peer_stream(app: QuartTrio, limits: HttpLimits, stream: MuxedStream) -> None:
    """A ``/libp2p-http`` stream from another peer: HTTP/1.1 requests into our own app.

    The app is called in-process (no loopback socket, see
    :mod:`ocf.httpstream.server`); the scope names the authenticated peer.
    """
    peer = str(stream.remote_peer)
    await serve_stream(
        stream,
        cast("ASGIApp", app),  # Quart's TypedDict-typed messages are our plain dicts at run time
        client=(peer, 0),
        extensions={"ocf.remote_peer": peer},
        max_header_size=limits.max_header_size,
        idle_timeout=limits.keep_alive_timeout,
        timeouts=limits.timeouts,
    )


# What a connection over the cap (in the reserve) may still ask: whether the node is up.
RESERVED_PATHS = frozenset({"/v1/health"})
# Long-lived responses (event streams) get this long to finish when the node stops.
GRACEFUL_TIMEOUT = 1.0


@contextlib.asynccontextmanager
async def open_gateway(parts: GatewayParts) -> AsyncIterator[Gateway]:
    """Serve the gateway on ``--host``/``--port`` and to peers' ``/libp2p-http`` streams until the block ends."""
    app = create_app(parts)
    config = parts.config
    host, port = config.host, config.port
    limits = HttpLimits.from_config(config)
    stats = ServerStats()
    app.extensions["ocf.metrics"].registry.register(HttpServerCollector(stats))
    stop = trio.Event()
    serve = functools.partial(
        serve_http,
        cast("ASGIApp", app),  # Quart types scopes as hypercorn's TypedDicts; the engine passes plain dicts
        host,
        port,
        shutdown_trigger=stop.wait,
        max_header_size=limits.max_header_size,
        idle_timeout=limits.keep_alive_timeout,
        graceful_timeout=GRACEFUL_TIMEOUT,
        timeouts=limits.timeouts,
        limits=limits.connections,
        stats=stats,
    )
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(serve)
        except BaseException as exc:  # noqa: BLE001 - a bind error may arrive wrapped in a group
            os_error = find_in_group(exc, OSError)
            if os_error is None:
                raise
            reason = (os_error.strerror if isinstance(os_error, OSError) else None) or os_error
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise GatewayError(f"cannot listen on {where} for the HTTP gateway: {reason}") from None
        url = _public_url(binds[0], config.host)
        gateway = Gateway(url=url, binds=binds, app=app, admin_token=app.extensions["ocf.admin_token"])
        # Say where it really listens (0.0.0.0 is every interface), not only the URL to use locally.
        log.info("gateway listening %s", logfmt.kv(bind=",".join(binds), url=url))
        if host in ("0.0.0.0", "::") and not (config.api_keys or config.api_key_file):
            log.warning(
                "gateway reachable on all interfaces without API keys %s",
                logfmt.kv(bind=",".join(binds), hint="--host 127.0.0.1 or --api-key"),
            )
        # The routing index is rebuilt on table changes by this task, never by a request.
        index_scope = trio.CancelScope()
        forwarder = app.extensions.get("ocf.forwarder")

        async def keep_index() -> None:
            assert forwarder is not None
            with index_scope:
                await forwarder.providers.keep_index()

        if forwarder is not None:
            nursery.start_soon(keep_index)
        # Other peers reach this gateway over /libp2p-http streams (as OCF's P2P HTTP listener).
        peers = parts.host
        if peers is not None:
            peers.set_stream_handler(LIBP2P_HTTP, functools.partial(serve_peer_stream, app, limits))
        try:
            yield gateway
        finally:
            index_scope.cancel()
            if peers is not None:
                peers.remove_stream_handler(LIBP2P_HTTP)
            stop.set()
            app.extensions["ocf.forwarder"].close()


def _public_url(bind: str, host: str) -> str:
    """The server reports ``http://0.0.0.0:8092``; a usable URL names a reachable host."""
    if host in ("0.0.0.0", "::"):
        scheme, rest = bind.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://127.0.0.1:{port}"
    return bind
