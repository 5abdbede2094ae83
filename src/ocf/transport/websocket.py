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

trio-websocket assembles a whole message before handing it over, so a peer
that starts a message and never finishes it pins what it sent. Three bounds
keep that small (:class:`_BudgetedWebSocket`):

- a modest maximum message (libp2p needs room for one Noise frame, 64 KiB,
  per message), and a smaller one until the libp2p handshake is done, so
  sockets holding handshake slots cannot pin much either;
- a deadline for finishing a message once started;
- every buffered byte, partial or queued, charged to the source address's
  and the node's buffered-bytes budget until the stream above reads it; a
  message the budget refuses closes the connection (code 1009, as for an
  oversize message).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from collections.abc import AsyncIterator

import trio
import trio_websocket
from trio_websocket._impl import CloseReason
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection

from ..errors import PeerUnreachable, TransportError, leaves, transport_errors_unwrapped
from ..identity import Multiaddr
from .resources import HandshakeSlot, ResourceManager, ip_key
from .tcp import RawConn, RawHandler, sockaddr_to_multiaddr

log = logging.getLogger("ocf.transport.websocket")

# Largest WebSocket message we send; bigger writes are split (receivers may cap message size).
SEND_CHUNK = 256 * 1024
MESSAGE_QUEUE = 8
RECEIVE_BUFFER = 64 * 1024
CLOSE_TIMEOUT = 1.0
# The partial-message deadline is checked this often (as a fraction of it, at most every few seconds).
WATCH_FRACTION = 4
WATCH_MAX_PERIOD = 5.0
CODE_TOO_BIG = 1009
# Largest message before the libp2p upgrade is done: multistream lines and
# Noise handshake messages (at most 64 KiB each), with room to batch a few.
HANDSHAKE_MAX_MESSAGE = 128 * 1024


class _BudgetedWebSocket(trio_websocket.WebSocketConnection):
    """A WebSocket connection whose buffered messages are charged to the resource manager.

    Built on trio-websocket's message assembly (pinned version): the bytes
    of the message in progress and of complete messages not yet read are
    reserved as ``memory`` in the source address's scope and the system's.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws_connection: WSConnection,
        *,
        resources: ResourceManager,
        ip: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, ws_connection, **kwargs)
        self._rm = resources
        self._ip = ip
        self.held = 0  # bytes reserved: the partial message plus queued messages
        self.partial_since: float | None = None  # when the message in progress began

    async def _handle_message_event(self, event: Any) -> None:
        n = len(event.data)
        if self._message_size == 0:
            self.partial_since = trio.current_time()
        if n and not self._rm.try_reserve("memory", n, ip=self._ip):
            self._release(self._message_size)
            self._message_size = 0
            self._message_parts = []
            self.partial_since = None
            self._close_reason = CloseReason(CODE_TOO_BIG, "buffer budget exceeded")
            await self._send(CloseConnection(code=CODE_TOO_BIG, reason="buffer budget exceeded"))
            await self._recv_channel.aclose()
            self._reader_running = False
            return
        self.held += n
        before = self._message_size + n
        await super()._handle_message_event(event)
        if self._message_size == 0:
            self.partial_since = None
            if self._close_reason is not None and self._close_reason.code == CODE_TOO_BIG:
                self._release(before)  # dropped as oversize: never queued

    def consumed(self, n: int) -> None:
        """The stream above took a message of ``n`` bytes off the queue."""
        self._release(n)

    def _release(self, n: int) -> None:
        n = min(n, self.held)
        if n > 0:
            self.held -= n
            self._rm.release("memory", n, ip=self._ip)

    def release_all(self) -> None:
        self._release(self.held)


async def _watch_partial(ws: _BudgetedWebSocket, message_timeout: float, cancel: trio.CancelScope) -> None:
    """Close the connection when a message stays unfinished longer than ``message_timeout``."""
    period = min(message_timeout / WATCH_FRACTION, WATCH_MAX_PERIOD)
    while True:
        await trio.sleep(period)
        since = ws.partial_since
        if since is not None and trio.current_time() - since > message_timeout:
            ws._rm.note_refusal(
                "ip", "message_timeout", "websocket message not finished in time; closing", timeout=message_timeout
            )
            cancel.cancel()
            return


class WebSocketStream(trio.abc.HalfCloseableStream):
    """A Trio byte stream over binary WebSocket messages."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._consumed = getattr(ws, "consumed", None)
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
                if self._consumed is not None:
                    self._consumed(len(message))
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
async def connect_websocket(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109 - bounds the dial only; a caller's scope would bound the connection's life
    max_message: int,
    *,
    resources: ResourceManager | None = None,
    message_timeout: float = 30.0,
) -> AsyncIterator[RawConn]:
    """Dial ``ws://host:port/`` and yield the connection as a :class:`RawConn`.

    Whatever the far end answers (an HTTP error page, garbage, a close), the
    dial fails with :class:`PeerUnreachable`; the connection's reader task
    lives in a nursery here, whose wrapping group never reaches the caller.
    """
    rm = resources if resources is not None else ResourceManager()
    yielded = False
    try:
        with transport_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                tcp: trio.SocketStream | None = None
                rejected: list[BaseException] = []

                async def read(ws: _BudgetedWebSocket) -> None:
                    # A refused upgrade is raised in the reader task; report it to the dialer instead.
                    try:
                        await ws._reader_task()
                    except trio_websocket.HandshakeError as exc:
                        rejected.append(exc)
                        ws._open_handshake.set()

                try:
                    with trio.fail_after(timeout):
                        tcp = await trio.open_tcp_stream(host, port)
                        ws = _BudgetedWebSocket(
                            tcp,
                            WSConnection(ConnectionType.CLIENT),
                            resources=rm,
                            ip=ip_key(sockaddr_to_multiaddr((host, port))),
                            host=f"{host}:{port}",
                            path="/",
                            message_queue_size=MESSAGE_QUEUE,
                            max_message_size=max_message,
                            receive_buffer_size=RECEIVE_BUFFER,
                        )
                        nursery.start_soon(read, ws)
                        await ws._open_handshake.wait()
                        if rejected or ws.closed is not None:
                            raise trio_websocket.HandshakeError(
                                f"upgrade refused ({rejected[0] if rejected else ws.closed})"
                            )
                except trio.TooSlowError:
                    nursery.cancel_scope.cancel()
                    if tcp is not None:
                        await trio.aclose_forcefully(tcp)
                    raise PeerUnreachable(f"websocket dial {host}:{port} timed out after {timeout:g}s") from None
                except (OSError, trio_websocket.HandshakeError) as exc:
                    nursery.cancel_scope.cancel()
                    if tcp is not None:
                        await trio.aclose_forcefully(tcp)
                    raise PeerUnreachable(f"websocket dial {host}:{port} failed: {exc}") from None
                nursery.start_soon(_watch_partial, ws, message_timeout, nursery.cancel_scope)
                stream = WebSocketStream(ws)
                yielded = True
                try:
                    yield RawConn(stream, _endpoint_addr(ws.remote), _endpoint_addr(ws.local), "ws")
                finally:
                    ws.release_all()
                    nursery.cancel_scope.cancel()
                    await stream.aclose()
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
    slot: HandshakeSlot,
    max_message: int,
    resources: ResourceManager,
    message_timeout: float,
) -> None:
    """Complete the server side of a WebSocket handshake on ``stream`` and run ``handler`` on it.

    The WebSocket upgrade runs under ``slot``'s deadline, which the libp2p
    upgrade after it shares.
    """
    async with trio.open_nursery() as nursery:
        ws = _BudgetedWebSocket(
            stream,
            WSConnection(ConnectionType.SERVER),
            resources=resources,
            ip=slot.ip,
            message_queue_size=MESSAGE_QUEUE,
            max_message_size=max_message,
            receive_buffer_size=RECEIVE_BUFFER,
        )
        try:
            with trio.move_on_at(slot.deadline) as deadline:
                nursery.start_soon(ws._reader_task)
                request = await ws._get_request()
                await request.accept()
            if deadline.cancelled_caught:
                resources.note_refusal("transient", "handshake_timeout", "websocket upgrade timed out", remote=remote)
                nursery.cancel_scope.cancel()
                return
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
            log.debug("websocket handshake failed remote=%s exc=%r", remote, exc)
            ws.release_all()
            nursery.cancel_scope.cancel()
            return
        nursery.start_soon(_watch_partial, ws, message_timeout, nursery.cancel_scope)
        if slot.held:
            ws._max_message_size = min(max_message, HANDSHAKE_MAX_MESSAGE)

            def upgraded() -> None:
                ws._max_message_size = max_message

            slot.on_release.append(upgraded)
        ws_stream = WebSocketStream(ws)
        try:
            await handler(RawConn(ws_stream, remote, local, "ws", slot))
        finally:
            ws.release_all()  # first: closing below may raise
            nursery.cancel_scope.cancel()
            await ws_stream.aclose()
