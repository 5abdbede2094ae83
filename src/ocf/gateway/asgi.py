"""The ASGI layer in front of the Quart app: CORS, metrics, peer policy, forwarding routes.

One thin wrapper sees every request, whether it came to the TCP port or from
another peer over a ``/libp2p-http`` stream, so CORS headers, request
counting and the remote-peer policy are applied once, in one place; the
forwarding routes (:mod:`ocf.gateway.forward`) are served here directly and
everything else goes on to Quart's blueprints.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from ..errors import Forbidden
from ..httpstream.bridge import get_header
from .errors import send_asgi_error

if TYPE_CHECKING:
    from ..jobs.hot import HotRoutes
    from .forward import Forwarder
    from .metrics import GatewayMetrics

log = logging.getLogger("ocf.gateway")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]

CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_EXPOSE = b"X-Computing-Node, Retry-After, X-OCF-Error-Code"
#: Routes a remote peer (arriving over /libp2p-http) may not use: they edit this node's own entry.
REMOTE_FORBIDDEN = (("POST", "/v1/dnt/_node"), ("DELETE", "/v1/dnt/_node"), ("PATCH", "/v1/dnt/_node"), ("PUT", "/v1/dnt/_node"))


class Cors:
    """Permissive CORS as OCF by default (``*``); a comma-separated origin list restricts it."""

    def __init__(self, origins: str) -> None:
        items = [o.strip() for o in origins.split(",") if o.strip()]
        self.any = "*" in items or not items
        self.allowed = {o.encode() for o in items}

    def allow_origin(self, origin: bytes | None) -> bytes | None:
        if self.any:
            return b"*"
        if origin is not None and origin in self.allowed:
            return origin
        return None

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        allowed = self.allow_origin(origin)
        if allowed is None:
            return []
        out = [(b"access-control-allow-origin", allowed), (b"access-control-expose-headers", CORS_EXPOSE)]
        if not self.any:
            out.append((b"vary", b"Origin"))
        return out

    def preflight_headers(self, origin: bytes | None, requested: bytes | None) -> list[tuple[bytes, bytes]]:
        base = self.headers(origin)
        if not base:
            return []
        return base + [
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", requested or b"*"),
            (b"access-control-max-age", b"86400"),
        ]


class GatewayASGI:
    """Wraps Quart's ``asgi_app``; install with ``app.asgi_app = GatewayASGI(app.asgi_app, ...)``."""

    def __init__(self, inner: ASGIApp, forwarder: "Forwarder", metrics: "GatewayMetrics", cors: Cors, hot: "HotRoutes") -> None:
        self.inner = inner
        self.forwarder = forwarder
        self.hot = hot
        self.metrics = metrics
        self.cors = cors

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        if scope.get("ocf.nested"):
            # Dispatched in-process by the forwarder (internal service, /v1/p2p to ourselves): the
            # outer call already applies CORS and counting; check the policy (the path is new) and route.
            if self._forbidden(scope):
                await send_asgi_error(send, Forbidden("another peer may not change this node's entry", code="remote_forbidden"))
            elif self.forwarder.route_of(scope["path"]) is not None:
                await self.forwarder(scope, receive, send)
            elif self.hot.route_of(scope["path"]) is not None:
                await self.hot(scope, receive, send)
            else:
                await self.inner(scope, receive, send)
            return
        headers = scope["headers"]
        origin = get_header(headers, b"origin")
        method = scope["method"]
        status = 0
        extra = self.cors.headers(origin) if origin is not None or self.cors.any else []

        async def send_wrapped(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        route = self.forwarder.route_of(scope["path"])
        hot = self.hot.route_of(scope["path"]) if route is None else None
        try:
            if method == "OPTIONS" and get_header(headers, b"access-control-request-method") is not None:
                scope["ocf.route"] = "preflight"
                await send(
                    {"type": "http.response.start", "status": 204, "headers": self.cors.preflight_headers(origin, get_header(headers, b"access-control-request-headers"))}
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                status = 204
                return
            if self._forbidden(scope):
                scope["ocf.route"] = scope["path"]
                await send_asgi_error(send_wrapped, Forbidden("another peer may not change this node's entry", code="remote_forbidden"))
                return
            if route is not None:
                scope["ocf.route"] = route
                if method == "OPTIONS":
                    await send_wrapped({"type": "http.response.start", "status": 204, "headers": [(b"allow", CORS_METHODS)]})
                    await send_wrapped({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                status = await self.forwarder(scope, receive, send, extra)  # adds the CORS headers itself
            elif hot is not None:
                scope["ocf.route"] = hot
                await self.hot(scope, receive, send_wrapped)
            else:
                await self.inner(scope, receive, send_wrapped)
        finally:
            self.metrics.count_request(scope.get("ocf.route", "unmatched"), _method_label(method), str(status or 499))


    @staticmethod
    def _forbidden(scope: dict) -> bool:
        remote = scope.get("extensions", {}).get("ocf.remote_peer")
        return remote is not None and (scope["method"], scope["path"].rstrip("/")) in REMOTE_FORBIDDEN


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})


def _method_label(method: str) -> str:
    return method if method in _METHODS else "other"
