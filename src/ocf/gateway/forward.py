"""The forwarding routes: ``/v1/_service``, ``/v1/p2p`` and ``/v1/service``.

These are served as raw ASGI in front of the Quart app (see
:mod:`ocf.gateway.asgi`) rather than as Quart views, because a proxy needs
what Quart's request/response wrappers take away:

* backpressure both ways: the client's body is read from ASGI ``receive``
  only as fast as the upstream takes it (Quart's ``request.body`` buffers
  whatever arrives), and each upstream chunk is sent before the next is read;
* everything an exchange runs (the request body pump) lives in nurseries of
  the request's own call, so nothing outlives the request, and a client that
  goes away cancels the upstream request at once (the server cancels the
  call, see :mod:`ocf.httpstream.server`);
* a smaller per-hop cost (less CPU per request than a Quart view; see
  ``benchmarks/hops.py``), which matters because a request through the
  network crosses two gateways.

Routing (which provider, in what order, when to retry) lives in
:mod:`ocf.gateway.routing` as pure functions; this module adds liveness,
load, limits, timeouts and the actual byte moving.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

import trio

from .. import log as logfmt
from ..errors import (
    BadRequest,
    BridgeError,
    ForwardTimeout,
    GatewayRequestError,
    IdentityError,
    LoopDetected,
    NoProviderAvailable,
    NotFound,
    PayloadTooLarge,
    ProviderFailed,
    TransportError,
    UpstreamError,
    transport_errors_unwrapped,
)
from ..httpstream.bridge import ClientBridge, body_length, forwardable, get_header
from ..httpstream.client import Response, exchange
from ..httpstream.pool import ConnectionPool
from ..services.registrar import LLM_SERVICE
from . import routing
from .access import strip_credentials
from .errors import ERROR_CODE_NAME, send_asgi_error
from .router import OWN_SERVICE, P2P

if TYPE_CHECKING:
    from ..node import Node
    from .metrics import GatewayMetrics
    from .router import Route

log = logging.getLogger("ocf.gateway")

LIBP2P_HTTP = "/libp2p-http"  # protocol id of HTTP over transport streams, as OCF
COMPUTING_NODE_HEADER = b"x-computing-node"
IDENTITY_HEADER = b"x-ocf-identity-group"
HOPS_HEADER = b"x-ocf-hops"
MAX_HOPS = 8
#: Error codes of ours that mean "the provider did nothing with the request": safe to try another.
RETRYABLE_CODES = frozenset({b"backend_unreachable"})
ENTRIES_TTL = 0.5  # seconds a node table snapshot is reused while the table's version is unchanged
#: Bodies up to this size (with a declared length) are read before forwarding: cheaper and replayable.
SMALL_BODY = 64 * 1024

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]


class _ClientGone(Exception):
    """The HTTP client disconnected; nothing more to send anyone."""


class _ConnectFailed(Exception):
    """No exchange could be started with a provider (nothing reached it)."""


class _UnknownPeer(_ConnectFailed):
    """Not connected, and neither the transport nor the node table knows an address."""


# --- the client's side of one request -----------------------------------------------------


class RequestBody:
    """The client's request body, read from ASGI ``receive`` exactly once.

    Iterate :meth:`chunks` to stream it (enforcing ``limit``), or
    :meth:`read_all` to buffer it for JSON routing, after which it can be
    replayed to a second provider.
    """

    def __init__(self, receive: Receive, scope: dict, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        headers = scope["headers"]
        try:
            self.content_length = body_length(headers)
        except BridgeError as exc:
            raise BadRequest(str(exc)) from None
        chunked = get_header(headers, b"transfer-encoding") is not None
        self.has_body = chunked or bool(self.content_length)
        if self.content_length is not None and self.content_length > limit:
            raise PayloadTooLarge(f"request body of {self.content_length} bytes exceeds the limit of {limit} bytes")
        self.received = 0
        self.done = not self.has_body
        self.buffered: bytes | None = None if self.has_body else b""

    @property
    def replayable(self) -> bool:
        return self.buffered is not None

    async def _next(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes")
        if not message.get("more_body", False):
            self.done = True
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.buffered is not None:
            if self.buffered:
                yield self.buffered
            return
        while not self.done:
            chunk = await self._next()
            if chunk:
                yield chunk

    async def read_all(self) -> bytes:
        if self.buffered is None:
            parts = []
            while not self.done:
                parts.append(await self._next())
            self.buffered = b"".join(parts)
        return self.buffered

    def source(self) -> bytes | AsyncIterator[bytes]:
        """What to hand the upstream exchange: the bytes if buffered, else a one-shot stream."""
        return self.buffered if self.buffered is not None else self.chunks()

    def replay_receive(self, receive: Receive) -> Receive:
        """An ASGI ``receive`` that first replays the buffered body, then defers to ``receive``."""
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self.buffered or b"", "more_body": False}
            return await receive()

        return replay


class Responder:
    """Wraps ASGI ``send``: remembers the status and whether the head went out, adds ``extra`` headers.

    ``extra`` (CORS) comes from :class:`ocf.gateway.asgi.GatewayASGI`,
    which leaves adding it to us rather than wrapping ``send`` once more.
    """

    def __init__(self, send: Send, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self._send = send
        self.extra = list(extra)
        self.status = 0
        self.started = False
        self.finished = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            await self.start(message["status"], list(message.get("headers", [])))
            return
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the response head: ``headers`` (a list of the caller's, which this extends) plus ``extra``."""
        self.started = True
        self.status = status
        headers += self.extra
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def relay(self, response: Response, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Stream an upstream response to the client chunk by chunk, as each arrives."""
        # Our server adds its own Date; two would confuse caches.
        headers = [(k, v) for k, v in forwardable(response.headers) if k != b"date"]
        headers += extra
        await self.start(response.status, headers)
        body = response.whole_body()
        if body is not None:  # it all came with the head: one send, no iteration
            await self({"type": "http.response.body", "body": body, "more_body": False})
            return
        async for chunk in response:
            # The last chunk usually arrives together with the end of the message: say so in the
            # same send instead of a separate empty one (one write less per response).
            await self({"type": "http.response.body", "body": chunk, "more_body": not response.complete})
        if not self.finished:
            await self({"type": "http.response.body", "body": b"", "more_body": False})

    async def json(self, status: int, payload: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await self({"type": "http.response.start", "status": status, "headers": headers})
        await self({"type": "http.response.body", "body": body, "more_body": False})


# --- the forwarder ------------------------------------------------------------------------


class Forwarder:
    """Serves the three forwarding route families for one node's gateway."""

    def __init__(self, node: "Node", metrics: "GatewayMetrics", *, rng: random.Random | None = None) -> None:
        self.node = node
        self.config = node.config
        self.metrics = metrics
        self.pool = ConnectionPool()
        self.peer_streams = PeerStreams()
        self.rng = rng or random.Random()
        #: Serves a target of this node in-process (set by :class:`ocf.gateway.asgi.GatewayASGI`).
        self.dispatch_internal: Callable[[dict, Receive, Send, bytes], Awaitable[None]] | None = None
        self.in_flight = metrics.in_flight  # provider -> requests in flight from here (counted by metrics.enter/leave)
        self._down: dict[str, tuple[float, float]] = {}  # peer -> (until, backoff) after connect failures
        self._peer_ids: dict[str, Any] = {}
        self._entries_cache: dict[str, dict] = {}
        self._entries_version: Any = None
        self._entries_at = 0.0
        self._routes: dict[str, tuple[list[routing.Provider], list[str]]] = {}
        self._routes_of: dict | None = None  # the entries snapshot _routes was worked out from

    # --- entry point ------------------------------------------------------------------

    async def __call__(self, route: "Route", scope: dict, receive: Receive, send: Send, extra: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """Serve one forwarding request; ``extra`` headers go on the response. Returns its status (0: none sent)."""
        responder = Responder(send, extra)
        try:
            await self._dispatch(route, scope, receive, responder)
        except GatewayRequestError as exc:
            await self._fail(responder, exc, scope)
        except _ClientGone:
            log.debug("client went away %s", logfmt.kv(path=scope["path"]))
        return responder.status

    async def _fail(self, responder: Responder, exc: GatewayRequestError, scope: dict) -> None:
        if responder.started:
            # Too late for a status code: end the response early; the client sees it cut short.
            log.warning("forward aborted mid-response %s", logfmt.kv(path=scope["path"], reason=exc.message))
            return
        if exc.status >= 500:
            log.warning("forward failed %s", logfmt.kv(path=scope["path"], status=exc.status, code=exc.code, reason=exc.message))
        try:
            await send_asgi_error(responder, exc)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):  # pragma: no cover - client gone
            pass

    async def _dispatch(self, route: "Route", scope: dict, receive: Receive, responder: Responder) -> None:
        hops = _hops(scope)
        if hops >= MAX_HOPS:
            raise LoopDetected(f"request crossed {hops} gateways; refusing to forward it again")
        if route.family == P2P:
            await self._p2p(scope, receive, responder, route.peer, route.rest, hops)
        elif route.family == OWN_SERVICE:
            await self._local(scope, receive, responder, route.service, route.rest, hops)
        else:
            await self._service(scope, receive, responder, route.service, route.rest, hops)

    async def _guarded(self, scope: dict, receive: Receive, work: Callable[[RequestBody], Awaitable[None]]) -> None:
        """Run ``work`` under the request timeout, cancelled if the client leaves.

        The server (:func:`ocf.httpstream.server.serve_stream`, on the TCP
        port and on peer streams alike) cancels the call itself when the
        client leaves, so no task here needs to watch ``receive()``.
        Small bodies with a declared length are read up front: they cost no
        body-pump task later and can be replayed to a second provider.
        """
        body = RequestBody(receive, scope, self.config.max_body_size)
        try:
            with trio.move_on_after(self.config.request_timeout) as deadline:
                if body.content_length is not None and body.content_length <= SMALL_BODY:
                    await body.read_all()
                await work(body)
        except UpstreamError as exc:
            raise ProviderFailed(f"upstream failed: {exc}", code="upstream_failed") from None
        if deadline.cancelled_caught:
            raise ForwardTimeout(f"no complete answer within {self.config.request_timeout:g} s (request timeout)")

    # --- /v1/_service/<name>/<path>: this node's own service ---------------------------

    async def _local(self, scope: dict, receive: Receive, responder: Responder, name: str, rest: bytes, hops: int) -> None:
        services = self.node.services
        target = services.lookup(name) if services is not None else None
        if target is None:
            names = services.names() if services is not None else []
            raise NotFound(f"this node offers no service '{name}' (it offers: {', '.join(names) or 'none'})", code="service_not_found")
        if not hasattr(target, "port"):  # internal service: served by our own app under its prefix
            await self._internal(scope, receive, responder, _join(target.path_prefix, rest), [])
            return

        async def work(body: RequestBody) -> None:
            async with self._backend_exchange(target, scope, body, rest) as response:
                await responder.relay(response)

        await self._guarded(scope, receive, work)

    def _backend_exchange(self, target: Any, scope: dict, body: RequestBody, rest: bytes):  # type: ignore[no-untyped-def]
        return _BackendExchange(self, target, scope, body, rest)

    async def _internal(self, scope: dict, receive: Receive, send: Send, path: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        """Serve ``path`` of this node in-process (no HTTP hop), routed and checked like any request."""
        assert self.dispatch_internal is not None
        inner = dict(scope)
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k != HOPS_HEADER] + [(HOPS_HEADER, str(_hops(scope) + 1).encode())]

        async def add_headers(message: dict) -> None:
            if message["type"] == "http.response.start" and extra:
                message = dict(message, headers=list(message.get("headers", [])) + list(extra))
            await send(message)

        await self.dispatch_internal(inner, receive, add_headers, path)

    # --- /v1/p2p/<peer>/<path>: another peer's gateway ----------------------------------

    async def _p2p(self, scope: dict, receive: Receive, responder: Responder, peer_text: str, rest: bytes, hops: int) -> None:
        peer = self._peer_id(peer_text)
        if peer == self.node.peer_id:
            await self._internal(scope, receive, responder, b"/" + rest, [])
            return
        if not self._known(peer, peer_text):
            # Before any per-peer state: made-up peer IDs must not grow the in-flight series on /metrics.
            raise NotFound(f"peer {peer_text} is not connected and not in the node table", code="peer_not_found")
        target = b"/" + rest + (b"?" + scope["query_string"] if scope.get("query_string") else b"")

        async def work(body: RequestBody) -> None:
            limit = self.config.max_forwards_per_peer
            if self.in_flight.get(peer_text, 0) >= limit:
                raise NoProviderAvailable(f"peer {peer_text} already has {limit} requests in flight from this node", retry_after=1, code="peer_busy")
            self.metrics.enter(peer_text)
            try:
                async with self._peer_exchange(peer_text, scope, body, target, hops, kind="p2p") as response:
                    await responder.relay(response)
            except _UnknownPeer:
                raise NotFound(f"peer {peer_text} is not connected and not in the node table", code="peer_not_found") from None
            except _ConnectFailed:
                # Never what its addresses answered: they are the peer's choice, and the
                # answer would make this node a port scanner for whoever asks.
                raise ProviderFailed(f"peer {peer_text} is unreachable", code="peer_unreachable") from None
            except UpstreamError as exc:
                raise ProviderFailed(f"peer {peer_text} failed: {exc}", code="peer_failed") from None
            finally:
                self.metrics.leave(peer_text)

        await self._guarded(scope, receive, work)

    def _known(self, peer: Any, peer_text: str) -> bool:
        """Connected, listed in the node table, or with an address the transport knows."""
        host = self.node.host
        if host is None:
            return False
        return host.is_connected(peer) or peer_text in self._entries() or bool(host.peer_addrs(peer))

    def _peer_id(self, text: str) -> Any:
        cached = self._peer_ids.get(text)
        if cached is not None:
            return cached
        from ..identity import PeerId

        try:
            peer = PeerId.from_string(text)
        except (IdentityError, ValueError) as exc:
            raise BadRequest(f"'{text}' is not a peer ID: {exc}", code="bad_peer_id") from None
        if len(self._peer_ids) < 4096:
            self._peer_ids[text] = peer
        return peer

    def _peer_exchange(self, peer_text: str, scope: dict, body: RequestBody, target: bytes, hops: int, *, kind: str):  # type: ignore[no-untyped-def]
        return _PeerExchange(self, peer_text, scope, body, target, hops, kind)

    async def open_peer_stream(self, peer_text: str) -> Any:
        host = self.node.host
        if host is None:
            raise _ConnectFailed("this node has no transport")
        peer = self._peer_id(peer_text)
        if not host.is_connected(peer):
            entry = self._entries().get(peer_text) or {}
            addrs = [a for a in entry.get("addrs") or [] if isinstance(a, str)]
            if addrs:
                try:
                    host.add_addrs(peer, addrs)
                except Exception as exc:  # noqa: BLE001 - a bad address in someone's entry must not break routing
                    log.debug("ignoring bad addrs from the node table %s", logfmt.kv(peer=peer.short(), reason=exc))
            if not host.is_connected(peer) and not host.peer_addrs(peer):
                if addrs:
                    raise _ConnectFailed(f"peer {peer_text} publishes no address this node dials")
                raise _UnknownPeer(f"peer {peer_text} is not connected and no address of it is known")
        try:
            with transport_errors_unwrapped(), trio.fail_after(self.config.dial_timeout):
                return await host.new_stream(peer, LIBP2P_HTTP)
        except trio.TooSlowError:
            raise _ConnectFailed(f"opening a stream timed out after {self.config.dial_timeout:g} s") from None
        except TransportError as exc:
            log.debug("cannot open a stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            raise _ConnectFailed(str(exc) or type(exc).__name__) from None

    # --- /v1/service/<name>/<path>: any provider in the network --------------------------

    def _entries(self) -> dict[str, dict]:
        """The node table's live entries, reused while the table is unchanged (for at most 0.5 s).

        Building the entries means materialising every peer's document, and
        a busy dispatcher asks on every request; the short expiry keeps
        time-based fields (liveness) fresh, and :meth:`usable` checks the
        live connection state anyway.

        A peer that vanished without leaving (killed, cut off) stays listed,
        not connected, until it is stale: its services then answer 503 with
        ``Retry-After`` (it may be back), and 404 only once the table has
        given up on it or it said it left.
        """
        table = self.node.table
        if table is not None:
            version = getattr(table, "version", None)
            now = time.monotonic()
            if version is not None and version == self._entries_version and now - self._entries_at < ENTRIES_TTL:
                return self._entries_cache
            entries = {peer: e for peer, e in table.entries(include_all=True).items() if _still_listed(e)}
            self._entries_cache, self._entries_version, self._entries_at = entries, version, now
            return entries
        services = self.node.services
        records = services.records() if services is not None else []
        return {str(self.node.peer_id): {"id": str(self.node.peer_id), "service": records}}

    async def _service(self, scope: dict, receive: Receive, responder: Responder, name: str, rest: bytes, hops: int) -> None:
        entries = self._entries()
        providers, keys = self._route(entries, name)
        if scope["method"] == "GET" and name == LLM_SERVICE and (rest in (b"v1/models", b"v1/models/") or rest.startswith(b"v1/models/")):
            await self._models(responder, providers, rest[len(b"v1/models") :].strip(b"/").decode("latin-1"))
            return

        async def work(body: RequestBody) -> None:
            identity = routing.identity_from_headers(v.decode("latin-1") for k, v in scope["headers"] if k == IDENTITY_HEADER)
            if not identity and keys and body.has_body:
                identity = routing.identity_from_json(_parse_json(await body.read_all()), keys)
            candidates = routing.select(providers, identity, service=name, known=lambda: routing.known_services(entries), has_body=body.has_body, keys=keys)
            await self._forward_any(scope, receive, responder, body, name, rest, hops, candidates)

        await self._guarded(scope, receive, work)

    def _route(self, entries: dict[str, dict], name: str) -> tuple[list[routing.Provider], list[str]]:
        """The providers of ``name`` and the identity keys they route on, worked out once per table snapshot."""
        if self._routes_of is not entries:
            self._routes, self._routes_of = {}, entries
        route = self._routes.get(name)
        if route is None:
            providers = routing.providers_of(entries, name, str(self.node.peer_id))
            route = (providers, routing.identity_keys(providers))
            if len(self._routes) < 256:  # names come from request paths: bounded
                self._routes[name] = route
        return route

    def usable(self, provider: routing.Provider, now: float) -> bool:
        if provider.local:
            services = self.node.services
            return services is not None and services.status(provider.service["name"]) == "healthy"
        if not (provider.healthy and provider.online):
            return False
        down = self._down.get(provider.peer)
        if down is not None and down[0] > now:
            return False
        host = self.node.host
        if host is None:
            return False
        return host.is_connected(self._peer_id(provider.peer)) or bool(provider.entry.get("addrs"))

    def _mark_down(self, peer: str) -> None:
        _, backoff = self._down.get(peer, (0.0, 1.0))
        self._down[peer] = (time.monotonic() + backoff, min(backoff * 2, 30.0))

    def _mark_up(self, peer: str) -> None:
        self._down.pop(peer, None)

    async def _forward_any(self, scope: dict, receive: Receive, responder: Responder, body: RequestBody, name: str, rest: bytes, hops: int, candidates: list[routing.Provider]) -> None:
        """Forward to the best provider; once more to another if nothing reached the first.

        Providers we have a live connection to (or this node) come first;
        ones the table lists but we would have to dial only if none is
        connected. A provider that could not be reached at all counts as
        unavailable (503 if that leaves none), one that took the request and
        then failed as a failed provider (502).
        """
        tried: set[str] = set()
        reasons: list[str] = []
        reached = False
        limit = self.config.max_forwards_per_peer
        for attempt in range(2):
            now = time.monotonic()
            usable = [p for p in candidates if p.peer not in tried and self.usable(p, now)]
            if not usable:
                break
            connected = [p for p in usable if p.local or self._connected(p.peer)]
            pool = [p for p in (connected or usable) if self.in_flight.get(p.peer, 0) < limit]
            if not pool:
                raise NoProviderAvailable(f"all {len(usable)} provider(s) of '{name}' are at their limit of {limit} concurrent requests", retry_after=1, code="providers_busy")
            provider = routing.choose(pool, self.in_flight, self.rng)
            tried.add(provider.peer)
            try:
                await self._forward_one(scope, receive, responder, body, provider, name, rest, hops)
                self._mark_up(provider.peer)
                return
            except _ConnectFailed as exc:
                reasons.append(f"{_short(provider.peer)}: {exc}")
            except _RetryableAnswer as exc:  # the provider's backend is down: it did nothing with the request
                reasons.append(f"{_short(provider.peer)}: {exc}")
            except UpstreamError as exc:
                if exc.response_started:
                    raise ProviderFailed(f"provider {provider.peer} failed mid-response: {exc}") from None
                reached = True
                reasons.append(f"{_short(provider.peer)}: {exc}")
            self._mark_down(provider.peer)
            self.metrics.count_forward("service", "retry" if attempt == 0 else "failed")
            log.info("provider failed before answering %s", logfmt.kv(service=name, peer=_short(provider.peer), reason=reasons[-1], retry=attempt == 0 and body.replayable))
            if not body.replayable:
                break
        # The reasons are in the log above; the client learns which providers were tried, not what
        # their addresses answered.
        which = f" (tried {', '.join(_short(p) for p in sorted(tried))})" if tried else ""
        if reached:
            raise ProviderFailed(f"provider(s) of '{name}' failed before answering{which}", code="provider_failed")
        raise NoProviderAvailable(f"{len(candidates)} provider(s) of '{name}' match this request but none is reachable and healthy right now{which}", retry_after=5)

    def _connected(self, peer: str) -> bool:
        host = self.node.host
        return host is not None and host.is_connected(self._peer_id(peer))

    async def _forward_one(self, scope: dict, receive: Receive, responder: Responder, body: RequestBody, provider: routing.Provider, name: str, rest: bytes, hops: int) -> None:
        node_header = [(COMPUTING_NODE_HEADER, provider.peer.encode())]
        self.metrics.enter(provider.peer)
        try:
            if provider.local:
                target = self.node.services.lookup(name)
                if target is None:
                    raise _ConnectFailed(f"service '{name}' is no longer registered here")
                if not hasattr(target, "port"):
                    await body.read_all()  # bounded by max_body_size; internal services get small bodies
                    await self._internal(scope, body.replay_receive(receive), responder, _join(target.path_prefix, rest), node_header)
                    return
                try:
                    cm = self._backend_exchange(target, scope, body, rest)
                    response = await cm.__aenter__()
                except ProviderFailed as exc:
                    if exc.code == "backend_unreachable":
                        raise _ConnectFailed(exc.message) from None
                    raise
                async with _entered(cm, response):
                    await responder.relay(response, node_header)
                return
            upstream = b"/v1/_service/" + name.encode() + b"/" + rest + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
            async with self._peer_exchange(provider.peer, scope, body, upstream, hops, kind="service") as response:
                if response.status in (502, 503) and response.header(ERROR_CODE_NAME) in RETRYABLE_CODES and body.replayable:
                    await response.read(limit=1 << 16)
                    raise _RetryableAnswer(f"its backend is unreachable ({response.status})")
                await responder.relay(response, node_header)
        finally:
            self.metrics.leave(provider.peer)

    # --- GET /v1/service/llm/v1/models: the network's models ----------------------------

    async def _models(self, responder: Responder, providers: list[routing.Provider], model_id: str) -> None:
        now = time.monotonic()
        by_model: dict[str, list[str]] = {}
        for provider in providers:
            if not (provider.healthy and provider.online):
                continue
            if not provider.local and self._down.get(provider.peer, (0.0, 0.0))[0] > now:
                continue
            for value in routing.identity_values([provider], "model"):
                by_model.setdefault(value, []).append(provider.peer)
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "ocf", "providers": sorted(peers)}
            for model, peers in sorted(by_model.items())
        ]
        if model_id:
            from urllib.parse import unquote

            model_id = unquote(model_id)
            for item in data:
                if item["id"] == model_id:
                    await responder.json(200, item)
                    return
            raise NotFound(f"no provider serves model '{model_id}' (available: {', '.join(by_model) or 'none'})", code="model_not_found")
        await responder.json(200, {"object": "list", "data": data})

    def close(self) -> None:
        self.pool.close()
        self.peer_streams.close()


class _RetryableAnswer(Exception):
    """The provider answered with one of our own "did nothing" errors; another may do better."""


class _entered:
    """``async with`` for a context manager whose ``__aenter__`` the caller already awaited."""

    def __init__(self, cm: Any, value: Any) -> None:
        self.cm, self.value = cm, value

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc_info: Any) -> bool:
        return bool(await self.cm.__aexit__(*exc_info))


class _BackendExchange:
    """``async with``: one exchange with a local backend over a pooled keep-alive connection."""

    def __init__(self, fwd: Forwarder, target: Any, scope: dict, body: RequestBody, rest: bytes) -> None:
        self.fwd, self.target, self.scope, self.body, self.rest = fwd, target, scope, body, rest
        self._cm: Any = None
        self._conn: Any = None
        self._t0 = 0.0

    async def __aenter__(self) -> Response:
        fwd, target, scope, body = self.fwd, self.target, self.scope, self.body
        path = b"/" + self.rest + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
        # The client's credentials were for the entry gateway; the backend gets its own key, if any.
        headers = [(k, v) for k, v in strip_credentials(scope["headers"]) if k not in (HOPS_HEADER, IDENTITY_HEADER)]
        api_key = getattr(target, "api_key", None)
        if api_key:
            headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
        hostport = f"{target.host}:{target.port}".encode()
        self._t0 = time.perf_counter()
        for attempt in range(2):
            try:
                conn = await fwd.pool.connect(target.host, target.port)
            except (OSError, trio.TooSlowError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise ProviderFailed(
                    f"service '{target.name}' at {target.host}:{target.port} is unreachable: {reason}", code="backend_unreachable"
                ) from None
            source = body.source()
            cm = exchange(conn.stream, scope["method"].encode(), path, headers, source, bridge=conn.bridge, content_length=None if body.replayable else body.content_length, host=hostport)
            try:
                response = await cm.__aenter__()
            except UpstreamError as exc:
                fwd.pool.discard(conn)
                if conn.reused and not exc.response_started and body.replayable and attempt == 0:
                    continue  # the server had closed that idle connection; a fresh one will do
                raise ProviderFailed(f"service '{target.name}' at {target.host}:{target.port} failed: {exc}", code="backend_failed") from None
            except BaseException:
                fwd.pool.discard(conn)
                raise
            self._cm, self._conn = cm, conn
            fwd.metrics.observe_latency("backend", time.perf_counter() - self._t0)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            suppress = await self._cm.__aexit__(*exc_info)
        except BaseException:
            self.fwd.pool.discard(self._conn)
            raise
        if exc_info[0] is None:
            self.fwd.pool.release(self._conn)
            self.fwd.metrics.count_forward("backend", "ok")
        else:
            self.fwd.pool.discard(self._conn)
        return bool(suppress)


class PeerStreams:
    """Idle keep-alive ``/libp2p-http`` streams per peer, so a request skips opening and negotiating one.

    The far side (:func:`ocf.httpstream.server.serve_stream`) serves
    requests one after another on a stream and drops it after 75 s idle; we
    drop ours after :attr:`idle_timeout` (less). A pooled stream is only used
    for requests whose body can be replayed, so a stream that died while idle
    costs a retry on a fresh one, never a lost request.
    """

    def __init__(self, *, idle_timeout: float = 30.0, max_idle_per_peer: int = 64) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self._idle: dict[str, list[tuple[Any, ClientBridge, float]]] = {}

    def take(self, peer: str) -> tuple[Any, ClientBridge] | None:
        stack = self._idle.get(peer)
        now = time.monotonic()
        while stack:
            stream, bridge, since = stack.pop()
            if now - since <= self.idle_timeout and _stream_looks_open(stream):
                return stream, bridge
            stream.reset()
        return None

    def put(self, peer: str, stream: Any, bridge: ClientBridge) -> None:
        bridge.next_cycle()
        stack = self._idle.setdefault(peer, [])
        if len(stack) >= self.max_idle_per_peer:
            stack.pop(0)[0].reset()
        stack.append((stream, bridge, time.monotonic()))

    def close(self) -> None:
        for stack in self._idle.values():
            for stream, _, _ in stack:
                stream.reset()
        self._idle.clear()


def _stream_looks_open(stream: Any) -> bool:
    """Neither reset nor half-closed by the peer, nothing unread (as far as the stream tells)."""
    return getattr(stream, "_reset", None) is None and not getattr(stream, "_eof", False) and not getattr(stream, "_chunks", None)


class _PeerExchange:
    """``async with``: one exchange with a peer's gateway over a ``/libp2p-http`` stream."""

    def __init__(self, fwd: Forwarder, peer: str, scope: dict, body: RequestBody, target: bytes, hops: int, kind: str) -> None:
        self.fwd, self.peer, self.scope, self.body, self.target, self.hops, self.kind = fwd, peer, scope, body, target, hops, kind
        self._cm: Any = None
        self._stream: Any = None
        self._bridge: ClientBridge | None = None

    async def __aenter__(self) -> Response:
        fwd, scope, body = self.fwd, self.scope, self.body
        t0 = time.perf_counter()
        # Never hand the client's credentials to another node: they were for this gateway.
        headers = [(k, v) for k, v in strip_credentials(scope["headers"]) if k != HOPS_HEADER]
        headers.append((HOPS_HEADER, str(self.hops + 1).encode()))
        for attempt in range(2):
            pooled = fwd.peer_streams.take(self.peer) if body.replayable and attempt == 0 else None
            if pooled is not None:
                stream, bridge = pooled
            else:
                stream, bridge = await fwd.open_peer_stream(self.peer), ClientBridge()
            cm = exchange(stream, scope["method"].encode(), self.target, headers, body.source(), bridge=bridge, content_length=None if body.replayable else body.content_length)
            try:
                response = await cm.__aenter__()
            except UpstreamError as exc:
                stream.reset()
                if pooled is not None and not exc.response_started:
                    continue  # that idle stream had died; the body is replayable, so use a fresh one
                raise
            except BaseException:
                stream.reset()
                raise
            self._cm, self._stream, self._bridge = cm, stream, bridge
            fwd.metrics.observe_latency(self.kind, time.perf_counter() - t0)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            suppress = await self._cm.__aexit__(*exc_info)
        except BaseException:
            self._stream.reset()
            raise
        if exc_info[0] is None and self._bridge is not None and self._bridge.reusable:
            self.fwd.metrics.count_forward(self.kind, "ok")
            self.fwd.peer_streams.put(self.peer, self._stream, self._bridge)
        else:
            self._stream.reset()
        return bool(suppress)


# --- small helpers ---------------------------------------------------------------------


def _join(prefix: str, rest: bytes) -> bytes:
    """``/v1/jobs`` + ``b"x/y"`` -> ``b"/v1/jobs/x/y"``; an empty rest names the prefix itself."""
    return prefix.encode() + (b"/" + rest if rest else b"")


def _hops(scope: dict) -> int:
    value = get_header(scope["headers"], HOPS_HEADER)
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def _parse_json(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            "the request body is not JSON, so it names no model; send JSON or an X-OCF-Identity-Group: key=value header",
            code="no_routable_identity",
        ) from None


def _still_listed(entry: dict) -> bool:
    """Neither stale (unseen for ``--stale-after``) nor departed: routing still counts it as a provider."""
    return not entry.get("stale") and str(entry.get("status") or "").lower() not in routing.GONE_ENTRY_STATUSES


def _short(peer: str) -> str:
    return "…" + peer[-6:]
