"""The ASGI layer in front of the Quart app: route once, apply the policy, then dispatch.

One thin wrapper sees every request, whether it came to the TCP port or from
another peer over a ``/libp2p-http`` stream. It classifies the raw target
once (:func:`ocf.gateway.router.classify`), and everything else follows from
that :class:`~ocf.gateway.router.Route`: the metrics label, CORS and the
browser write guard (:mod:`ocf.gateway.cors`), the access policy
(:mod:`ocf.gateway.access`), the 415 check of JSON routes, and the dispatch
to the forwarder, a mounted raw-ASGI route (the tracker's hot routes) or Quart. The forwarder calls
:meth:`GatewayASGI.dispatch_internal` for this node's internal services and
for ``/v1/p2p/<self>``: a new target, routed and checked like any other, but
without re-entering the whole app.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from collections.abc import Mapping, Sequence

from ..errors import GatewayRequestError, MethodNotAllowed, NotFound, UnsupportedMediaType
from ..httpstream.bridge import get_header
from ..web.asgi import ASGIApp, Receive, Send
from . import router
from ..web.errors import send_asgi_error
from .router import Route

if TYPE_CHECKING:
    from ..ports import RawRoute
    from .access import Access
    from .cors import Cors
    from .forward import Forwarder
    from .metrics import GatewayMetrics

log = logging.getLogger("ocf.gateway")

_JSON_LINES = (b"application/x-ndjson", b"application/jsonl", b"application/jsonlines")
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class GatewayASGI:
    """Wraps Quart's ``asgi_app``; install with ``app.asgi_app = GatewayASGI(app.asgi_app, ...)``."""

    def __init__(
        self,
        inner: ASGIApp,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
        cors: Cors,
        raw: Mapping[str, RawRoute],
        access: Access,
    ) -> None:
        self.inner = inner
        self.forwarder = forwarder
        self.raw = dict(raw)  # router family -> raw-ASGI route, from the node's mounts
        self.metrics = metrics
        self.cors = cors
        self.access = access
        self.router = router.Router()
        forwarder.dispatch_internal = self.dispatch_internal

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = scope["headers"]
        origin = get_header(headers, b"origin")
        method = scope["method"]
        status = 0
        label = "invalid"
        extra: list[tuple[bytes, bytes]] = []

        async def send_wrapped(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        try:
            route = self.router.classify(
                method, scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            )
            label = route.label
            scope["ocf.route"] = route
            extra = self.cors.headers(route, method, origin)
            if method == "OPTIONS" and route.family not in (router.NOT_FOUND, router.METHOD_NOT_ALLOWED):
                label = "preflight"
                status = await self._options(route, headers, origin, send)
                return
            if origin is not None and "ocf.remote_peer" not in scope.get("extensions", {}):
                self.cors.check_write(method, origin, get_header(headers, b"host"))
            if route.family in router.FORWARDING:
                self._admit(route, scope)
                status = await self.forwarder(route, scope, receive, send, extra)
            else:
                await self.dispatch(route, scope, receive, send_wrapped)
        except GatewayRequestError as exc:
            if status == 0:
                await send_asgi_error(send_wrapped, exc)
        finally:
            self.metrics.count_request(label, _method_label(method), str(status or 499))

    async def _options(self, route: Route, headers: list, origin: bytes | None, send: Send) -> int:
        requested = get_header(headers, b"access-control-request-method")
        if requested is not None:
            status, out = self.cors.preflight(
                route, origin, requested, get_header(headers, b"access-control-request-headers")
            )
        else:
            status, out = 204, [(b"allow", b", ".join(sorted(m.encode() for m in route.methods)))]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return status

    def _admit(self, route: Route, scope: dict) -> None:
        """The checks every dispatched route gets: its method, its policy, its body's type."""
        method = scope["method"]
        if route.family == router.NOT_FOUND:
            raise NotFound(f"no route {method} {scope['path']} on this gateway", code="not_found")
        if route.family == router.METHOD_NOT_ALLOWED:
            allow = ", ".join(sorted(route.methods))
            raise MethodNotAllowed(f"method {method} is not allowed on {route.path}", headers={"Allow": allow})
        self.access.check(route, scope)
        if route.body and method not in _NO_BODY_METHODS:
            _check_body_type(route, scope["headers"])

    async def dispatch(
        self, route: Route, scope: dict, receive: Receive, send: Send, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Serve a routed request (the policy is checked here, so every way in gets it)."""
        self._admit(route, scope)
        if route.family in router.FORWARDING:
            await self.forwarder(route, scope, receive, send, extra)
        elif route.family in self.raw:
            await self.raw[route.family](route, scope, receive, send)
        else:
            # Quart matches the canonical path the router matched, so it cannot route differently.
            inner = dict(scope, path=route.path, raw_path=route.path.encode("utf-8"))
            await self.inner(inner, receive, send)

    async def dispatch_internal(self, scope: dict, receive: Receive, send: Send, target: bytes) -> None:
        """Serve ``target`` of this node in-process (internal services, ``/v1/p2p/<self>``)."""
        route = self.router.classify(scope["method"], target)
        inner = dict(scope, raw_path=target, path=route.path or target.decode("latin-1"))
        inner["ocf.route"] = route
        await self.dispatch(route, inner, receive, send)


def _check_body_type(route: Route, headers: list[tuple[bytes, bytes]]) -> None:
    """A JSON route refuses other declared body types (a browser form can send text/plain anywhere)."""
    value = get_header(headers, b"content-type")
    if value is None:
        return
    media = value.split(b";", 1)[0].strip().lower()
    if media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json")):
        return
    if route.body == router.JSON_OR_LINES and media in _JSON_LINES:
        return
    raise UnsupportedMediaType(
        f"this route takes JSON bodies (Content-Type: application/json), not {media.decode('latin-1') or 'none'}"
    )


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})


def _method_label(method: str) -> str:
    return method if method in _METHODS else "other"
