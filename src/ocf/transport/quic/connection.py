"""Trio driver of one QUIC connection: aioquic's machine, its timer, its streams.

:class:`QuicMuxedConnection` stands where a yamux
:class:`~ocf.transport.muxer.MuxedConnection` stands for TCP: the host opens
streams on it, gets inbound streams through a handler, closes it, asks
whether it is open or going away. QUIC brings its own security and
multiplexing, so there is no upgrader step; the peer ID comes from the TLS
certificate (:mod:`.tls`), checked when the handshake completes and before
any stream is handed out.

Who drives the machine:

- the endpoint's receive loop feeds datagrams (:meth:`feed`) and then calls
  :meth:`flush` once per batch;
- :meth:`drive` (one task per connection) sleeps until aioquic's next timer,
  on Trio's clock: :meth:`flush` moves that task's deadline whenever the
  timer changes, which costs an attribute write rather than a wakeup;
- a stream's ``send_all`` hands bytes to the machine and flushes inline.

Everything here is synchronous between awaits, so the machine never sees two
callers at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import TYPE_CHECKING, Any, Protocol
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from aioquic.quic import events
from aioquic.quic.connection import NetworkAddress, QuicErrorCode
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional

from ...errors import HandshakeError, ResourceLimitExceeded, TransportError
from .machine import Libp2pQuicConnection
from .stream import RESET_CODE, SEND_HIGH_WATER, QuicStream
from .tls import ALPN, peer_id_from_certificate

if TYPE_CHECKING:
    from ...identity import PeerId
    from ..resources import PeerResources

log = logging.getLogger("ocf.transport.quic")

KEEPALIVE_INTERVAL = 15.0
#: TLS alert bad_certificate, as QUIC carries TLS alerts (CRYPTO_ERROR + alert).
BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + 42

InboundHandler = Callable[[QuicStream], Awaitable[None]]


class DatagramSink(Protocol):
    """What a connection needs from its endpoint."""

    def send_datagram(self, data: bytes, addr: NetworkAddress) -> None: ...

    def register_cid(self, cid: bytes, conn: QuicMuxedConnection) -> None: ...

    def unregister_cid(self, cid: bytes) -> None: ...

    def connection_done(self, conn: QuicMuxedConnection) -> None: ...


class QuicMuxedConnection:
    """One QUIC connection; the host's view of it matches MuxedConnection's."""

    def __init__(
        self,
        sink: DatagramSink,
        quic: Libp2pQuicConnection,
        addr: NetworkAddress,
        *,
        is_client: bool,
        expected: PeerId | None = None,
    ) -> None:
        self._sink = sink
        self.quic = quic
        self.addr = addr
        self.is_client = is_client
        self.expected = expected
        self.remote_peer: PeerId | None = None
        self.handshake_done = trio.Event()
        self.handshake_error: TransportError | None = None
        self.terminated = trio.Event()
        self.closed = trio.Event()
        self.close_reason: str | None = None
        self.going_away = False
        self.label = f"{addr[0]}:{addr[1]}"
        self._handler: InboundHandler | None = None
        self._resources: PeerResources | None = None
        self._max_streams = 1024
        self._streams: dict[int, QuicStream] = {}
        self._forgotten: set[int] = set()  # stream IDs we are done with that aioquic may still report
        self._early: list[QuicStream] = []  # inbound streams that arrived before run()
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._keepalive_at = math.inf
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._pings: dict[int, trio.Event] = {}
        self._ping_ids = itertools.count(1)
        self._ping_rtt: float | None = None
        self._cids: set[bytes] = set()

    # --- host-facing API (as MuxedConnection) ---------------------------------------------

    def attach(self, *, handler: InboundHandler | None, resources: PeerResources | None, max_streams: int) -> None:
        """Give the upgraded connection its stream handler and budgets (the host does, once the peer is known)."""
        self._handler = handler
        self._resources = resources
        self._max_streams = max_streams

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def is_open(self) -> bool:
        return self.close_reason is None and not self.terminated.is_set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve inbound streams until the connection ends (the machine itself is driven by :meth:`drive`)."""
        async with self.running():
            task_status.started()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Inbound streams are served from the block's start; leaving the block waits until the connection ends.

        :meth:`run` in the caller's own task (see ``MuxedConnection.running``).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                early, self._early = self._early, []
                for stream in early:
                    nursery.start_soon(self._run_handler, stream)
                yield
                await self.terminated.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self.close_reason is None:
                self.close_reason = "cancelled"
            self._abort(f"connection closed: {self.close_reason}")
            if self._resources is not None:
                self._resources.close()
            self.closed.set()

    async def open_stream(self) -> QuicStream:
        await trio.lowlevel.checkpoint()
        if not self.is_open or self.going_away:
            raise TransportError(f"connection to {self.label} is not accepting new streams")
        if len(self._streams) >= self._max_streams:
            raise ResourceLimitExceeded(f"stream limit reached on {self.label}", resource="streams")
        res = self._resources
        if res is not None and not res.open_stream(inbound=False):
            raise ResourceLimitExceeded(f"stream budget exhausted for {self.label}", resource="streams_outbound")
        sid = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(sid, b"", end_stream=False)  # claims the ID: nothing goes out yet
        stream = self._streams[sid] = QuicStream(self, sid)
        return stream

    async def ping(self) -> float:
        """Round-trip time of a QUIC PING, in seconds."""
        if not self.is_open:
            raise TransportError(f"connection to {self.label} is closed ({self.close_reason})")
        uid = next(self._ping_ids)
        done = self._pings[uid] = trio.Event()
        t0 = trio.current_time()
        self.quic.send_ping(uid)
        self.flush()
        try:
            await done.wait()
        finally:
            self._pings.pop(uid, None)
        if not self.is_open:
            raise TransportError(f"connection to {self.label} closed during ping")
        rtt = trio.current_time() - t0
        self._ping_rtt = rtt if self._ping_rtt is None else 0.8 * self._ping_rtt + 0.2 * rtt
        return rtt

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, None before any sample.

        aioquic measures it from every acknowledged packet (RFC 9002), which
        is fresher than our pings; it keeps the figure in its loss-recovery
        state, which has no public accessor (aioquic pinned in constraints.txt).
        """
        recovery = getattr(self.quic, "_loss", None)
        if recovery is not None and getattr(recovery, "_rtt_initialized", False):
            return float(recovery._rtt_smoothed)
        return self._ping_rtt

    def go_away(self) -> None:
        """No new streams from us (QUIC has no GOAWAY frame; the host closes the connection once idle)."""
        self.going_away = True

    async def wait_idle(self) -> None:
        while self._streams and not self.closed.is_set():
            await self._idle_lot.park()
        await trio.lowlevel.checkpoint()

    async def aclose(self, reason: str = "closed locally") -> None:
        """CONNECTION_CLOSE to the peer, then end.

        No waiting out QUIC's draining period (three PTOs): the close frame is
        on its way, and a peer that misses it times out, as after a TCP reset.
        """
        self.close_soon(reason)
        self._terminate(reason)
        if self._nursery is not None:
            await self.closed.wait()
        else:
            await trio.lowlevel.checkpoint()

    def close_soon(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.going_away = True
        if self.terminated.is_set():
            return
        paths = self.quic._network_paths
        if not self.is_client and (not paths or not paths[0].is_validated):
            # A source that never proved its address may be spoofed: a CONNECTION_CLOSE
            # would be one more datagram at a victim, past the 3x amplification budget.
            self._terminate(reason)
            return
        self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason[:64])
        self.flush()

    # --- the machine ----------------------------------------------------------------------------

    def feed(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """One datagram for this connection (the endpoint flushes after the batch)."""
        self.quic.receive_datagram(data, addr, now)

    def deliver(self) -> None:
        """Hand what the machine received to streams and waiters, without sending anything yet."""
        self._process_events()

    def flush(self, *, piggyback: bool = False) -> None:
        """Handle the machine's events, send what it has to send, re-arm its timer.

        ``piggyback`` (we are sending data anyway): acknowledgements aioquic
        holds back for up to its ACK delay go out in the same packet, so a
        request/response exchange costs two packets, not four, and no timer
        wakeup.
        """
        quic = self.quic
        self._process_events()
        now = trio.current_time()
        if piggyback:
            for space in quic._loss.spaces:
                if space.ack_at is not None and space.ack_at > now:
                    space.ack_at = now
        for data, addr in quic.datagrams_to_send(now):
            self._sink.send_datagram(data, addr)
        self._process_events()
        if self._timer_scope is not None:
            timer = quic.get_timer()
            self._timer_scope.deadline = min(timer if timer is not None else math.inf, self._keepalive_at)
        for stream in self._streams.values():
            if stream._send_lot and self._unacked(stream.stream_id) < SEND_HIGH_WATER:
                stream._send_lot.unpark_all()

    async def drive(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the machine's timers until the connection is terminated."""
        try:
            task_status.started()
            self.flush()
            keepalive_at = trio.current_time() + KEEPALIVE_INTERVAL
            while not self.terminated.is_set():
                timer = self.quic.get_timer()
                with trio.CancelScope(deadline=min(timer if timer is not None else math.inf, keepalive_at)) as scope:
                    self._timer_scope = scope
                    self._keepalive_at = keepalive_at
                    await self.terminated.wait()
                self._timer_scope = None
                if self.terminated.is_set():
                    break
                now = trio.current_time()
                if now >= keepalive_at:
                    # A PING keeps NAT bindings and the peer's idle timer alive (the keepalive
                    # is part of this loop rather than a task: idle connections are many).
                    keepalive_at = now + KEEPALIVE_INTERVAL
                    if self.remote_peer is not None:
                        self.quic.send_ping(next(self._ping_ids))
                timer = self.quic.get_timer()
                if timer is not None and timer <= now:
                    self.quic.handle_timer(now)
                self.flush()
        finally:
            self._timer_scope = None
            self._terminate(self.close_reason or "driver stopped")

    def _terminate(self, reason: str) -> None:
        if self.terminated.is_set():
            return
        if self.close_reason is None:
            self.close_reason = reason
        if self.handshake_error is None and not self.handshake_done.is_set():
            self.handshake_error = HandshakeError(f"quic: connection closed during the handshake ({reason})")
        self.terminated.set()
        self.handshake_done.set()  # waiters look at handshake_error
        self._abort(f"connection closed: {reason}")
        for cid in list(self._cids):
            self._sink.unregister_cid(cid)
        self._cids.clear()
        self._sink.connection_done(self)

    def register(self, cid: bytes) -> None:
        self._cids.add(cid)
        self._sink.register_cid(cid, self)

    def _process_events(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(f"reset by peer (code {event.error_code})")
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None and not stream._send_closed:
                    stream._send_closed = True
                    self._quietly(quic.reset_stream, event.stream_id, RESET_CODE)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, events.ConnectionIdIssued):
                self.register(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._cids.discard(event.connection_id)
                self._sink.unregister_cid(event.connection_id)
            elif isinstance(event, events.PingAcknowledged):
                done = self._pings.get(event.uid)
                if done is not None:
                    done.set()
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason_phrase or f"error {event.error_code:#x}"
                if self.close_reason is None:
                    self.close_reason = f"closed by peer: {reason}"
                self._terminate(reason)

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        try:
            if event.alpn_protocol != ALPN:
                raise HandshakeError(f"quic: peer negotiated ALPN {event.alpn_protocol!r}, not {ALPN!r}")
            peer = peer_id_from_certificate(self.quic.tls._peer_certificate, expected=self.expected)
        except HandshakeError as exc:
            self.handshake_error = exc
            self.quic.close(error_code=BAD_CERTIFICATE, reason_phrase="libp2p certificate check failed")
            return
        self.remote_peer = peer
        self.label = peer.short()
        self.quic.shrink_after_handshake()
        self.handshake_done.set()

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            if sid in self._forgotten or self.remote_peer is None:
                return
            if stream_is_client_initiated(sid) == self.is_client:
                return  # one of ours that we are done with
            if stream_is_unidirectional(sid):
                self._quietly(self.quic.stop_stream, sid, RESET_CODE)  # libp2p uses bidirectional streams only
                self._forgotten.add(sid)
                return
            stream = self._accept(sid)
            if stream is None:
                return
        if event.data:
            stream._on_data(event.data)
        if event.end_stream:
            stream._on_eof()

    def _accept(self, sid: int) -> QuicStream | None:
        res = self._resources
        if (
            self.going_away
            or len(self._streams) >= self._max_streams
            or (res is not None and not res.open_stream(inbound=True))
        ):
            if res is not None:
                res.rm.note_refusal("peer", "streams_inbound", "inbound QUIC stream refused", peer=self.label)
            self._forgotten.add(sid)
            self._quietly(self.quic.reset_stream, sid, RESET_CODE)
            self._quietly(self.quic.stop_stream, sid, RESET_CODE)
            return None
        stream = self._streams[sid] = QuicStream(self, sid, inbound=True)
        if self._nursery is not None:
            self._nursery.start_soon(self._run_handler, stream)
        else:
            self._early.append(stream)
        return stream

    async def _run_handler(self, stream: QuicStream) -> None:
        if self._handler is None:
            stream.reset()
            return
        try:
            await self._handler(stream)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a handler failing must not take the connection down
            self._note("handler_failed", "stream handler failed", stream=stream.stream_id, exc=repr(exc))
            stream.reset()

    # --- called by streams ------------------------------------------------------------------

    def _send(self, sid: int, data: bytes, *, end: bool) -> None:
        if self.terminated.is_set():
            raise trio.BrokenResourceError(f"connection to {self.label} is closed ({self.close_reason})")
        try:
            self.quic.send_stream_data(sid, data, end_stream=end)
        except ValueError as exc:  # the stream is finished on the machine's side
            raise trio.ClosedResourceError(f"stream {sid}: {exc}") from None
        self.flush(piggyback=True)

    def _unacked(self, sid: int) -> int:
        stream = self.quic._streams.get(sid)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def _consumed(self, sid: int, n: int) -> None:
        quic = self.quic
        quic.consumed[sid] = quic.consumed.get(sid, 0) + n
        if quic.credit_due(sid):
            self.flush()

    def _stop_receiving(self, sid: int) -> None:
        self._quietly(self.quic.stop_stream, sid, RESET_CODE)
        self.flush()

    def _reset_stream(self, stream: QuicStream) -> None:
        if not self.terminated.is_set():
            self._quietly(self.quic.reset_stream, stream.stream_id, RESET_CODE)
            self._quietly(self.quic.stop_stream, stream.stream_id, RESET_CODE)
            self.flush()

    def _maybe_forget(self, stream: QuicStream) -> None:
        if not stream._done() or self._streams.get(stream.stream_id) is not stream:
            return
        del self._streams[stream.stream_id]
        self.quic.forget_stream(stream.stream_id)
        stream._release_all()
        if self._resources is not None:
            self._resources.close_stream(stream.inbound)
        if stream.stream_id in self.quic._streams:
            self._forgotten.add(stream.stream_id)
        if len(self._forgotten) > 2 * len(self.quic._streams) + 64:
            self._forgotten &= set(self.quic._streams)  # aioquic dropped the rest: nothing more arrives for them
        if not self._streams and self._idle_lot:
            self._idle_lot.unpark_all()

    def _abort(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset(reason)
        for stream in self._early:
            stream._on_reset(reason)
        self._early.clear()
        self._streams.clear()
        for done in self._pings.values():
            done.set()
        if self._idle_lot:
            self._idle_lot.unpark_all()

    @staticmethod
    def _quietly(fn: Callable[[int, int], None], sid: int, code: int) -> None:
        with contextlib.suppress(ValueError, AssertionError):  # the stream is already finished on that side
            fn(sid, code)

    def _note(self, kind: str, message: str, **fields: Any) -> None:
        if self._resources is not None:
            self._resources.rm.note_refusal("peer", kind, message, peer=self.label, **fields)
        else:
            log.warning("%s %s", message, " ".join(f"{k}={v}" for k, v in fields.items()))
