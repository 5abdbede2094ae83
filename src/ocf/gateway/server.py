"""Serve the gateway's Quart-Trio app with Hypercorn's Trio worker.

Hypercorn binds the sockets itself and reports the bound addresses through
``task_status``, which is how a node started with ``--port 0`` learns (and
reports) its real port.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, AsyncIterator

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from ..errors import OcfError, find_in_group
from .app import create_app

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("ocf.gateway")


class GatewayError(OcfError):
    """The gateway could not start (usually: the port is taken)."""


@attrs.define
class Gateway:
    url: str
    binds: list[str]


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
        gateway = Gateway(url=url, binds=binds)
        log.info("gateway listening url=%s", url)
        try:
            yield gateway
        finally:
            stop.set()


def _public_url(bind: str, host: str) -> str:
    """Hypercorn reports ``http://0.0.0.0:8092``; a usable URL names a reachable host."""
    if host in ("0.0.0.0", "::"):
        scheme, rest = bind.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://127.0.0.1:{port}"
    return bind
