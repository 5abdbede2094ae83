"""Trio driver for the server side: serve an ASGI app over one byte stream.

This is how a ``/libp2p-http`` stream from another peer reaches this node's
gateway. We call the gateway's ASGI app directly rather than relaying the
bytes to our own TCP port over a loopback socket: the request is parsed
once (here) instead of twice, no loopback connection or extra copy
through the kernel is needed, and disconnects map straight onto ASGI's
``http.disconnect``. The app cannot tell the difference except for the
scope's ``client`` (the remote peer ID) and ``extensions["ocf.remote_peer"]``.

Requests are served one after another (HTTP/1.1 keep-alive), each with
real backpressure: one reader task per connection parses ahead of the app
by at most one read of body, and a response chunk is written before the
app may send the next. When the client goes away (EOF or reset) before
the response is complete, the app call is cancelled: that is what cancels
the upstream request two hops away. The app need not watch ``receive()``
for ``http.disconnect`` itself (it still gets one if it asks). The
gateway's forwarding and job routes rely on that: both of the gateway's
doors are served here.

A response head with a ``Content-Length`` is held back until the body's
first bytes and written with them: one write instead of two, so the client
(often another gateway, in another process) wakes once per response. A head
without one (a stream of events) goes out at once.

The gateway's TCP port is served the same way, by
:func:`ocf.httpstream.listener.serve_http`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
from typing import Any
from collections.abc import Awaitable, Callable

import trio

from ..errors import BridgeError, TransportError
from . import watchdog
from .admission import Draining
from .bridge import (
    CLOSED,
    DEFAULT_MAX_HEADER_SIZE,
    END,
    PHASE_BODY,
    PHASE_HEAD,
    Data,
    RequestHead,
    ServerBridge,
    ServerEvent,
    asgi_scope,
)
from .deadlines import ConnectionClock, Timeouts

log = logging.getLogger("ocf.httpstream")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

READ_SIZE = 64 * 1024
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, TransportError, OSError)


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class _Gone(Exception):
    """The client went away (EOF, reset, broken stream)."""


class _Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        app: ASGIApp,
        scope_extra: dict[str, Any],
        max_header_size: int,
        idle_timeout: float,
        draining: Draining | None = None,
        date_header: bool = False,
        timeouts: Timeouts | None = None,
        single_request: bool = False,
    ) -> None:
        self.stream = stream
        self.single_request = single_request
        self.draining = draining
        self.app = app
        self.scope_extra = scope_extra
        self.bridge = ServerBridge(max_header_size=max_header_size, date_header=date_header)
        self.max_header_size = max_header_size
        self.idle_timeout = idle_timeout
        self.clock = ConnectionClock(timeouts or Timeouts(), trio.current_time())
        self.events: collections.deque[ServerEvent] = collections.deque()
        self.gone = False
        self.error: BridgeError | None = None
        self._arrived = trio.Event()  # the reader parsed something (or the client went away)
        self._drained = trio.Event()  # the app took enough of what was parsed: the reader may read on
        self._drained.set()
        self._queued = 0  # body bytes parsed but not taken by the app yet
        self._finish: trio.Event | None = None  # current request: response done or client gone
        self._scope: trio.CancelScope | None = None  # the connection's: cancelled if the client leaves mid-response
        self._response_complete = True
        self._idle_since: float | None = None  # when the connection began waiting for a request (None: busy)
        self._ended_idle = False  # idle too long, or the server is shutting down: take no more requests

    # --- the one reader per connection --------------------------------------------------

    async def reader(self) -> None:
        """Read and parse ahead of the app, at most one read's worth of body (backpressure).

        A request that arrived whole leaves the reader free to wait for more
        bytes at once (that is how a client leaving mid-response is noticed),
        without a wake-up per request to say the app took it.
        """
        bridge, clock, limit = self.bridge, self.clock, self.max_header_size
        try:
            while True:
                if self._queued > READ_SIZE or bridge.buffered > limit:
                    clock.pause(trio.current_time())
                    while self._queued > READ_SIZE or bridge.buffered > limit:
                        await self._drained.wait()
                        self._drained = trio.Event()
                    clock.resume(trio.current_time())
                data = await self.stream.receive_some(READ_SIZE)
                try:
                    events = bridge.feed(data)
                    for event in events:
                        if type(event) is Data:
                            self._queued += len(event.data)
                    self.events.extend(events)
                except BridgeError as exc:
                    if not data:
                        self._client_gone()
                    else:
                        self._refuse(exc)
                    return
                if not data:
                    self._client_gone()
                    return
                phase = bridge.receive_phase
                if phase in (PHASE_HEAD, PHASE_BODY):  # a request whole in one read needs no clock
                    clock.received(
                        trio.current_time(), len(data), phase, phase == PHASE_BODY and bridge.expects_continue
                    )
                self._arrived.set()
        except _STREAM_ERRORS:
            self._client_gone()

    def _refuse(self, exc: BridgeError) -> None:
        """The client's bytes broke the protocol (or its time ran out): answer it if that can still be done.

        Whoever waits for the next event (the request loop, or the app in
        ``receive()``) raises ``exc`` and writes the error response; once a
        response has started there is nothing to tell the client, so the
        connection just ends.
        """
        self.error = exc
        if self.bridge.response_started:
            self._client_gone()
        else:
            self._arrived.set()

    def _client_gone(self) -> None:
        self.gone = True
        self._arrived.set()
        if self._finish is not None:
            self._finish.set()
        if not self._response_complete and self._scope is not None:
            self._scope.cancel()  # nobody will read the answer: stop producing it (and whatever is upstream)

    def end_idle(self) -> None:
        """Take no more requests if none is in progress (idle timeout, server shutdown)."""
        if self._idle_since is not None:
            self._ended_idle = True
            self._arrived.set()

    def _skip_parsed_body(self) -> bool:
        """Drop a request body the app did not read, if all of it is already here (a GET's empty one always is)."""
        events = self.events
        while events and isinstance(first := events[0], Data):
            events.popleft()
            self._queued -= len(first.data)
        if events and events[0] is END:
            events.popleft()
            if not events:
                self._drained.set()
            return True
        return False

    async def _next_event(self, *, idle: bool = False) -> ServerEvent | None:
        """The next parsed event, waiting for the reader; None if ``idle`` and the connection idled out.

        An error (malformed bytes, a deadline passed) wins over events
        parsed before it: the request it belongs to is refused whole, even
        if its head completed just as its deadline passed.
        """
        if self.error is not None:
            raise self.error
        while not self.events:
            if self.error is not None:
                raise self.error
            if self.gone:
                raise _Gone()
            if idle and self._ended_idle:
                return None
            self._drained.set()
            await self._arrived.wait()
            self._arrived = trio.Event()
        event = self.events.popleft()
        if type(event) is Data:
            self._queued -= len(event.data)
            if self._queued <= READ_SIZE:
                self._drained.set()
        return event

    # --- requests -------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        clock = self.clock
        clock.writing = True
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS:
            self._client_gone()
            raise _Gone() from None
        finally:
            clock.writing = False
            clock.writes += 1

    async def next_head(self) -> RequestHead | None:
        """The next request's head; None when the client is done or the connection idled out."""
        draining = self.draining
        if draining is not None and draining.draining and not self.events:
            return None  # shutting down: no new requests on an idle connection
        self._idle_since = trio.current_time()
        if draining is not None:
            draining._idle[self] = None
        try:
            while True:
                event = await self._next_event(idle=True)
                if event is None or event is CLOSED:
                    return None  # idle too long, the server is shutting down, or the client closed
                if type(event) is RequestHead:
                    return event
        finally:
            self._idle_since = None
            if draining is not None:
                draining._idle.pop(self, None)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self.reader)
            nursery.start_soon(watchdog.watch, self)
            try:
                await self._serve_requests()
            finally:
                self._scope = None
                nursery.cancel_scope.cancel()

    async def _serve_requests(self) -> None:
        while True:
            try:
                head = await self.next_head()
            except _Gone:
                return
            except BridgeError as exc:
                await self._reject_error(exc)
                return
            if head is None:
                return
            try:
                scope = asgi_scope(head, **self.scope_extra)
            except BridgeError as exc:
                await self._reject_error(exc)
                return
            keep = await self.run_app(scope)
            if not keep or self.single_request or not self.bridge.next_cycle():
                return
            if self.draining is not None and self.draining.draining:
                return
            buffered = self.bridge.buffered
            self.clock.next_cycle(trio.current_time() if buffered else 0.0, buffered)
            try:
                self.events.extend(self.bridge.events())  # a pipelined request already received
            except BridgeError as exc:
                await self._reject_error(exc)
                return
            self._drained.set()

    async def _reject_error(self, exc: BridgeError) -> None:
        await self._reject(getattr(exc, "status", 400), str(exc), getattr(exc, "code", "bad_request"))

    async def _reject(self, status: int, message: str, code: str) -> None:
        log.debug("rejecting stream request status=%d reason=%s", status, message)
        if self.draining is not None:
            self.draining.refusals[f"{status} {code}"] += 1
        with contextlib.suppress(_Gone, BridgeError):
            await self._write(self.bridge.error_response(status, _error_body(status, message, code)))

    async def run_app(self, scope: dict) -> bool:
        """Run the app for one request; True if the connection can serve another."""
        request_done = False
        finish = self._finish = trio.Event()
        self._response_complete = False
        body_error: BaseException | None = None

        async def receive() -> dict:
            nonlocal request_done, body_error
            if not request_done and not self.gone:
                try:
                    if self.bridge.expects_continue:
                        await self._write(self.bridge.continue_())
                        self.clock.continued(trio.current_time())
                    event = await self._next_event()
                    if isinstance(event, Data):
                        return {"type": "http.request", "body": event.data, "more_body": True}
                    if event is END:
                        request_done = True
                        return {"type": "http.request", "body": b"", "more_body": False}
                    body_error = BridgeError(f"unexpected {event!r} in a request body")
                except _Gone:
                    pass
                except BridgeError as exc:
                    body_error = exc
                    if not self.bridge.response_started and not self.gone:
                        await self._reject_error(exc)  # a malformed, stalled or trickling body: say why, then end
                self._client_gone()
            # Body finished (or the client left): "disconnect" once the client goes or the response is done.
            await finish.wait()
            return {"type": "http.disconnect"}

        held = b""  # a response head waiting to go out with the first body bytes
        head_only = scope["method"] == "HEAD"

        async def send(message: dict) -> None:
            nonlocal held
            if self.gone:
                return  # ASGI: sending after disconnect is a no-op
            kind = message["type"]
            try:
                if kind == "http.response.start":
                    headers = [
                        (bytes(k), bytes(v)) for k, v in message.get("headers", [])
                    ]  # respond() lower-cases the names
                    # Answering before the whole request arrived (e.g. 413 for a body
                    # too large): the rest cannot be skipped reliably, so this is the
                    # connection's last response, and the client must hear it.
                    unfinished = not self.bridge.request_complete
                    last = (
                        unfinished or self.single_request or (self.draining is not None and self.draining.draining)
                    )  # shutting down
                    head = self.bridge.respond(int(message["status"]), headers, close=last)
                    if self.bridge.response_length is not None:
                        held = head  # the body follows at once: one write, one wake-up of the client
                    else:
                        await self._write(head)  # a stream (SSE): the client may want the head before any event
                elif kind == "http.response.body":
                    # A HEAD response has no body, whatever the app sends (ASGI lets it send one).
                    data = self.bridge.data(b"" if head_only else bytes(message.get("body", b"")))
                    if not message.get("more_body", False):
                        data += self.bridge.end()
                        self._response_complete = True
                    if held:
                        data, held = held + data, b""
                    await self._write(data)
                    if self._response_complete:
                        finish.set()
            except _Gone:
                return

        try:
            await self.app(scope, receive, send)  # cancelled with the connection if the client leaves mid-response
        except Exception as exc:  # noqa: BLE001 - one bad request must not take down the stream handler's peers
            log.error("ASGI app failed on a stream request path=%s exc=%r", scope.get("path"), exc, exc_info=True)
            if not self.bridge.response_started and not self.gone:
                await self._reject(500, "internal error", "internal_error")
            return False
        finally:
            self._finish = None
        if body_error is not None:
            log.debug("stream request body was malformed: %s", body_error)
            return False
        if not self.bridge.response_complete:
            if not self.bridge.response_started and not self.gone:
                await self._reject(500, "the application sent no response", "internal_error")
            return False
        if not request_done and not self._skip_parsed_body():
            return False  # unread body left on the stream: cannot find the next request
        return not self.gone


async def serve_stream(
    stream: trio.abc.Stream,
    app: ASGIApp,
    *,
    client: tuple[str, int] | None = None,
    server: tuple[str, int] | None = None,
    extensions: dict | None = None,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    idle_timeout: float = 75.0,
    draining: Draining | None = None,
    date_header: bool = False,
    timeouts: Timeouts | None = None,
    single_request: bool = False,
) -> None:
    """Serve HTTP/1.1 requests arriving on ``stream`` with ``app`` until the client is done.

    Returns when the client closes, after ``idle_timeout`` seconds without a
    request, or after an exchange that leaves the connection unusable; the
    caller closes the stream. ``draining`` lets a server end the connection
    gently at shutdown; ``date_header`` adds ``Date`` to responses that have
    none, as an origin server should (a peer's stream is not one: the
    gateway that faces the client adds it). ``timeouts`` bound the head,
    the body and each write (:class:`~ocf.httpstream.deadlines.Timeouts`);
    ``single_request`` closes the connection after its first response.
    """
    conn = _Connection(
        stream,
        app,
        {"client": client, "server": server, "extensions": extensions},
        max_header_size,
        idle_timeout,
        draining,
        date_header,
        timeouts,
        single_request,
    )
    await conn.serve()
