"""Trio driver for the client side: one HTTP/1.1 exchange on a byte stream.

The request body is pumped in a task of the exchange's own nursery while the
caller reads the response, so both directions stream at once (a server may
answer before it has read the whole body, and an SSE response starts long
before the request ends) and neither is ever held in memory whole: each
chunk is written before the next one is read, and transport flow control
pushes back on the source.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import trio

from ..errors import BridgeError, TransportError, UpstreamError, collapse_groups
from .bridge import END, ClientBridge, Data, Headers, ResponseHead, get_header

log = logging.getLogger("ocf.httpstream")

BodySource = bytes | AsyncIterable[bytes]

READ_SIZE = 64 * 1024
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, TransportError, OSError)


class Response:
    """The response of an exchange: head fields plus the body as an async iterator of chunks."""

    def __init__(self, head: ResponseHead, exchange: _Exchange) -> None:
        self.status = head.status
        self.headers: Headers = head.headers
        self.reason = head.reason
        self._exchange = exchange

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._exchange.body()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (for small answers: health checks, model lists, tests)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                raise BridgeError(f"response body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def whole_body(self) -> bytes | None:
        """The whole body if all of it has already arrived (with the head, say), else None.

        Small answers usually come in the same read as their head; taking
        them this way skips iterating (an async generator per response).
        """
        ex = self._exchange
        if ex.ended or not ex.bridge.response_complete:
            return None
        parts = []
        for event in ex.pending:
            if event is END:
                break
            if not isinstance(event, Data):
                return None
            parts.append(event.data)
        else:
            return None
        ex.pending.clear()
        ex.ended = True
        return b"".join(parts)

    @property
    def complete(self) -> bool:
        """True once every chunk of the body has been handed out (the end has been seen, nothing left)."""
        ex = self._exchange
        return ex.ended or (ex.bridge.response_complete and not any(isinstance(e, Data) for e in ex.pending))


class _Exchange:
    def __init__(self, stream: trio.abc.Stream, bridge: ClientBridge, read_size: int) -> None:
        self.stream = stream
        self.bridge = bridge
        self.read_size = read_size
        self.pending: collections.deque = collections.deque()
        self.ended = False
        self.send_failed: BaseException | None = None

    async def _receive_events(self) -> None:
        try:
            data = await self.stream.receive_some(self.read_size)
        except _STREAM_ERRORS as exc:
            raise UpstreamError(
                f"upstream failed: {exc or type(exc).__name__}", response_started=self.bridge.response_started
            ) from None
        try:
            self.pending.extend(self.bridge.feed(data))
        except BridgeError as exc:
            raise UpstreamError(str(exc), response_started=self.bridge.response_started) from None

    async def head(self) -> ResponseHead:
        while True:
            while self.pending:
                event = self.pending.popleft()
                if isinstance(event, ResponseHead):
                    return event
            await self._receive_events()

    async def body(self) -> AsyncIterator[bytes]:
        while not self.ended:
            while self.pending:
                event = self.pending.popleft()
                if isinstance(event, Data):
                    yield event.data
                elif event is END:
                    self.ended = True
                    return
            await self._receive_events()

    async def send(self, data: bytes) -> bool:
        if not data or self.send_failed is not None:
            return self.send_failed is None
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            # The server may have answered early and stopped reading; what it
            # said (or that it vanished) shows up on the receiving side.
            self.send_failed = exc
            log.debug("request body send stopped reason=%r", exc)
            return False
        return True

    async def pump(self, source: AsyncIterable[bytes]) -> None:
        async for chunk in source:
            if not await self.send(self.bridge.data(chunk)):
                return
        await self.send(self.bridge.end())


def exchange(
    stream: trio.abc.Stream,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: BodySource = b"",
    *,
    bridge: ClientBridge | None = None,
    content_length: int | None = None,
    host: bytes | None = None,
    read_size: int = READ_SIZE,
) -> contextlib.AbstractAsyncContextManager[Response]:
    """``async with exchange(...) as response``: send a request on ``stream``, get its :class:`Response`
    once the head arrived.

    ``body`` is bytes (sent with the head in one write) or an async iterable
    of chunks (streamed; give ``content_length`` if known, else chunked).
    Failures of the stream or malformed answers raise
    :class:`~ocf.errors.UpstreamError`. The stream stays the caller's: it is
    reusable afterwards iff ``bridge.reusable``.
    """
    ex = _Exchange(stream, bridge or ClientBridge(), read_size)
    if isinstance(body, (bytes, bytearray, memoryview)):
        return _WholeBodyExchange(ex, method, target, headers, bytes(body), host)
    return _streamed_exchange(ex, method, target, headers, body, content_length, host)


class _WholeBodyExchange:
    """The common case, a body already in memory: one write, no pump task, so no nursery either."""

    def __init__(
        self,
        ex: _Exchange,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        host: bytes | None,
    ) -> None:
        self.ex, self.method, self.target, self.headers, self.body, self.host = ex, method, target, headers, body, host

    async def __aenter__(self) -> Response:
        ex, bridge, body = self.ex, self.ex.bridge, self.body
        head = bridge.request(self.method, self.target, self.headers, content_length=len(body), host=self.host)
        if not await ex.send(head + bridge.data(body) + bridge.end()):
            # Nothing reached the server for sure; say so as an upstream failure.
            exc = ex.send_failed
            raise UpstreamError(f"cannot send request: {exc or type(exc).__name__}", response_started=False)
        return Response(await ex.head(), ex)

    async def __aexit__(self, *exc_info: object) -> bool:
        return False


@contextlib.asynccontextmanager
async def _streamed_exchange(
    ex: _Exchange,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: AsyncIterable[bytes],
    content_length: int | None,
    host: bytes | None,
) -> AsyncIterator[Response]:
    """A streamed body: a pump task sends it while the caller reads the response."""
    if not await ex.send(ex.bridge.request(method, target, headers, content_length=content_length, host=host)):
        raise UpstreamError(f"cannot send request: {ex.send_failed!r}", response_started=False)
    source_error: list[BaseException] = []
    with collapse_groups():
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                try:
                    await ex.pump(body)
                except Exception as exc:  # noqa: BLE001 - the source's error (too large, client gone) ends the exchange
                    source_error.append(exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            response = Response(await ex.head(), ex)
            yield response
            nursery.cancel_scope.cancel()  # the server answered without reading all of the body
    if source_error:
        raise source_error[0]
