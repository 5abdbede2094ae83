"""The client's side of a raw ASGI request: its body in, the response out.

:class:`RequestBody` reads the body from ASGI ``receive`` only as fast as
the upstream takes it (or buffers a small one so it can be replayed to a
second provider); :class:`Responder` wraps ASGI ``send`` and relays an
upstream response chunk by chunk. The gateway's forwarder and the tracker's
hot routes share them, which is why they live below both: the tracker must
not import the gateway to answer a request.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from ..errors import BadRequest, BridgeError, PayloadTooLarge
from ..httpstream.bridge import body_length, forwardable, get_header
from ..httpstream.client import Response

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The HTTP client disconnected; nothing more to send anyone.

    Raised by :class:`RequestBody` when ``receive`` says ``http.disconnect``;
    a route catches it to stop quietly (there is nobody to answer).
    """


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
            raise ClientGone()
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

    ``extra`` (CORS) comes from the gateway's ASGI layer, which leaves
    adding it to us rather than wrapping ``send`` once more.
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
