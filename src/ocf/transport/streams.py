"""The libp2p stream every transport hands out, and the receive buffer they share.

Everything above the transport (multistream-select, ping, identify, the node
table, ``/libp2p-http``, the gateway's idle pool) takes a :class:`MuxedStream`
and reads, writes, half-closes and resets it; whether yamux over TCP or a
native QUIC stream carries it must not show. This base class is that
contract, so callers see one type without casts:

* ``receive_some`` returns ``b""`` at the peer's FIN and raises
  :class:`~ocf.errors.StreamReset` after a reset;
* ``aclose`` with unread data resets (as TCP would);
* :attr:`~MuxedStream.reusable` tells an idle pool whether the stream can
  carry another exchange;
* received-but-unread bytes are charged to the peer's buffered-bytes budget,
  and the application can charge its own buffers to the same budget
  (:meth:`~MuxedStream.reserve_memory`).

The receive buffer and that accounting are implemented once, here: a hostile
peer probes exactly this part, and two copies would drift apart.
"""

from __future__ import annotations

import collections
import math
from abc import abstractmethod
from typing import TYPE_CHECKING, Protocol

import trio
from trio.lowlevel import ParkingLot, checkpoint

from ..errors import StreamReset

if TYPE_CHECKING:
    from ..identity import PeerId
    from .resources import PeerResources

#: ``receive_some(None)`` joins small buffered chunks up to this size.
RECEIVE_JOIN = 256 * 1024


async def receive_before(stream: trio.abc.ReceiveStream, deadline: float, max_bytes: int) -> bytes | bytearray | None:
    """``receive_some`` that gives up at ``deadline`` (None then); no deadline (inf) costs no cancel scope.

    The message protocols read with a deadline only while a message is half
    received; between messages a stream waits forever, and entering a cancel
    scope per read would be most of a small message's cost.
    """
    if deadline == math.inf:
        return await stream.receive_some(max_bytes)
    with trio.move_on_at(deadline):
        return await stream.receive_some(max_bytes)
    return None


async def hand_over(stream: MuxedStream) -> None:
    """Half-close ``stream`` and wait until the peer closes its side: proof that it read all we sent.

    A write only says the bytes left us. A node that then closes its
    connection resets every stream on it, and the peer's reader drops what it
    had received but not yet read (as a TCP RST would): a departure written
    last was lost that way. A one-way protocol whose handler returns at our
    FIN, then closes, confirms delivery with its own FIN. Whatever the peer
    still sends is read and dropped; the caller bounds the wait.
    """
    await stream.send_eof()
    while await stream.receive_some(RECEIVE_JOIN):
        pass


class StreamCarrier(Protocol):
    """What the shared receive buffer needs of the connection that carries a stream."""

    _resources: PeerResources | None

    def _consumed(self, stream_id: int, n: int) -> None:
        """The application read ``n`` more bytes of the stream: the peer may send that many more."""


class MuxedStream(trio.abc.HalfCloseableStream):
    """One libp2p stream on a multiplexed connection (yamux or QUIC): see the module docstring.

    Subclasses feed :attr:`_chunks` through :meth:`_buffer` and wake their
    reader in :meth:`_wake_receiver`; they implement receiving, sending,
    closing and resetting against their own connection.
    """

    _conn: StreamCarrier

    def __init__(self, conn: StreamCarrier, stream_id: int, *, inbound: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.inbound = inbound
        self.protocol: str = ""
        # Created on the first bytes and dropped once read: an idle stream holds no buffer (an empty
        # deque is 760 bytes, and a node keeps four streams a connection, a hub thousands).
        self._chunks: collections.deque[bytes] | None = None
        self._held = 0  # bytes in _chunks charged to the buffered-bytes budget
        self._app_held = 0  # bytes the application reserved (reserve_memory)
        self._unread = 0  # bytes at the front of _chunks that were already consumed once
        self._eof = False  # peer sent FIN
        self._reset: str | None = None  # reason once reset (by us, the peer, or the connection)
        self._closed = False  # aclose() called
        self._send_closed = False  # send_eof() or aclose() called
        self._send_lot = ParkingLot()  # senders waiting for the transport's send window
        self._receiving = False
        self._sending = False

    # --- what each transport provides ------------------------------------------------------

    @property
    @abstractmethod
    def remote_peer(self) -> PeerId: ...

    @property
    @abstractmethod
    def connection(self) -> object:
        """The connection carrying this stream (compare with ``is``)."""

    @property
    @abstractmethod
    def reusable(self) -> bool:
        """Neither reset nor half-closed by the peer, nothing unread, on a connection not going away.

        A pool of idle streams asks before handing one out again; anything
        unread on an idle stream would be taken for the next answer.
        """

    @abstractmethod
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes the peer sent (``b""`` at its FIN); always ``bytes``, never a buffer that changes later."""

    @abstractmethod
    def reset(self) -> None:
        """Abort the stream both ways now; pending and later calls raise :class:`~ocf.errors.StreamReset`."""

    @abstractmethod
    def _send_window_open(self) -> bool:
        """Whether a send now would go out without waiting for the peer (flow control, buffered bytes)."""

    @abstractmethod
    def _send_fin(self) -> None:
        """Tell the peer we send no more (the transport's FIN)."""

    @abstractmethod
    def _wake_receiver(self) -> None:
        """Wake the task waiting in ``receive_some``, if any (each transport parks it its own way)."""

    # --- the receive buffer ----------------------------------------------------------------

    # --- sending: the checks and waits both transports share --------------------------------

    def _check_send(self) -> None:
        if self._reset is not None:
            raise StreamReset(f"stream reset ({self._reset})")
        if self._send_closed:
            raise trio.ClosedResourceError("stream is closed for sending")

    async def wait_send_all_might_not_block(self) -> None:
        await checkpoint()
        while True:
            self._check_send()
            if self._send_window_open():
                return
            await self._send_lot.park()

    async def send_eof(self) -> None:
        await checkpoint()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._reset is not None:
            raise StreamReset(f"stream reset ({self._reset})")
        if self._send_closed:
            return
        self._send_closed = True
        self._send_fin()

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the receive buffer (e.g. read past the end of a negotiation).

        They were already credited to the peer's window when first read, so
        reading them again does not credit them twice.
        """
        if data:
            if self._chunks is None:
                self._chunks = collections.deque()
            self._chunks.appendleft(bytes(data))
            self._unread += len(data)
            self._wake_receiver()

    def _buffer(self, data: bytes) -> bool:
        """Keep received bytes for the reader, charged to the budget; False (nothing kept) when over it."""
        res = self._conn._resources
        if res is not None:
            if not res.reserve_memory(len(data)):
                return False
            self._held += len(data)
        if self._chunks is None:
            self._chunks = collections.deque()
        self._chunks.append(data)
        self._wake_receiver()
        return True

    def _take(self, max_bytes: int | None) -> bytes:
        chunks = self._chunks
        assert chunks is not None, "_take with nothing buffered"
        data = chunks.popleft()
        if max_bytes is None:
            # Join only small pieces (a copy is cheap there and saves calls);
            # big ones go out as they are.
            if chunks and len(data) < RECEIVE_JOIN:
                parts = [data]
                total = len(data)
                while chunks and total + len(chunks[0]) <= RECEIVE_JOIN:
                    nxt = chunks.popleft()
                    parts.append(nxt)
                    total += len(nxt)
                data = b"".join(parts)
        elif len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        if not chunks:
            self._chunks = None
        n = len(data)
        if self._unread:
            again = min(n, self._unread)
            self._unread -= again
            n -= again
        if n:
            self._release_held(n)
            self._conn._consumed(self.stream_id, n)
        return data

    def _discard(self) -> None:
        """Drop what is buffered and unread (the stream is closing or reset)."""
        self._chunks = None
        self._release_held(self._held)

    # --- buffered-bytes accounting ---------------------------------------------------------

    def reserve_memory(self, n: int) -> bool:
        """Charge ``n`` bytes the application buffers for this stream (e.g. a partial message) to its peer's budget.

        False when the peer or the node is over budget: the caller should
        give up on the message (and reset the stream). Whatever is still
        reserved is released when the stream ends.
        """
        res = self._conn._resources
        if res is None or n <= 0:
            return True
        if not res.reserve_memory(n):
            return False
        self._app_held += n
        return True

    def release_memory(self, n: int) -> None:
        """Give back bytes reserved with :meth:`reserve_memory` (no more than were reserved)."""
        self._app_held -= self._give_back(min(n, self._app_held))

    def _release_held(self, n: int) -> None:
        self._held -= self._give_back(min(n, self._held))

    def _give_back(self, n: int) -> int:
        """Return ``n`` bytes to the peer's budget; how many were returned (0 without a budget)."""
        res = self._conn._resources
        if n <= 0 or res is None:
            return 0
        res.release_memory(n)
        return n

    def _release_all(self) -> None:
        """The stream is over (for the transport): its buffered bytes and the application's no longer count."""
        self._release_held(self._held)
        self.release_memory(self._app_held)
