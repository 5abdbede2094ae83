"""Trio driver for the server side: serve an ASGI app over one byte stream.

This is how a ``/libp2p-http`` stream from another peer reaches this node's
gateway. We call the gateway's ASGI app directly rather than relaying the
bytes to our own Hypercorn over a loopback socket: the request is parsed
once (here, by h11) instead of twice, no loopback connection or extra copy
through the kernel is needed, and disconnects map straight onto ASGI's
``http.disconnect``. The app cannot tell the difference except for the
scope's ``client`` (the remote peer ID) and ``extensions["ocf.remote_peer"]``.

Requests are served one after another (HTTP/1.1 keep-alive), each with
real backpressure: the body is read from the stream only when the app asks
for it, and a response chunk is written before the app may send the next.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

import trio

from ..errors import BridgeError, TransportError
from .bridge import CLOSED, DEFAULT_MAX_HEADER_SIZE, END, Data, RequestHead, ServerBridge, asgi_scope

log = logging.getLogger("ocf.httpstream")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

READ_SIZE = 64 * 1024
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, TransportError, OSError)


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class _Gone(Exception):
    """The client went away (EOF mid-request, reset, broken stream)."""


class _Connection:
    def __init__(self, stream: trio.abc.Stream, app: ASGIApp, scope_extra: dict[str, Any], max_header_size: int, idle_timeout: float) -> None:
        self.stream = stream
        self.app = app
        self.scope_extra = scope_extra
        self.bridge = ServerBridge(max_header_size=max_header_size)
        self.idle_timeout = idle_timeout
        self.events: list = []
        self.gone = False
        self.send_lock = trio.Lock()

    async def _read(self) -> None:
        """Read once and parse; raises _Gone when the client disappeared."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except _STREAM_ERRORS:
            self.gone = True
            raise _Gone() from None
        try:
            self.events.extend(self.bridge.feed(data))
        except BridgeError:
            if not data:  # EOF in the middle of a request: the client left
                self.gone = True
                raise _Gone() from None
            raise

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS:
            self.gone = True
            raise _Gone() from None

    async def next_head(self) -> RequestHead | None:
        with trio.move_on_after(self.idle_timeout):
            while True:
                while self.events:
                    event = self.events.pop(0)
                    if isinstance(event, RequestHead):
                        return event
                    if event is CLOSED:
                        return None
                await self._read()
        return None  # idle too long

    async def serve(self) -> None:
        while True:
            try:
                head = await self.next_head()
            except _Gone:
                return
            except BridgeError as exc:
                await self._reject(400, f"malformed HTTP request: {exc}", "bad_request")
                return
            if head is None:
                return
            try:
                scope = asgi_scope(head, **self.scope_extra)
            except BridgeError as exc:
                await self._reject(400, str(exc), "bad_request")
                return
            keep = await self.run_app(scope)
            if not keep or not self.bridge.next_cycle():
                return
            try:
                self.events.extend(self.bridge.events())  # a pipelined request already received
            except BridgeError as exc:
                await self._reject(400, f"malformed HTTP request: {exc}", "bad_request")
                return

    async def _reject(self, status: int, message: str, code: str) -> None:
        log.debug("rejecting stream request status=%d reason=%s", status, message)
        try:
            await self._write(self.bridge.error_response(status, _error_body(status, message, code)))
        except (_Gone, BridgeError):
            pass

    async def run_app(self, scope: dict) -> bool:
        """Run the app for one request; True if the connection can serve another."""
        request_done = False
        response_done = trio.Event()
        disconnect_sent = False
        body_error: BaseException | None = None

        async def receive() -> dict:
            nonlocal request_done, disconnect_sent, body_error
            if not request_done and not self.gone:
                try:
                    if self.bridge.expects_continue:
                        async with self.send_lock:
                            await self._write(self.bridge.continue_())
                    while True:
                        while self.events:
                            event = self.events.pop(0)
                            if isinstance(event, Data):
                                return {"type": "http.request", "body": event.data, "more_body": True}
                            if event is END:
                                request_done = True
                                return {"type": "http.request", "body": b"", "more_body": False}
                        if self.gone:
                            break
                        await self._read()
                except _Gone:
                    pass
                except BridgeError as exc:
                    body_error = exc
                    self.gone = True
            # Body finished (or the client left): wait for the client to go away or the response to end.
            if not self.gone and not disconnect_sent:
                await self._wait_gone(response_done)
            disconnect_sent = True
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            kind = message["type"]
            async with self.send_lock:
                if self.gone:
                    return  # ASGI: sending after disconnect is a no-op
                try:
                    if kind == "http.response.start":
                        headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
                        await self._write(self.bridge.respond(int(message["status"]), headers))
                    elif kind == "http.response.body":
                        await self._write(self.bridge.data(bytes(message.get("body", b""))))
                        if not message.get("more_body", False):
                            await self._write(self.bridge.end())
                            response_done.set()
                except _Gone:
                    return

        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take down the stream handler's peers
            log.error("ASGI app failed on a stream request path=%s exc=%r", scope.get("path"), exc, exc_info=True)
            if not self.bridge.response_started:
                await self._reject(500, "internal error", "internal_error")
            return False
        if body_error is not None:
            log.debug("stream request body was malformed: %s", body_error)
            return False
        if not self.bridge.response_complete:
            if not self.bridge.response_started and not self.gone:
                await self._reject(500, "the application sent no response", "internal_error")
            return False
        if not request_done:
            return False  # unread body left on the stream: cannot find the next request
        return not self.gone

    async def _wait_gone(self, response_done: trio.Event) -> None:
        """Block until the client disconnects or the response has been fully sent.

        Data that arrives meanwhile (a pipelined next request) stays parsed
        in the bridge for the next cycle.
        """
        if response_done.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                try:
                    while not self.gone and self.bridge.buffered <= DEFAULT_MAX_HEADER_SIZE:
                        data = await self.stream.receive_some(READ_SIZE)
                        if not data:
                            self.gone = True
                            break
                        self.bridge.feed(data)  # paused after the request: kept for the next cycle
                    else:
                        return  # pipelining this much is abuse: stop reading, let the response finish
                except (BridgeError, *_STREAM_ERRORS):
                    self.gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await response_done.wait()
            nursery.cancel_scope.cancel()


async def serve_stream(
    stream: trio.abc.Stream,
    app: ASGIApp,
    *,
    client: tuple[str, int] | None = None,
    extensions: dict | None = None,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    idle_timeout: float = 75.0,
) -> None:
    """Serve HTTP/1.1 requests arriving on ``stream`` with ``app`` until the client is done.

    Returns when the client closes, after ``idle_timeout`` seconds without a
    request, or after an exchange that leaves the connection unusable; the
    caller closes the stream.
    """
    conn = _Connection(stream, app, {"client": client, "extensions": extensions or {}}, max_header_size, idle_timeout)
    await conn.serve()
