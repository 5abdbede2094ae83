"""Trio driver of a yamux session over a secure connection.

:class:`MuxedConnection` owns one secure stream and three tasks in its own
nursery: a *reader* that feeds received bytes to the sans-IO
:class:`~ocf.transport.yamux.YamuxSession` and hands the events to streams,
a *writer* that sends what streams queued while another write was under
way, and a *keepalive* that pings the peer (measuring RTT for window
auto-tuning and closing the connection when the peer stops answering).
Handlers of inbound streams run in the same nursery, so nothing outlives the
connection.

Who writes: a task cancelled in the middle of a write would leave half a
Noise frame on the wire and break every stream of the connection, so writes
never overlap (``_writing`` marks one under way) and none can be cut short.
A stream's ``send_all`` that finds the connection free writes the queued
bytes itself, from its own task (:meth:`MuxedConnection._write_inline`, which
saves a task switch per message), and shields what the kernel does not take
at once from its caller's cancellation. One that finds a write under way only
queues its bytes into the session and wakes the writer task, which then
coalesces what many streams queued into one write; the writer task is
cancelled only when the whole connection ends.

:class:`YamuxStream` is a :class:`~ocf.transport.streams.MuxedStream` (the
stream type every transport hands out): ``receive_some`` returns ``b""`` at
the peer's EOF and raises :class:`~ocf.errors.StreamReset` when the stream
(or the whole connection) is reset.

With a :class:`~ocf.transport.resources.PeerResources` (the host always
passes one), every stream takes a slot of its peer's and the node's stream
budget, and every received byte the application has not read yet is charged
to their buffered-bytes budget. yamux grants each new stream 256 KiB of
credit before we can say anything, so per-stream windows alone let a peer
with many streams make us hold streams x 256 KiB; a chunk the budget refuses
resets its stream instead. Protocol handlers that assemble messages can
charge their own buffers to the same budget (:meth:`MuxedStream.reserve_memory`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from trio.lowlevel import ParkingLot, checkpoint, checkpoint_if_cancelled

from ..directsocket import YIELD_AFTER
from ..errors import ProtocolError, ResourceLimitExceeded, StreamReset, TransportError
from . import yamux
from .streams import MuxedStream
from .yamux import (
    DataReceived,
    GoAwayReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamResetByPeer,
    WindowUpdated,
    YamuxSession,
)

if TYPE_CHECKING:
    from ..identity import PeerId
    from .resources import PeerResources

log = logging.getLogger("ocf.transport.muxer")

# Queued-but-unwritten bytes above which senders wait for the writer: bounds
# the memory a fast sender can pile up in front of a slow network.
WRITE_HIGH_WATER = 1 << 20
# What a write or queued piece counts against the YIELD_AFTER budget at least,
# so that a task sending many tiny messages still yields every 64 of them.
MIN_CHARGE = YIELD_AFTER // 64
# Largest piece of one send_all handed to the session at once.
SEND_CHUNK = 256 * 1024
# Most bytes the writer hands the secure stream at once: bigger writes save
# little per-call overhead but copy through memory instead of cache.
WRITE_BATCH = 256 * 1024
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 30.0
CLOSE_FLUSH_TIMEOUT = 1.0

InboundHandler = Callable[["MuxedStream"], Awaitable[None]]


class YamuxStream(MuxedStream):
    """One yamux stream. Create via :meth:`MuxedConnection.open_stream` or get one in an inbound handler."""

    _conn: MuxedConnection

    def __init__(self, conn: MuxedConnection, stream_id: int, *, inbound: bool = False) -> None:
        super().__init__(conn, stream_id, inbound=inbound)
        # The one task waiting in receive_some (only one may receive at a
        # time): woken directly, which costs less than a ParkingLot.
        self._recv_waiter: trio.lowlevel.Task | None = None

    # --- identity --------------------------------------------------------------------

    @property
    def remote_peer(self) -> PeerId:
        return self._conn.remote_peer

    @property
    def connection(self) -> MuxedConnection:
        return self._conn

    @property
    def reusable(self) -> bool:
        """Neither reset nor half-closed by the peer, nothing unread, on a connection not going away.

        A pool of idle streams asks before handing one out again; anything
        unread on an idle stream would be taken for the next answer, and a
        connection told to go away (a duplicate, or a relayed one replaced by
        a direct one) should take no new requests.
        """
        return self._reset is None and not self._eof and not self._chunks and not self._conn.going_away

    def __repr__(self) -> str:
        peer = self._conn.remote_peer
        return f"<YamuxStream {self.stream_id} {self.protocol or '-'} peer={peer.short() if peer else '?'}>"

    # --- receiving -------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            # Every path through here passes one checkpoint: parking when we
            # must wait (it is one), an explicit one when data is ready.
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._reset is not None:
                    raise StreamReset(f"stream reset ({self._reset})")
                if self._chunks or self._eof:
                    if not parked:
                        await checkpoint()
                        parked = True
                        continue  # state may have changed while we yielded
                    return self._take(max_bytes) if self._chunks else b""
                parked = True
                self._recv_waiter = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_receive)
        finally:
            self._receiving = False

    def _abort_receive(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._recv_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_receiver(self) -> None:
        task = self._recv_waiter
        if task is not None:
            self._recv_waiter = None
            trio.lowlevel.reschedule(task)

    # --- sending ---------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        turn = False  # woken to fill the write queue and not filled it yet
        try:
            await checkpoint_if_cancelled()
            if not isinstance(data, bytes):
                data = bytes(data)  # the caller may reuse its buffer once we return
            conn = self._conn
            session = conn._session
            sid = self.stream_id
            n = len(data)
            pos = 0
            parked = False
            while True:
                self._check_send()
                if pos >= n:
                    break
                window = session.send_window(sid)
                if window == 0:
                    parked = True
                    await self._send_lot.park()
                    continue
                if session.pending_output >= WRITE_HIGH_WATER:
                    parked = turn = True
                    await conn._drain_lot.park()
                    continue
                take = min(window, n - pos, SEND_CHUNK)
                session.send_data(sid, data if take == n else memoryview(data)[pos : pos + take])
                pos += take
                turn = False
                if conn._writing:
                    conn._kick()  # the writer picks it up when its current write is done
                    conn._unyielded += max(take, MIN_CHARGE)
                else:
                    parked = True
                    await conn._write_inline()
            if not parked and conn._unyielded >= YIELD_AFTER:
                # Queued for the writer without waiting: yield every YIELD_AFTER bytes,
                # as inline writes do, rather than once per call.
                conn._unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False
            if turn:
                # Woken to fill the write queue but leaving without queueing
                # (cancelled, reset): pass the turn on to the next waiting sender.
                self._conn._wake_senders()

    def _send_window_open(self) -> bool:
        return self._conn._session.send_window(self.stream_id) > 0

    def _send_fin(self) -> None:
        self._conn._close_stream(self)

    async def aclose(self) -> None:
        """Close both directions: FIN our side; unread or later-arriving data resets the stream (as TCP would)."""
        if not self._closed:
            self._closed = True
            self._send_closed = True
            if self._reset is None:
                unread = bool(self._chunks) and not self._eof
                self._discard()
                if unread:
                    self._conn._reset_stream(self, "closed with unread data")
                else:
                    self._conn._close_stream(self)
            self._wake()
        await checkpoint()

    def reset(self) -> None:
        """Abort the stream both ways now (RST); pending and later calls raise :class:`StreamReset`."""
        if self._reset is None:
            self._discard()
            self._conn._reset_stream(self, "reset locally")
            self._wake()

    # --- called by the connection -------------------------------------------------------

    def _wake(self) -> None:
        self._wake_receiver()
        if self._send_lot:
            self._send_lot.unpark_all()

    def _on_data(self, data: bytes) -> None:
        if self._closed:
            # Data for a stream the application closed: tell the peer to stop.
            self._conn._reset_stream(self, "data after close")
            return
        if not self._buffer(data):
            # Over the peer's or the node's budget of unread bytes: this
            # stream gives its share back rather than the node growing.
            self._conn._reset_stream(self, "buffered-bytes budget exceeded")

    def _on_eof(self) -> None:
        self._eof = True
        self._wake_receiver()

    def _on_reset(self, reason: str) -> None:
        if self._reset is None:
            self._reset = reason
            self._chunks = None
            self._unread = 0
            self._release_all()
            self._wake()


class MuxedConnection:
    """A yamux session over one secure stream, with its tasks in its own nursery.

    Use::

        conn = MuxedConnection(secure, is_client=True, remote_peer=peer, handler=on_inbound_stream)
        await nursery.start(conn.run)   # returns once the tasks are running
        stream = await conn.open_stream()

    ``run`` returns when the connection is over (peer closed it, error,
    keepalive timeout, or :meth:`aclose`); ``conn.closed`` is then set and
    every stream is reset.
    """

    def __init__(
        self,
        secure: trio.abc.Stream,
        *,
        is_client: bool,
        remote_peer: PeerId,
        handler: InboundHandler | None = None,
        max_streams: int = 1024,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        max_window: int = yamux.MAX_WINDOW,
        label: str = "",
        resources: PeerResources | None = None,
    ) -> None:
        self._secure = secure
        # SecureStream's encrypt-and-write-without-waiting, when the stream is one.
        self._secure_write_nowait = getattr(secure, "write_nowait", None)
        self.is_client = is_client
        self.remote_peer = remote_peer
        self._handler = handler
        self._resources = resources
        self._session = YamuxSession(is_client, max_streams=max_streams, max_window=max_window)
        self._streams: dict[int, YamuxStream] = {}
        self._write_lot = ParkingLot()
        self._drain_lot = ParkingLot()
        self._idle_lot = ParkingLot()
        self._pings: dict[int, trio.Event] = {}
        self._ping_ids = itertools.count(1)
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._nursery: trio.Nursery | None = None
        self._writer_waiting = False
        self._unyielded = 0  # bytes written inline since a sender last yielded
        self._writing = False  # someone (the writer task or a stream inline) is writing
        self.label = label or remote_peer.short()
        self.closed = trio.Event()
        self.close_reason: str | None = None
        self.rtt: float | None = None
        self.going_away = False  # the peer or we sent GoAway: no new streams here

    # --- public API ---------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set() and self.close_reason is None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the connection's tasks until it ends."""
        async with self.running():
            task_status.started()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The connection's tasks run from the block's start; leaving the block waits until it ends.

        :meth:`run` in the caller's own task: a host serving thousands of
        connections saves a task and a nursery on each (about 2 KB).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                yield
        finally:
            self._nursery = None
            if self.close_reason is None:
                self.close_reason = "cancelled"
            self._reset_all(f"connection closed: {self.close_reason}")
            if self._resources is not None:
                self._resources.close()
            await trio.aclose_forcefully(self._secure)
            self.closed.set()

    async def open_stream(self) -> YamuxStream:
        """Open a new outbound stream (no protocol negotiated yet)."""
        await checkpoint()
        if not self.is_open:
            raise TransportError(f"connection to {self.label} is closed ({self.close_reason})")
        res = self._resources
        if res is not None and not res.open_stream(inbound=False):
            raise ResourceLimitExceeded(
                f"cannot open a stream to {self.label}: stream limit reached", resource="streams"
            )
        try:
            sid = self._session.open_stream()
        except ProtocolError as exc:
            if res is not None:
                res.close_stream(inbound=False)
            raise TransportError(f"cannot open a stream to {self.label}: {exc}") from None
        stream = self._streams[sid] = YamuxStream(self, sid)
        self._kick()
        return stream

    async def ping(self) -> float:
        """Round-trip time of a yamux ping, in seconds."""
        if not self.is_open:
            raise TransportError(f"connection to {self.label} is closed ({self.close_reason})")
        opaque = next(self._ping_ids) & 0xFFFFFFFF
        done = self._pings[opaque] = trio.Event()
        t0 = trio.current_time()
        self._session.ping(opaque)
        self._kick()
        try:
            await done.wait()
        finally:
            self._pings.pop(opaque, None)
        if self.close_reason is not None:
            raise TransportError(f"connection to {self.label} closed during ping")
        rtt = trio.current_time() - t0
        self._note_rtt(rtt)
        return rtt

    def go_away(self) -> None:
        """Refuse new streams from now on (existing ones continue)."""
        self.going_away = True
        if self.is_open:
            self._session.go_away()
            self._kick()

    async def aclose(self, reason: str = "closed locally") -> None:
        """Say GoAway, flush briefly, then stop every task of the connection."""
        if self._nursery is None or self.close_reason is not None:
            if self._nursery is not None:
                await self.closed.wait()
            else:
                await checkpoint()
            return
        self.close_reason = reason
        self.going_away = True
        self._session.go_away()
        self._kick()
        with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
            while self._session.pending_output and self._nursery is not None:
                await self._drain_lot.park()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self.closed.wait()

    def close_soon(self, reason: str) -> None:
        """Synchronous abort: cancel the connection's tasks (no flush)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- internals: streams -------------------------------------------------------------

    def _kick(self) -> None:
        if self._writer_waiting and not self._writing:
            self._writer_waiting = False
            self._write_lot.unpark_all()

    def _wake_senders(self) -> None:
        """Wake senders waiting for the write queue to drain, only as many as can fill it.

        Waking all of them after every write would make 64 busy streams cost
        64 task switches per megabyte, and waking one per write that freed a
        chunk's room would cost one per chunk: senders wait until the queue is
        down to half of WRITE_HIGH_WATER, so each woken one queues several
        chunks. FIFO order keeps it fair.
        """
        drain = self._drain_lot
        if drain:
            pending = self._session.pending_output
            if pending <= WRITE_HIGH_WATER // 2:
                drain.unpark(count=(WRITE_HIGH_WATER - pending) // SEND_CHUNK + 1)

    async def _write_inline(self) -> None:
        """Write queued bytes from the calling stream's task (saves a task switch per message).

        Only when nobody else is writing. Over TCP the kernel nearly always
        takes the whole write at once, and then nothing here waits; what it
        does not take is sent shielded from the caller's cancellation,
        because half a Noise frame on the wire would break every stream. That
        cannot hang forever: a peer that stops reading stops answering
        keepalive pings too, and closing the connection then aborts the
        blocked write.
        """
        session = self._session
        self._writing = True
        yield_now = False
        try:
            parts = session.take_output(WRITE_BATCH)
            rest = self._write_nowait(parts)
            if rest:
                self._unyielded = 0
                with trio.CancelScope(shield=True):
                    await self._send_rest(rest)
            else:
                # Written without waiting. Yield only every YIELD_AFTER bytes:
                # a schedule point per message costs a scheduler pass (a share
                # of a bulk transfer, and latency on every small message), while
                # this still lets other tasks run every few milliseconds.
                self._unyielded += max(sum(map(len, parts)), MIN_CHARGE)
                yield_now = self._unyielded >= YIELD_AFTER
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError) as exc:
            self._end(f"write failed: {exc or type(exc).__name__}")
        finally:
            self._writing = False
            if session.pending_output:
                self._kick()
            self._wake_senders()
        if yield_now:
            # Yield with the connection free for writing: the senders that run
            # meanwhile write their own data inline too, rather than queueing
            # it for the writer task and parking until it drains (with many
            # busy streams that cost a task switch per chunk).
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _write_nowait(self, parts: list[bytes | memoryview]) -> bytes | bytearray | memoryview:
        """Hand ``parts`` to the secure stream; returns what must still be sent with :meth:`_send_rest`."""
        if not parts:
            return b""
        if self._secure_write_nowait is not None:
            return self._secure_write_nowait(parts)
        return b"".join(parts)  # any other stream (tests over memory streams): send it all later

    async def _send_rest(self, data: bytes | bytearray | memoryview) -> None:
        if self._secure_write_nowait is not None:
            await self._secure.send_encrypted(data)  # type: ignore[attr-defined]
        else:
            await self._secure.send_all(data)

    def _prune(self, sid: int) -> None:
        if not self._session.has_stream(sid):
            self._forget(sid)

    def _forget(self, sid: int) -> YamuxStream | None:
        stream = self._streams.pop(sid, None)
        if stream is not None:
            self._release_stream(stream)
        if not self._streams and self._idle_lot:
            self._idle_lot.unpark_all()
        return stream

    async def wait_idle(self) -> None:
        """Return once the connection has no streams (or is closed)."""
        while self._streams and not self.closed.is_set():
            await self._idle_lot.park()
        await checkpoint()

    def _consumed(self, sid: int, n: int) -> None:
        session = self._session
        before = session.pending_output
        session.consume(sid, n, trio.current_time())
        if session.pending_output != before:
            self._kick()

    def _close_stream(self, stream: YamuxStream) -> None:
        if self.is_open:
            self._session.close_stream(stream.stream_id)
            self._prune(stream.stream_id)
            self._kick()

    def _reset_stream(self, stream: YamuxStream, reason: str) -> None:
        stream._on_reset(reason)
        if self.is_open:
            self._session.reset_stream(stream.stream_id)
            self._kick()
        self._forget(stream.stream_id)

    def _release_stream(self, stream: YamuxStream) -> None:
        stream._release_all()
        if self._resources is not None:
            self._resources.close_stream(stream.inbound)

    def _reset_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset(reason)
            self._release_stream(stream)
        self._streams.clear()
        if self._idle_lot:
            self._idle_lot.unpark_all()
        for ev in self._pings.values():
            ev.set()
        if self._drain_lot:
            self._drain_lot.unpark_all()

    def _note_rtt(self, rtt: float) -> None:
        self.rtt = rtt if self.rtt is None else 0.8 * self.rtt + 0.2 * rtt
        self._session.rtt = self.rtt

    # --- tasks ------------------------------------------------------------------------------

    async def _writer(self) -> None:
        session = self._session
        drain = self._drain_lot
        lot = self._write_lot
        try:
            while True:
                if self._writing or not session.pending_output:
                    self._writer_waiting = True
                    await lot.park()
                    continue
                self._writing = True
                try:
                    rest = self._write_nowait(session.take_output(WRITE_BATCH))
                    if rest:
                        await self._send_rest(rest)
                    else:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                finally:
                    self._writing = False
                if drain:
                    self._wake_senders()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError) as exc:
            self._end(f"write failed: {exc or type(exc).__name__}")

    async def _reader(self) -> None:
        session = self._session
        receive = self._secure.receive_some
        streams = self._streams
        try:
            while True:
                data = await receive()
                if not data:
                    self._end("peer closed the connection")
                    return
                try:
                    events = session.receive_data(data)
                except ProtocolError as exc:
                    self._note("protocol_error", "closing connection on protocol error", peer=self.label, reason=exc)
                    self.close_reason = f"protocol error: {exc}"
                    self._kick()  # flush the GoAway the session queued
                    with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                        while session.pending_output:
                            await self._drain_lot.park()
                    self._end(self.close_reason)
                    return
                for ev in events:
                    if type(ev) is DataReceived:
                        stream = streams.get(ev.stream_id)
                        if stream is not None:
                            stream._on_data(ev.data)
                    elif type(ev) is WindowUpdated:
                        stream = streams.get(ev.stream_id)
                        if stream is not None and stream._send_lot:
                            stream._send_lot.unpark_all()
                    elif type(ev) is StreamOpened:
                        self._on_inbound(ev.stream_id)
                    elif type(ev) is StreamEnded:
                        stream = streams.get(ev.stream_id)
                        if stream is not None:
                            stream._on_eof()
                            self._prune(ev.stream_id)
                    elif type(ev) is StreamResetByPeer:
                        stream = self._forget(ev.stream_id)
                        if stream is not None:
                            stream._on_reset("reset by peer")
                    elif type(ev) is PongReceived:
                        waiter = self._pings.get(ev.opaque)
                        if waiter is not None:
                            waiter.set()
                    elif type(ev) is GoAwayReceived:
                        self.going_away = True
                        log.debug("peer sent go-away peer=%s code=%d", self.label, ev.code)
                    elif type(ev) is StreamAccepted:
                        pass
                if session.pending_output:
                    self._kick()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError) as exc:
            self._end(f"read failed: {exc or type(exc).__name__}")

    def _on_inbound(self, sid: int) -> None:
        res = self._resources
        if res is not None and not res.open_stream(inbound=True):
            self._session.reset_stream(sid)  # refused: RST, its frames are skipped from now on
            return
        stream = self._streams[sid] = YamuxStream(self, sid, inbound=True)
        if self._handler is None or self._nursery is None:
            self._reset_stream(stream, "no handler")
            return
        self._nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: YamuxStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        except Exception as exc:  # noqa: BLE001 - a handler failing must not take the connection down
            self._note(
                "handler_failed", "stream handler failed", peer=self.label, stream=stream.stream_id, exc=repr(exc)
            )
            stream.reset()

    async def _keepalive(self) -> None:
        # A first ping right away measures the RTT that window auto-tuning needs.
        interval = self._keepalive_interval
        first = True
        while True:
            if not first:
                await trio.sleep(interval)
            first = False
            timed_out = True
            with trio.move_on_after(self._keepalive_timeout):
                try:
                    await self.ping()
                except TransportError:
                    return  # the connection is ending anyway
                timed_out = False
            if timed_out:
                self._note("keepalive_timeout", "closing connection: keepalive timeout", peer=self.label)
                self._end(f"keepalive timeout ({self._keepalive_timeout:g}s)")
                return
            if not math.isfinite(interval):
                return

    def _note(self, kind: str, message: str, **fields: Any) -> None:
        """Count and log a peer's misbehaviour: rate-limited through the resource manager when there is one."""
        if self._resources is not None:
            self._resources.rm.note_refusal("peer", kind, message, **fields)
        else:
            log.warning("%s %s", message, " ".join(f"{k}={v}" for k, v in fields.items()))

    def _end(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
