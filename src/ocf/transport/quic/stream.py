"""A native QUIC stream: a :class:`~ocf.transport.streams.MuxedStream`, as yamux streams are.

Everything above the transport (multistream-select, ping, identify, the node
table, ``/libp2p-http``) takes a stream, reads, writes, half-closes and
resets; which transport carries it must not show. So this class keeps
MuxedStream's contract: ``receive_some`` returns ``b""`` at the peer's FIN
and raises :class:`~ocf.errors.StreamReset` after a reset; ``aclose`` with
unread data resets; received-but-unread bytes are charged to the peer's
buffered-bytes budget and a chunk the budget refuses resets the stream.

The bytes themselves live in the connection's sans-IO machine; the stream
is bookkeeping plus a place for one reader and one writer to wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import ParkingLot, checkpoint, checkpoint_if_cancelled

from ...errors import StreamReset
from ..streams import MuxedStream

if TYPE_CHECKING:
    from ...identity import PeerId
    from .connection import QuicMuxedConnection

#: Sent-but-unacknowledged bytes above which a writer waits (aioquic buffers without limit).
SEND_HIGH_WATER = 1 << 20
#: Largest piece of one send_all handed to the machine at once.
SEND_CHUNK = 256 * 1024
#: Application error codes on the wire (libp2p leaves them to the application).
RESET_CODE = 0


class QuicStream(MuxedStream):
    """One bidirectional QUIC stream (create via :meth:`QuicMuxedConnection.open_stream`)."""

    _conn: QuicMuxedConnection

    def __init__(self, conn: QuicMuxedConnection, stream_id: int, *, inbound: bool = False) -> None:
        super().__init__(conn, stream_id, inbound=inbound)
        self._recv_lot = ParkingLot()

    @property
    def remote_peer(self) -> PeerId:
        assert self._conn.remote_peer is not None
        return self._conn.remote_peer

    @property
    def connection(self) -> QuicMuxedConnection:
        return self._conn

    @property
    def reusable(self) -> bool:
        return self._reset is None and not self._eof and not self._chunks

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} {self.protocol or '-'}>"

    # --- receiving ---------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._reset is not None:
                    raise StreamReset(f"stream reset ({self._reset})")
                if self._chunks:
                    data = self._take(max_bytes)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._eof:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                await self._recv_lot.park()
        finally:
            self._receiving = False

    # --- sending -----------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
            pos = 0
            parked = False
            while True:
                self._check_send()
                if pos >= len(view):
                    break
                if self._conn._unacked(self.stream_id) >= SEND_HIGH_WATER:
                    parked = True
                    await self._send_lot.park()
                    continue
                piece = view[pos : pos + SEND_CHUNK]
                self._conn._send(self.stream_id, bytes(piece), end=False)
                pos += len(piece)
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _send_window_open(self) -> bool:
        return self._conn._unacked(self.stream_id) < SEND_HIGH_WATER

    def _send_fin(self) -> None:
        self._conn._send(self.stream_id, b"", end=True)

    async def aclose(self) -> None:
        """FIN our side; unread or later-arriving data stops the peer's side (as TCP would reset)."""
        if not self._closed:
            self._closed = True
            if self._reset is None:
                unread = bool(self._chunks) or not self._eof
                self._discard()
                if not self._send_closed:
                    self._send_closed = True
                    self._send_fin()
                if unread:
                    self._conn._stop_receiving(self.stream_id)
            self._conn._maybe_forget(self)
            self._wake()
        await checkpoint()

    def reset(self) -> None:
        """Abort both directions now; pending and later calls raise :class:`StreamReset`."""
        if self._reset is None:
            self._discard()
            self._conn._reset_stream(self)
            self._on_reset("reset locally")

    # --- called by the connection ----------------------------------------------------------

    def _wake_receiver(self) -> None:
        self._recv_lot.unpark_all()

    def _wake(self) -> None:
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    def _on_data(self, data: bytes) -> None:
        if self._closed or self._reset is not None:
            return  # the peer was told to stop; what is still in flight is dropped
        if not self._buffer(data):
            self._conn._note("memory", "stream reset: buffered-bytes budget exceeded")
            self.reset()

    def _on_eof(self) -> None:
        self._eof = True
        self._recv_lot.unpark_all()
        self._conn._maybe_forget(self)

    def _on_reset(self, reason: str) -> None:
        if self._reset is None:
            self._reset = reason
            self._chunks = None
            self._unread = 0
            self._release_all()
            self._wake()
            self._conn._maybe_forget(self)

    def _done(self) -> bool:
        """Nothing more will happen on this stream in either direction, as far as we care."""
        return self._reset is not None or self._closed

    def _status(self) -> dict[str, Any]:
        return {"id": self.stream_id, "eof": self._eof, "closed": self._closed, "reset": self._reset}
