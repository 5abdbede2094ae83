"""libp2p over WebSocket (``/ip4/x/tcp/P/ws``), via trio-websocket.

libp2p's WebSocket transport carries the ordinary libp2p byte stream
(multistream, Noise, yamux) inside binary WebSocket messages; message
boundaries mean nothing. :class:`WebSocketStream` adapts a
``trio_websocket.WebSocketConnection`` to a Trio byte stream so the upgrade
code above does not know what carries it.

The server side is not a separate listener: :mod:`ocf.transport.tcp` sniffs
``GET `` on its port and hands the stream to :func:`serve_websocket_stream`.
trio-websocket runs a reader task per connection, so both sides open a
nursery that lives exactly as long as the connection.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import trio
import trio_websocket

from ..errors import PeerUnreachable, TransportError, leaves, transport_errors_unwrapped
from ..identity import Multiaddr
from .tcp import RawConn, RawHandler, sockaddr_to_multiaddr

log = logging.getLogger("ocf.transport.websocket")

# Largest WebSocket message we send; bigger writes are split (receivers may cap message size).
SEND_CHUNK = 256 * 1024
MESSAGE_QUEUE = 8
RECEIVE_BUFFER = 64 * 1024
CLOSE_TIMEOUT = 1.0


class WebSocketStream(trio.abc.HalfCloseableStream):
    """A Trio byte stream over binary WebSocket messages."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._buffer = b""
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        data = bytes(data)
        try:
            if len(data) <= SEND_CHUNK:
                await self._ws.send_message(data)
            else:
                for off in range(0, len(data), SEND_CHUNK):
                    await self._ws.send_message(data[off : off + SEND_CHUNK])
        except trio_websocket.ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"websocket closed: {exc.reason}") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if not self._buffer:
            # An empty binary message is not EOF (js-libp2p sends them); only a close is.
            while not self._buffer:
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return b""
                if isinstance(message, str):
                    raise trio.BrokenResourceError("libp2p over WebSocket needs binary messages, got text")
                self._buffer = message
        else:
            await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
        return data

    async def send_eof(self) -> None:
        # WebSocket has no half-close; the libp2p layers above never need one.
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self._ws.aclose()


def _endpoint_addr(endpoint: object) -> Multiaddr | None:
    address = getattr(endpoint, "address", None)
    port = getattr(endpoint, "port", None)
    if address is None or port is None:
        return None
    return sockaddr_to_multiaddr((str(address), port), ws=True)


@contextlib.asynccontextmanager
async def connect_websocket(host: str, port: int, timeout: float, max_message: int) -> AsyncIterator[RawConn]:
    """Dial ``ws://host:port/`` and yield the connection as a :class:`RawConn`.

    Whatever the far end answers (an HTTP error page, garbage, a close), the
    dial fails with :class:`PeerUnreachable`; the connection's reader task
    lives in a nursery here, whose wrapping group never reaches the caller.
    """
    yielded = False
    try:
        with transport_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(timeout):
                        ws = await trio_websocket.connect_websocket(
                            nursery,
                            host,
                            port,
                            "/",
                            use_ssl=False,
                            message_queue_size=MESSAGE_QUEUE,
                            max_message_size=max_message,
                            receive_buffer_size=RECEIVE_BUFFER,
                        )
                except trio.TooSlowError:
                    raise PeerUnreachable(f"websocket dial {host}:{port} timed out after {timeout:g}s") from None
                except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
                    raise PeerUnreachable(f"websocket dial {host}:{port} failed: {exc}") from None
                stream = WebSocketStream(ws)
                yielded = True
                try:
                    yield RawConn(stream, _endpoint_addr(ws.remote), _endpoint_addr(ws.local), "ws")
                finally:
                    await stream.aclose()
                    nursery.cancel_scope.cancel()
    except Exception as exc:
        if yielded or isinstance(exc, TransportError):
            raise
        # Before the connection is handed out, anything that goes wrong is the far end's
        # answer not being a WebSocket upgrade (wsproto and h11 raise their own errors
        # from trio-websocket's reader task): for the caller, the address is unreachable.
        leaf = leaves(exc)[0]
        raise PeerUnreachable(f"websocket dial {host}:{port} failed: {type(leaf).__name__}: {leaf}") from None


async def serve_websocket_stream(
    stream: trio.abc.Stream,
    handler: RawHandler,
    *,
    remote: Multiaddr | None,
    local: Multiaddr | None,
    timeout: float,
    max_message: int,
) -> None:
    """Complete the server side of a WebSocket handshake on ``stream`` and run ``handler`` on it."""
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=MESSAGE_QUEUE,
                    max_message_size=max_message,
                    receive_buffer_size=RECEIVE_BUFFER,
                )
                ws = await request.accept()
        except (trio.TooSlowError, trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
            log.debug("websocket handshake failed remote=%s exc=%r", remote, exc)
            nursery.cancel_scope.cancel()
            return
        ws_stream = WebSocketStream(ws)
        try:
            await handler(RawConn(ws_stream, remote, local, "ws"))
        finally:
            await ws_stream.aclose()
            nursery.cancel_scope.cancel()
