"""yamux session state machine, sans-IO (bytes in -> events, calls -> bytes out).

yamux (https://github.com/hashicorp/yamux/blob/master/spec.md) multiplexes
many bidirectional streams over one secure connection. Every frame has a
12-byte big-endian header ``version(8) type(8) flags(16) stream_id(32)
length(32)``; only Data frames carry a payload (``length`` bytes), for the
other types ``length`` is a window delta, a ping opaque value or a GoAway code.

This module knows nothing about sockets or Trio. The driver
(:mod:`ocf.transport.muxer`) feeds received bytes to
:meth:`YamuxSession.receive_data`, gets back a list of events, and writes out
whatever :meth:`YamuxSession.data_to_send` returns after any call.

Why the pieces look the way they do:

- **Flow control is per stream**, as the spec says. We advertise a window of
  256 KiB and only re-grant credit as the application *consumes* bytes
  (:meth:`consume`), so a slow reader never makes us hold more than the window
  we advertised. A peer sending beyond the credit we granted is a protocol
  error that ends the session (GoAway with code 1).
- **Window auto-tuning** (as go-yamux and js-libp2p do): when a stream's
  window is re-granted faster than ~4 RTTs after the previous grant, the reader
  keeps up and the window is the bottleneck, so we double it, up to
  ``max_window`` (16 MiB). Slow readers stay at 256 KiB.
- **Payload bytes are passed through as they arrive** (a Data frame split over
  several reads yields several :class:`DataReceived` events), so we never
  buffer a whole frame before delivering it and copy each byte once.
- Frames for streams we do not know (already closed or reset) are ignored, as
  go-yamux does: they are normal after a reset races with data in flight.
"""

from __future__ import annotations

import struct

import attrs

from ..errors import ProtocolError

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12

VERSION = 0
TYPE_DATA = 0x0
TYPE_WINDOW_UPDATE = 0x1
TYPE_PING = 0x2
TYPE_GO_AWAY = 0x3

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
# Largest payload we put in one Data frame. The spec sets no limit, but other
# implementations cap what they send at 64 KiB or less; staying there keeps us
# clear of any receiver-side limit. (Aligning frames to Noise's 65519-byte
# plaintext does not pay: the writer joins many frames into one buffer that
# Noise then cuts anyway, and a 64 KiB application write would become two
# yamux frames, i.e. two events and two wake-ups at the reader. Measured.)
MAX_FRAME = 64 * 1024
# Window auto-tuning may add at most this much receive window, summed over
# the streams of one session, beyond their initial 256 KiB each: a peer
# cannot make every stream grow to 16 MiB and then stall it.
MAX_GROWTH_BUDGET = 64 * 1024 * 1024
MAX_STREAM_ID = 0xFFFFFFFF
MAX_WINDOW_TOTAL = 0xFFFFFFFF  # a send window beyond 32 bits means a broken peer


# --- events ------------------------------------------------------------------------


@attrs.frozen(slots=True)
class StreamOpened:
    """The peer opened stream ``stream_id`` (we already acknowledged it)."""

    stream_id: int


@attrs.frozen(slots=True)
class StreamAccepted:
    """The peer acknowledged a stream we opened."""

    stream_id: int


@attrs.frozen(slots=True)
class DataReceived:
    """Payload bytes for a stream; call :meth:`YamuxSession.consume` once the application has read them."""

    stream_id: int
    data: bytes


@attrs.frozen(slots=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will arrive."""

    stream_id: int


@attrs.frozen(slots=True)
class StreamResetByPeer:
    """The stream is dead: the peer reset it (RST), or it broke the stream's rules and we reset it."""

    stream_id: int


@attrs.frozen(slots=True)
class WindowUpdated:
    """The peer granted more send credit on the stream (blocked senders may continue)."""

    stream_id: int


@attrs.frozen(slots=True)
class PongReceived:
    """Answer to a :meth:`YamuxSession.ping` with the same opaque value."""

    opaque: int


@attrs.frozen(slots=True)
class GoAwayReceived:
    """The peer will accept no new streams (``code`` 0 normal, 1 protocol error, 2 internal error)."""

    code: int


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamResetByPeer
    | WindowUpdated
    | PongReceived
    | GoAwayReceived
)


class StreamLimitReached(ProtocolError):
    """No new stream may be opened: the per-connection limit or a GoAway forbids it."""


# --- per-stream state ------------------------------------------------------------------


class _Stream:
    """Flow-control and half-close state of one stream.

    ``recv_credit`` is what the peer may still send (the window we advertised
    minus what it sent); ``recv_buffered`` is what arrived but the application
    has not consumed. ``recv_credit + recv_buffered <= recv_target`` always, so
    memory per stream is bounded by the current target window.
    """

    __slots__ = ("send_window", "recv_credit", "recv_buffered", "recv_target", "local_fin", "remote_fin", "epoch")

    def __init__(self, window: int) -> None:
        self.send_window = INITIAL_WINDOW
        self.recv_credit = INITIAL_WINDOW
        self.recv_buffered = 0
        self.recv_target = window
        self.local_fin = False
        self.remote_fin = False
        self.epoch: float | None = None


class YamuxSession:
    """One side of a yamux session.

    ``is_client`` is True on the side that dialed the connection (it opens odd
    stream IDs; the listener opens even ones).
    """

    def __init__(
        self,
        is_client: bool,
        *,
        max_streams: int = 1024,
        initial_window: int = INITIAL_WINDOW,
        max_window: int = MAX_WINDOW,
        max_frame: int = MAX_FRAME,
    ) -> None:
        if initial_window < INITIAL_WINDOW:
            raise ValueError("yamux windows start at 256 KiB at least")
        self.is_client = is_client
        self.max_streams = max_streams
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.max_frame = max_frame
        # Smoothed round-trip time in seconds, set by the driver from pings;
        # 0 means unknown (no window auto-tuning until we know it).
        self.rtt = 0.0
        self.go_away_sent = False
        self.go_away_received = False
        self.failed: str | None = None
        self.growth_budget = MAX_GROWTH_BUDGET
        self._growth = 0  # receive window added by auto-tuning, over all live streams
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes | memoryview] = []
        self._out_size = 0
        # receive-side parser state
        self._hdr = bytearray()
        self._payload_left = 0
        self._payload_sid = 0  # 0: discard the payload (unknown stream)
        self._payload_fin = False

    # --- introspection ---------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes we may send on the stream right now (0 if closed for sending or unknown)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_fin:
            return 0
        return st.send_window

    def recv_window(self, stream_id: int) -> int:
        """Current receive target window of the stream (for tests and stats)."""
        st = self._streams.get(stream_id)
        return 0 if st is None else st.recv_target

    @property
    def pending_output(self) -> int:
        """Bytes queued by :meth:`data_to_send` callers have not collected yet."""
        return self._out_size

    # --- output ------------------------------------------------------------------------

    def data_to_send(self, limit: int | None = None) -> bytes:
        """What is queued for the wire (may be ``b""``).

        With ``limit``, whole frames are taken until at least ``limit``
        bytes (or everything) are collected; the rest stays queued.
        """
        parts = self.take_output(limit)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def take_output(self, limit: int | None = None) -> list[bytes | memoryview]:
        """Like :meth:`data_to_send`, as the queued pieces (headers and payloads) without joining them.

        For a driver that copies them somewhere anyway (the Noise encryptor
        lays them out in its output buffer), joining first would copy twice.
        """
        out = self._out
        if limit is not None and self._out_size > limit:
            taken = 0
            i = 0
            while i < len(out) and taken < limit:
                piece = out[i]
                taken += len(piece)
                i += 1
                if len(piece) == HEADER_SIZE and i < len(out) and piece[1] == TYPE_DATA:
                    # a Data header: its payload follows as the next piece (if non-empty)
                    length = int.from_bytes(piece[8:12], "big")
                    if length:
                        taken += len(out[i])
                        i += 1
            parts, self._out = out[:i], out[i:]
            self._out_size -= taken
            return parts
        self._out = []
        self._out_size = 0
        return out

    def _frame(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        self._out.append(HEADER.pack(VERSION, type_, flags, stream_id, length))
        self._out_size += HEADER_SIZE

    # --- commands ------------------------------------------------------------------------

    def open_stream(self) -> int:
        """Open an outbound stream and return its ID (the SYN is queued)."""
        if self.failed is not None:
            raise ProtocolError(f"yamux session failed: {self.failed}")
        if self.go_away_received or self.go_away_sent:
            raise StreamLimitReached("yamux session is going away; no new streams")
        if len(self._streams) >= self.max_streams:
            raise StreamLimitReached(f"stream limit reached ({self.max_streams} streams on this connection)")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise StreamLimitReached("yamux stream IDs exhausted on this connection")
        self._next_id += 2
        self._streams[sid] = _Stream(self.initial_window)
        self._frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self.initial_window - INITIAL_WINDOW)
        if self.initial_window > INITIAL_WINDOW:
            self._streams[sid].recv_credit = self.initial_window
        return sid

    def send_data(self, stream_id: int, data: bytes | memoryview, fin: bool = False) -> None:
        """Queue ``data`` (at most :meth:`send_window` bytes) and optionally a FIN.

        ``data`` is referenced, not copied, until :meth:`data_to_send`; pass
        immutable bytes (or a view of them).
        """
        st = self._streams.get(stream_id)
        if st is None or st.local_fin:
            raise ValueError(f"stream {stream_id} is not open for sending")
        n = len(data)
        if n > st.send_window:
            raise ValueError(f"{n} bytes exceed the send window ({st.send_window}) of stream {stream_id}")
        st.send_window -= n
        out = self._out
        pack = HEADER.pack
        if n <= self.max_frame:
            out.append(pack(VERSION, TYPE_DATA, FLAG_FIN if fin else 0, stream_id, n))
            if n:
                out.append(data)
        else:
            view = memoryview(data)
            step = self.max_frame
            for off in range(0, n, step):
                chunk = view[off : off + step]
                last = off + step >= n
                out.append(pack(VERSION, TYPE_DATA, FLAG_FIN if (fin and last) else 0, stream_id, len(chunk)))
                out.append(chunk)
        self._out_size += n + HEADER_SIZE * max(1, -(-n // self.max_frame))
        if fin:
            self._local_fin(stream_id, st)

    def close_stream(self, stream_id: int) -> None:
        """Half-close our side (FIN). No-op if already closed or gone."""
        st = self._streams.get(stream_id)
        if st is None or st.local_fin:
            return
        self._frame(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
        self._local_fin(stream_id, st)

    def reset_stream(self, stream_id: int) -> None:
        """Abort the stream both ways (RST). No-op if it is already gone."""
        st = self._streams.pop(stream_id, None)
        if st is None:
            return
        self._release(st)
        self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)

    def consume(self, stream_id: int, n: int, now: float | None = None) -> None:
        """The application read ``n`` bytes of the stream: re-grant credit when worthwhile.

        ``now`` (any monotonic clock, seconds) enables window auto-tuning.
        """
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.recv_buffered -= n
        if st.recv_buffered < 0:
            raise ValueError(f"consumed more than was received on stream {stream_id}")
        if st.remote_fin:
            return  # the peer sends nothing more; credit would be pointless
        target = st.recv_target
        grant = target - st.recv_buffered - st.recv_credit
        if grant < target // 2:
            return
        if now is not None:
            if st.epoch is not None and self.rtt > 0 and target < self.max_window and now - st.epoch < 4 * self.rtt:
                new_target = min(target * 2, self.max_window)
                if self._growth + new_target - target <= self.growth_budget:
                    self._growth += new_target - target
                    target = st.recv_target = new_target
                    grant = target - st.recv_buffered - st.recv_credit
            st.epoch = now
        st.recv_credit += grant
        self._frame(TYPE_WINDOW_UPDATE, 0, stream_id, grant)

    def ping(self, opaque: int) -> None:
        """Queue a ping; the answer arrives as :class:`PongReceived` with the same value."""
        self._frame(TYPE_PING, FLAG_SYN, 0, opaque & 0xFFFFFFFF)

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the peer we accept no new streams (existing ones continue)."""
        if self.go_away_sent:
            return
        self.go_away_sent = True
        self._frame(TYPE_GO_AWAY, 0, 0, code)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    # --- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Parse received bytes; returns the events they caused.

        Raises :class:`ProtocolError` when the peer breaks the protocol; a
        GoAway(protocol error) is then queued, and the session is dead (every
        later call to this method raises too).
        """
        if self.failed is not None:
            raise ProtocolError(f"yamux session failed: {self.failed}")
        if not isinstance(data, bytes):
            data = bytes(data)
        events: list[Event] = []
        n = len(data)
        pos = 0
        try:
            while pos < n:
                left = self._payload_left
                if left:
                    take = n - pos if n - pos < left else left
                    sid = self._payload_sid
                    if sid:
                        chunk = data if (pos == 0 and take == n) else data[pos : pos + take]
                        st = self._streams.get(sid)
                        if st is not None:
                            st.recv_buffered += take
                            events.append(DataReceived(sid, chunk))
                    pos += take
                    left -= take
                    self._payload_left = left
                    if not left and self._payload_fin:
                        self._payload_fin = False
                        self._remote_fin(sid, events)
                    continue
                hdr = self._hdr
                if hdr:
                    need = HEADER_SIZE - len(hdr)
                    hdr += data[pos : pos + need]
                    pos += need
                    if len(hdr) < HEADER_SIZE:
                        break
                    fields = HEADER.unpack(hdr)
                    hdr.clear()
                elif n - pos >= HEADER_SIZE:
                    fields = HEADER.unpack_from(data, pos)
                    pos += HEADER_SIZE
                else:
                    hdr += data[pos:]
                    break
                self._on_header(fields, events)
        except ProtocolError as exc:
            self._fail(str(exc))
            raise
        return events

    def _fail(self, reason: str) -> None:
        self.failed = reason
        if not self.go_away_sent:
            self.go_away_sent = True
            self._frame(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)

    def _on_header(self, fields: tuple[int, int, int, int, int], events: list[Event]) -> None:
        version, type_, flags, sid, length = fields
        if version != VERSION:
            raise ProtocolError(f"unsupported yamux version {version}")
        if type_ == TYPE_DATA:
            if sid == 0:
                raise ProtocolError("yamux data frame on stream 0")
            st = self._stream_for(sid, flags, events)
            if st is None or flags & FLAG_RST or (st.remote_fin and length):
                if st is not None:
                    # RST, or data after the peer's own FIN: the stream is dead.
                    if not flags & FLAG_RST:
                        self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                    self._release(self._streams.pop(sid))
                    events.append(StreamResetByPeer(sid))
                self._skip(length)
                return
            if length > st.recv_credit:
                raise ProtocolError(
                    f"yamux window exceeded on stream {sid}: {length} bytes sent, {st.recv_credit} granted"
                )
            st.recv_credit -= length
            fin = bool(flags & FLAG_FIN)
            if length:
                self._payload_left = length
                self._payload_sid = sid
                self._payload_fin = fin
            elif fin:
                self._remote_fin(sid, events)
        elif type_ == TYPE_WINDOW_UPDATE:
            if sid == 0:
                raise ProtocolError("yamux window update on stream 0")
            st = self._stream_for(sid, flags, events)
            if st is None:
                return
            if flags & FLAG_RST:
                self._release(self._streams.pop(sid))
                events.append(StreamResetByPeer(sid))
                return
            if length:
                st.send_window += length
                if st.send_window > MAX_WINDOW_TOTAL:
                    raise ProtocolError(f"yamux send window of stream {sid} overflows 32 bits")
                if not st.local_fin:
                    events.append(WindowUpdated(sid))
            if flags & FLAG_FIN:
                self._remote_fin(sid, events)
        elif type_ == TYPE_PING:
            if flags & FLAG_SYN:
                self._frame(TYPE_PING, FLAG_ACK, 0, length)
            elif flags & FLAG_ACK:
                events.append(PongReceived(length))
        elif type_ == TYPE_GO_AWAY:
            self.go_away_received = True
            events.append(GoAwayReceived(length))
        else:
            raise ProtocolError(f"unknown yamux frame type {type_}")

    def _skip(self, length: int) -> None:
        if length > self.max_window:
            raise ProtocolError(f"yamux frame of {length} bytes exceeds any window")
        self._payload_left = length
        self._payload_sid = 0
        self._payload_fin = False

    def _stream_for(self, sid: int, flags: int, events: list[Event]) -> _Stream | None:
        st = self._streams.get(sid)
        if flags & FLAG_SYN:
            if st is not None:
                raise ProtocolError(f"yamux stream {sid} opened twice")
            if (sid & 1) == (1 if self.is_client else 0):
                raise ProtocolError(f"yamux stream id {sid} has our parity; the peer must open the other kind")
            if self.go_away_sent or len(self._streams) >= self.max_streams:
                # Refuse: RST it and ignore its frames (they are skipped as unknown).
                self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                return None
            st = self._streams[sid] = _Stream(self.initial_window)
            if self.initial_window > INITIAL_WINDOW:
                st.recv_credit = self.initial_window
            self._frame(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, self.initial_window - INITIAL_WINDOW)
            events.append(StreamOpened(sid))
        elif st is not None and flags & FLAG_ACK:
            events.append(StreamAccepted(sid))
        return st

    def _remote_fin(self, sid: int, events: list[Event]) -> None:
        st = self._streams.get(sid)
        if st is None or st.remote_fin:
            return
        st.remote_fin = True
        events.append(StreamEnded(sid))
        if st.local_fin:
            self._release(self._streams.pop(sid))

    def _local_fin(self, sid: int, st: _Stream) -> None:
        st.local_fin = True
        if st.remote_fin:
            self._release(self._streams.pop(sid))

    def _release(self, st: _Stream) -> None:
        self._growth -= st.recv_target - self.initial_window
