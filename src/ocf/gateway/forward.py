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

This module is the orchestration: which family, limits, timeouts, retry.
The pieces are elsewhere: the client's side in :mod:`ocf.web.asgi`,
provider choice in :mod:`ocf.gateway.routing` (pure functions) fed by
:mod:`ocf.gateway.providers` (table snapshot, liveness, peer streams), the
exchange with the next hop in :mod:`ocf.gateway.exchange`, and the models
list in :mod:`ocf.gateway.models`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING
from collections.abc import Awaitable, Callable, Sequence

import trio

from .. import log as logfmt
from ..errors import (
    ForwardTimeout,
    GatewayRequestError,
    LoopDetected,
    NoProviderAvailable,
    NotFound,
    ProviderFailed,
    UpstreamError,
)
from ..httpstream.pool import ConnectionPool
from ..ports import LLM_SERVICE, InternalService, LoadBoard, LocalService
from . import routeindex, routing
from ..web.asgi import ClientGone, Receive, RequestBody, Responder, Send
from ..web.errors import ERROR_CODE_NAME, send_asgi_error
from .exchange import (
    HOPS_HEADER,
    IDENTITY_HEADER,
    BackendUpstream,
    Exchange,
    PeerUpstream,
    backend_headers,
    entered,
    peer_headers,
    peer_stream_pool,
)
from .models import serve_models
from .call import Call, hops_of, join, parse_json
from .failures import Attempts, p2p_error
from .providers import LIBP2P_HTTP, ConnectFailed, Providers, short
from .router import OWN_SERVICE, P2P

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import PeerId
    from ..ports import LocalServices
    from .metrics import GatewayMetrics
    from .router import Route

__all__ = ["LIBP2P_HTTP", "Forwarder"]

log = logging.getLogger("ocf.gateway")

COMPUTING_NODE_HEADER = b"x-computing-node"
MAX_HOPS = 8
#: Error codes of ours that mean "the provider did nothing with the request": safe to try another.
RETRYABLE_CODES = frozenset({b"backend_unreachable"})
#: Bodies up to this size (with a declared length) are read before forwarding: cheaper and replayable.
SMALL_BODY = 64 * 1024


class _RetryableAnswer(Exception):
    """The provider answered with one of our own "did nothing" errors; another may do better."""


class Forwarder:
    """Serves the three forwarding route families for one node's gateway."""

    def __init__(
        self,
        config: Config,
        peer_id: PeerId,
        providers: Providers,
        services: LocalServices | None,
        metrics: GatewayMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.services = services
        self.metrics = metrics
        self.pool = ConnectionPool()
        self.peer_streams = peer_stream_pool()
        self.providers = providers
        self.rng = rng or random.Random()
        #: Serves a target of this node in-process (set by :class:`ocf.gateway.asgi.GatewayASGI`).
        self.dispatch_internal: Callable[[dict, Receive, Send, bytes], Awaitable[None]] | None = None
        self.in_flight = metrics.in_flight  # provider -> requests in flight from here (counted by metrics.enter/leave)
        self._serving = 0  # requests our own backends are serving: published as our load through membership
        self.load_board: LoadBoard | None = None  # membership, when the node runs it (see use_load_board)

    def use_load_board(self, board: LoadBoard | None) -> None:
        """Publish our load and weigh providers by theirs through ``board`` (membership).

        Membership reads ``_serving`` when it wakes rather than being told on
        every request: a request then costs one addition each way, not a call
        into membership.
        """
        self.load_board = board
        if board is not None:
            board.load_from(lambda: self._serving)

    # --- entry point ------------------------------------------------------------------

    async def __call__(
        self, route: Route, scope: dict, receive: Receive, send: Send, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> int:
        """Serve one forwarding request; ``extra`` headers go on the response. Returns its status (0: none sent)."""
        responder = Responder(send, extra)
        try:
            await self._dispatch(route, scope, receive, responder)
        except GatewayRequestError as exc:
            await self._fail(responder, exc, scope)
        except ClientGone:
            log.debug("client went away %s", logfmt.kv(path=scope["path"]))
        return responder.status

    async def _fail(self, responder: Responder, exc: GatewayRequestError, scope: dict) -> None:
        if responder.started:
            # Too late for a status code: end the response early; the client sees it cut short.
            log.warning("forward aborted mid-response %s", logfmt.kv(path=scope["path"], reason=exc.message))
            return
        if exc.status >= 500:
            log.warning(
                "forward failed %s", logfmt.kv(path=scope["path"], status=exc.status, code=exc.code, reason=exc.message)
            )
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):  # the client is gone
            await send_asgi_error(responder, exc)

    async def _dispatch(self, route: Route, scope: dict, receive: Receive, responder: Responder) -> None:
        hops = hops_of(scope)
        if hops >= MAX_HOPS:
            raise LoopDetected(f"request crossed {hops} gateways; refusing to forward it again")
        call = Call(scope, receive, responder, hops)
        if route.family == P2P:
            await self._p2p(call, route.peer, route.rest)
        elif route.family == OWN_SERVICE:
            await self._local(call, route.service, route.rest)
        else:
            await self._service(call, route.service, route.rest)

    async def _guarded(self, call: Call, work: Callable[[RequestBody], Awaitable[None]]) -> None:
        """Run ``work`` under the request timeout, cancelled if the client leaves.

        The server (:func:`ocf.httpstream.server.serve_stream`, on the TCP
        port and on peer streams alike) cancels the call itself when the
        client leaves, so no task here needs to watch ``receive()``.
        Small bodies with a declared length are read up front: they cost no
        body-pump task later and can be replayed to a second provider.
        """
        body = RequestBody(call.receive, call.scope, self.config.max_body_size)
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

    async def _local(self, call: Call, name: str, rest: bytes) -> None:
        services = self.services
        target = services.lookup(name) if services is not None else None
        if target is None:
            names = services.names() if services is not None else []
            raise NotFound(
                f"this node offers no service '{name}' (it offers: {', '.join(names) or 'none'})",
                code="service_not_found",
            )
        if isinstance(target, InternalService):  # served by our own app under its prefix
            await self._internal(call.scope, call.receive, call.responder, join(target.path_prefix, rest), [])
            return

        async def work(body: RequestBody) -> None:
            self._serving += 1
            try:
                async with self._backend_exchange(call, target, body, rest) as response:
                    await call.responder.relay(response)
            finally:
                self._serving -= 1

        await self._guarded(call, work)

    def _backend_exchange(self, call: Call, target: LocalService, body: RequestBody, rest: bytes) -> Exchange:
        upstream = BackendUpstream(self.pool, self.metrics, target)
        return Exchange(
            upstream,
            call.scope["method"].encode(),
            b"/" + rest + call.query(),
            backend_headers(call.scope, target),
            body,
        )

    async def _internal(
        self, scope: dict, receive: Receive, send: Send, path: bytes, extra: list[tuple[bytes, bytes]]
    ) -> None:
        """Serve ``path`` of this node in-process (no HTTP hop), routed and checked like any request."""
        assert self.dispatch_internal is not None
        inner = dict(scope)
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k != HOPS_HEADER] + [
            (HOPS_HEADER, str(hops_of(scope) + 1).encode())
        ]

        async def add_headers(message: dict) -> None:
            if message["type"] == "http.response.start" and extra:
                message = dict(message, headers=list(message.get("headers", [])) + list(extra))
            await send(message)

        await self.dispatch_internal(inner, receive, add_headers, path)

    # --- /v1/p2p/<peer>/<path>: another peer's gateway ----------------------------------

    async def _p2p(self, call: Call, peer_text: str, rest: bytes) -> None:
        peer = self.providers.peer_id(peer_text)
        if peer == self.peer_id:
            await self._internal(call.scope, call.receive, call.responder, b"/" + rest, [])
            return
        if not self.providers.known(peer, peer_text):
            # Before any per-peer state: made-up peer IDs must not grow the in-flight series on /metrics.
            raise NotFound(f"peer {peer_text} is not connected and not in the node table", code="peer_not_found")
        target = b"/" + rest + call.query()

        async def work(body: RequestBody) -> None:
            limit = self.config.max_forwards_per_peer
            if self.in_flight.get(peer_text, 0) >= limit:
                raise NoProviderAvailable(
                    f"peer {peer_text} already has {limit} requests in flight from this node",
                    retry_after=1,
                    code="peer_busy",
                )
            self.metrics.enter(peer_text)
            try:
                async with self._peer_exchange(call, peer_text, body, target, kind="p2p") as response:
                    await call.responder.relay(response)
            except (ConnectFailed, UpstreamError) as exc:
                raise p2p_error(peer_text, exc, self.providers.relay_limit(peer_text)) from None
            finally:
                self.metrics.leave(peer_text)

        await self._guarded(call, work)

    def _peer_exchange(self, call: Call, peer_text: str, body: RequestBody, target: bytes, *, kind: str) -> Exchange:
        upstream = PeerUpstream(self.peer_streams, self.metrics, self.providers.open_stream, peer_text, kind)
        return Exchange(upstream, call.scope["method"].encode(), target, peer_headers(call.scope, call.hops), body)

    def usable(self, provider: routing.Provider, now: float) -> bool:
        return self.providers.usable(provider, now)

    def _weigh(self, provider: routing.Provider) -> float:
        """Its measured RTT, and requests we have in flight to it plus what it publishes it is serving (load)."""
        load = self.in_flight.get(provider.peer, 0)
        if provider.local:
            return routeindex.weight(True, 0.0, load)
        if self.load_board is not None:
            load += self.load_board.load(self.providers.peer_id(provider.peer))
        return routeindex.weight(True, self.providers.rtt(provider.peer), load)

    # --- /v1/service/<name>/<path>: any provider in the network --------------------------

    async def _service(self, call: Call, name: str, rest: bytes) -> None:
        scope = call.scope
        entries = self.providers.entries()
        providers, keys = self.providers.route(entries, name)
        if (
            scope["method"] == "GET"
            and name == LLM_SERVICE
            and (rest in (b"v1/models", b"v1/models/") or rest.startswith(b"v1/models/"))
        ):
            await serve_models(
                call.responder,
                providers,
                rest[len(b"v1/models") :].strip(b"/").decode("latin-1"),
                self.providers.is_down,
            )
            return

        async def work(body: RequestBody) -> None:
            identity = routing.identity_from_headers(
                v.decode("latin-1") for k, v in scope["headers"] if k == IDENTITY_HEADER
            )
            if not identity and keys and body.has_body:
                identity = routing.identity_from_json(parse_json(await body.read_all()), keys)
            candidates = routing.select(
                providers,
                identity,
                service=name,
                known=lambda: routing.known_services(entries),
                has_body=body.has_body,
                keys=keys,
            )
            await self._forward_any(call, body, name, rest, candidates)

        await self._guarded(call, work)

    async def _forward_any(
        self, call: Call, body: RequestBody, name: str, rest: bytes, candidates: list[routing.Provider]
    ) -> None:
        """Forward to the best provider; once more to another if nothing reached the first.

        Providers we have a live connection to (or this node) come first;
        ones the table lists but we would have to dial only if none is
        connected. What the failures mean for the client's status is
        :mod:`ocf.gateway.failures`.
        """
        attempts = Attempts(name)
        limit = self.config.max_forwards_per_peer
        providers = self.providers
        for attempt in range(2):
            now = time.monotonic()
            usable = [p for p in candidates if p.peer not in attempts.tried and providers.usable(p, now)]
            if not usable:
                break
            connected = [p for p in usable if p.local or providers.connected(p.peer)]
            pool = [p for p in (connected or usable) if self.in_flight.get(p.peer, 0) < limit]
            if not pool:
                raise NoProviderAvailable(
                    f"all {len(usable)} provider(s) of '{name}' are at their limit of {limit} concurrent requests",
                    retry_after=1,
                    code="providers_busy",
                )
            # One candidate needs no weighing (every one in the pool is usable).
            provider = pool[0] if len(pool) == 1 else routeindex.pick(pool, self._weigh, self.rng) or pool[0]
            attempts.tried.add(provider.peer)
            try:
                await self._forward_one(call, body, provider, name, rest)
                providers.mark_up(provider.peer)
                return
            except (ConnectFailed, _RetryableAnswer) as exc:  # nothing reached it, or its backend is down
                reason = attempts.failed(provider.peer, exc)
            except UpstreamError as exc:
                if exc.response_started:
                    raise ProviderFailed(f"provider {provider.peer} failed mid-response: {exc}") from None
                reason = attempts.failed(provider.peer, exc, providers.relay_limit(provider.peer))
            providers.mark_down(provider.peer)
            self.metrics.count_forward("service", "retry" if attempt == 0 else "failed")
            log.info(
                "provider failed before answering %s",
                logfmt.kv(
                    service=name, peer=short(provider.peer), reason=reason, retry=attempt == 0 and body.replayable
                ),
            )
            if not body.replayable:
                break
        raise attempts.error(len(candidates))

    async def _forward_one(
        self, call: Call, body: RequestBody, provider: routing.Provider, name: str, rest: bytes
    ) -> None:
        node_header = [(COMPUTING_NODE_HEADER, provider.peer.encode())]
        responder = call.responder
        self.metrics.enter(provider.peer)
        try:
            if provider.local:
                target = self.services.lookup(name) if self.services is not None else None
                if target is None:
                    raise ConnectFailed(f"service '{name}' is no longer registered here")
                if isinstance(target, InternalService):
                    await body.read_all()  # bounded by max_body_size; internal services get small bodies
                    await self._internal(
                        call.scope,
                        body.replay_receive(call.receive),
                        responder,
                        join(target.path_prefix, rest),
                        node_header,
                    )
                    return
                try:
                    cm = self._backend_exchange(call, target, body, rest)
                    response = await cm.__aenter__()
                except ProviderFailed as exc:
                    if exc.code == "backend_unreachable":
                        raise ConnectFailed(exc.message) from None
                    raise
                async with entered(cm, response):
                    await responder.relay(response, node_header)
                return
            upstream = b"/v1/_service/" + name.encode() + b"/" + rest + call.query()
            async with self._peer_exchange(call, provider.peer, body, upstream, kind="service") as response:
                if (
                    response.status in (502, 503)
                    and response.header(ERROR_CODE_NAME) in RETRYABLE_CODES
                    and body.replayable
                ):
                    await response.read(limit=1 << 16)
                    raise _RetryableAnswer(f"its backend is unreachable ({response.status})")
                await responder.relay(response, node_header)
        finally:
            self.metrics.leave(provider.peer)

    def close(self) -> None:
        self.pool.close()
        self.peer_streams.close()
