"""Serve the gateway's Quart-Trio app with Hypercorn's Trio worker.

Hypercorn binds the sockets itself and reports the bound addresses through
``task_status``, which is how a node started with ``--port 0`` learns (and
reports) its real port.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from ..errors import OcfError, find_in_group
from ..httpstream.server import serve_stream
from .app import create_app
from .forward import LIBP2P_HTTP

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("ocf.gateway")


class GatewayError(OcfError):
    """The gateway could not start (usually: the port is taken)."""


@attrs.define
class Gateway:
    url: str
    binds: list[str]
    app: Any = None  # the QuartTrio app (an ASGI callable), e.g. for in-process requests in tests


async def serve_peer_stream(app: Any, stream: Any) -> None:
    """A ``/libp2p-http`` stream from another peer: HTTP/1.1 requests into our own app.

    The app is called in-process (no loopback socket, see
    :mod:`ocf.httpstream.server`); the scope names the authenticated peer.
    """
    peer = str(stream.remote_peer)
    await serve_stream(stream, app, client=(peer, 0), extensions={"ocf.remote_peer": peer})


def _hypercorn_config(node: "Node") -> HyperConfig:
    cfg = HyperConfig()
    host = node.config.host
    cfg.bind = [f"[{host}]:{node.config.port}" if ":" in host else f"{host}:{node.config.port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("ocf.gateway.server")
    cfg.graceful_timeout = 1.0  # long-lived streams must not hold up shutdown
    cfg.keep_alive_timeout = 75
    cfg.h11_max_incomplete_size = 64 * 1024  # request line + headers limit
    cfg.include_server_header = False
    return cfg


@contextlib.asynccontextmanager
async def open_gateway(node: "Node") -> AsyncIterator[Gateway]:
    app = create_app(node)
    cfg = _hypercorn_config(node)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(lambda task_status: serve(app, cfg, shutdown_trigger=stop.wait, task_status=task_status))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - hypercorn wraps bind errors in groups
            os_error = find_in_group(exc, OSError)
            if os_error is None:
                raise
            reason = getattr(os_error, "strerror", None) or os_error
            raise GatewayError(f"cannot listen on {cfg.bind[0]} for the HTTP gateway: {reason}") from None
        url = _public_url(binds[0], node.config.host)
        gateway = Gateway(url=url, binds=binds, app=app)
        log.info("gateway listening url=%s", url)
        # Other peers reach this gateway over /libp2p-http streams (as OCF's P2P HTTP listener).
        if node.host is not None:
            node.host.set_stream_handler(LIBP2P_HTTP, functools.partial(serve_peer_stream, app))
        try:
            yield gateway
        finally:
            if node.host is not None:
                node.host.remove_stream_handler(LIBP2P_HTTP)
            stop.set()
            forwarder = app.extensions.get("ocf.forwarder")
            if forwarder is not None:
                forwarder.close()


def _public_url(bind: str, host: str) -> str:
    """Hypercorn reports ``http://0.0.0.0:8092``; a usable URL names a reachable host."""
    if host in ("0.0.0.0", "::"):
        scheme, rest = bind.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://127.0.0.1:{port}"
    return bind
