"""One UDP socket carrying many QUIC connections: demultiplexing and the hostile-peer gate.

Every datagram is routed by its destination connection ID. A datagram for no
known connection can only start one: it must be a long-header Initial of at
least 1200 bytes (RFC 9000 pads client Initials so a server never answers
more than it was sent), for QUIC v1. Anything else is dropped and counted;
the input path (:meth:`QuicEndpoint.datagram_received`) never raises, and
nothing reaches aioquic's packet parser before the header has been read with
a bound on every length.

Before a new connection gets any state:

- **address validation.** With ``retry="always"``, or with ``"auto"`` once
  half the node's handshake slots are taken (a flood), a token-less Initial
  gets a stateless Retry: the client must echo a token (AES-GCM sealed, tied
  to its address, 30 s) proving it receives at the source address it claims.
  Spoofed sources never get past that, and cost one small packet each.
- **handshake budget.** A pending-handshake slot from the resource manager
  (node-wide and per source address), under one deadline for the whole
  handshake, as for TCP.
- **amplification.** aioquic enforces the 3x limit on unvalidated paths; a
  Retry is smaller than the Initial that asked for it.

The socket is non-blocking and written synchronously: UDP send either takes
the datagram or fails at once (full buffer), and QUIC's loss recovery covers
a dropped datagram, so nothing here awaits to send.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

import attrs
import trio
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.packet import (
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from ..resources import HandshakeSlot, ResourceManager, ip_key
from .addr import quic_multiaddr
from .connection import QuicMuxedConnection
from .machine import Libp2pQuicConnection

if TYPE_CHECKING:
    from aioquic.quic.configuration import QuicConfiguration

log = logging.getLogger("ocf.transport.quic")

CID_LENGTH = 8
MIN_INITIAL = 1200
MAX_DATAGRAM = 65535
#: Datagrams read per wakeup before other tasks get a turn.
RECEIVE_BATCH = 64
RETRY_MODES = ("auto", "always", "never")
SOCKET_BUFFER = 4 << 20

InboundCallback = Callable[[QuicMuxedConnection, HandshakeSlot], Awaitable[None]]
ConfigFactory = Callable[[bool], "QuicConfiguration"]


@attrs.define
class EndpointStats:
    """Counters for /metrics and tests (what came in, what was refused and why)."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    routed: int = 0  # to a known connection
    dropped_malformed: int = 0
    dropped_unknown: int = 0
    dropped_short_initial: int = 0
    version_negotiations: int = 0
    retries_sent: int = 0
    invalid_tokens: int = 0
    refused_handshakes: int = 0
    send_errors: int = 0
    machine_errors: int = 0
    accepted: int = 0


def client_address(addr: Any) -> NetworkAddress:
    """``(host, port)`` of a recvfrom address, IPv4-mapped IPv6 unmapped."""
    host, port = addr[0], int(addr[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


class QuicEndpoint:
    """One bound UDP socket: the listener's, and the dialer's when dialing from the listen port."""

    def __init__(
        self,
        sock: socket.socket,
        make_config: ConfigFactory,
        *,
        resources: ResourceManager,
        handshake_timeout: float,
        stream_window: int,
        on_inbound: InboundCallback | None = None,
        retry: str = "auto",
    ) -> None:
        if retry not in RETRY_MODES:
            raise ValueError(f"retry must be one of {RETRY_MODES}")
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # A burst of a congestion window's worth of datagrams must fit while the
            # receiving task waits for its turn; the kernel caps this at its maximum.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.sock = sock
        self._raw = sock
        self._make_config = make_config
        self.resources = resources
        self.handshake_timeout = handshake_timeout
        self.stream_window = stream_window
        self._on_inbound = on_inbound
        self.retry = retry
        self._retry_tokens = QuicRetryTokenHandler()
        self._conns: dict[bytes, QuicMuxedConnection] = {}
        self._live: set[QuicMuxedConnection] = set()
        self._dirty: dict[QuicMuxedConnection, None] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = EndpointStats()
        self.local_addr: NetworkAddress = client_address(sock.getsockname())

    @property
    def connections(self) -> int:
        return len(self._live)

    # --- DatagramSink -------------------------------------------------------------------------

    def send_datagram(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            self._raw.sendto(data, self._sockaddr(addr))
        except (BlockingIOError, InterruptedError):
            self.stats.send_errors += 1  # a full socket buffer drops it; loss recovery resends
            return
        except OSError as exc:
            self.stats.send_errors += 1
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EINVAL):
                log.debug("udp send failed addr=%s err=%s", addr, exc)
            return
        self.stats.datagrams_out += 1
        self.stats.bytes_out += len(data)

    def register_cid(self, cid: bytes, conn: QuicMuxedConnection) -> None:
        self._conns[cid] = conn

    def unregister_cid(self, cid: bytes) -> None:
        self._conns.pop(cid, None)

    def connection_done(self, conn: QuicMuxedConnection) -> None:
        self._live.discard(conn)  # its connection IDs were unregistered by the connection itself

    def _sockaddr(self, addr: NetworkAddress) -> tuple[str, int]:
        if self.sock.family == socket.AF_INET6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return (addr[0], addr[1])

    # --- receiving ------------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Read the socket until cancelled; new inbound connections are served in ``nursery``."""
        self._nursery = nursery
        task_status.started()
        raw = self._raw
        while True:
            await trio.lowlevel.wait_readable(raw)
            for _ in range(RECEIVE_BATCH):
                try:
                    data, addr = raw.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP errors surface here on some systems; the socket is fine
                self.datagram_received(data, client_address(addr))
            # Hand received stream data to the tasks waiting for it, let them run,
            # then send: a reply written meanwhile carries this batch's ACK in its
            # own packet (see QuicMuxedConnection.flush), and the reply does not
            # wait behind building an ACK-only packet.
            for conn in list(self._dirty):
                try:
                    conn.deliver()
                except Exception as exc:  # noqa: BLE001 - see flush_dirty
                    self._dirty.pop(conn, None)
                    self._machine_failed(conn, exc)
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.flush_dirty()

    def flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            try:
                conn.flush()
            except Exception as exc:  # noqa: BLE001 - a machine bug ends that connection, not the endpoint
                self._machine_failed(conn, exc)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """Route one datagram; never raises (counts what it drops)."""
        stats = self.stats
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except (ValueError, BufferReadError):
            stats.dropped_malformed += 1
            return
        conn = self._conns.get(header.destination_cid)
        if conn is not None:
            stats.routed += 1
            try:
                conn.feed(data, addr, trio.current_time())
            except Exception as exc:  # noqa: BLE001 - see flush_dirty
                self._machine_failed(conn, exc)
                return
            self._dirty[conn] = None
            return
        if header.packet_type != QuicPacketType.INITIAL or header.version is None:
            stats.dropped_unknown += 1
            return
        if header.version != QuicProtocolVersion.VERSION_1:
            if len(data) >= MIN_INITIAL:
                stats.version_negotiations += 1
                self.send_datagram(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=[QuicProtocolVersion.VERSION_1],
                    ),
                    addr,
                )
            else:
                stats.dropped_short_initial += 1
            return
        if len(data) < MIN_INITIAL:
            stats.dropped_short_initial += 1
            return
        if self._on_inbound is None or self._nursery is None:
            stats.dropped_unknown += 1  # a dial-only socket accepts no connections
            return
        self._new_inbound(data, addr, header)

    def _retry_required(self) -> bool:
        if self.retry == "always":
            return True
        if self.retry == "never":
            return False
        usage = self.resources.system.usage["handshakes"]
        return usage * 2 >= self.resources.limits.handshakes

    def _new_inbound(self, data: bytes, addr: NetworkAddress, header: Any) -> None:
        stats = self.stats
        original_dcid: bytes = header.destination_cid
        retry_scid: bytes | None = None
        if header.token:
            try:
                original_dcid = self._retry_tokens.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token, now=trio.current_time()
                )
            except (ValueError, BufferReadError):
                stats.invalid_tokens += 1
                self.resources.note_refusal("transient", "quic_invalid_token", "QUIC Initial with an invalid token")
                return
            retry_scid = header.destination_cid
        elif self._retry_required():
            scid = os.urandom(CID_LENGTH)
            stats.retries_sent += 1
            self.send_datagram(
                encode_quic_retry(
                    version=header.version,
                    source_cid=scid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=self._retry_tokens.create_token(
                        address=addr,
                        original_destination_connection_id=header.destination_cid,
                        retry_source_connection_id=scid,
                        now=trio.current_time(),
                    ),
                ),
                addr,
            )
            return
        slot = self.resources.handshake(ip_key(quic_multiaddr(addr)), self.handshake_timeout)
        if slot is None:
            stats.refused_handshakes += 1
            return
        quic = Libp2pQuicConnection(
            stream_window=self.stream_window,
            configuration=self._make_config(False),
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        conn = QuicMuxedConnection(self, quic, addr, is_client=False)
        self._live.add(conn)
        conn.register(header.destination_cid)
        conn.register(quic.host_cid)
        try:
            conn.feed(data, addr, trio.current_time())
        except Exception as exc:  # noqa: BLE001
            slot.release()
            self._machine_failed(conn, exc)
            return
        self._dirty[conn] = None
        stats.accepted += 1
        assert self._nursery is not None and self._on_inbound is not None
        self._nursery.start_soon(self._on_inbound, conn, slot)

    def _machine_failed(self, conn: QuicMuxedConnection, exc: Exception) -> None:
        self.stats.machine_errors += 1
        log.warning("quic connection failed in aioquic addr=%s exc=%r", conn.addr, exc, exc_info=True)
        conn._terminate(f"internal error ({type(exc).__name__})")

    # --- dialing ------------------------------------------------------------------------------

    def dial(self, addr: NetworkAddress, expected: Any) -> QuicMuxedConnection:
        """Start a client connection to ``addr`` (the caller drives and awaits its handshake)."""
        quic = Libp2pQuicConnection(stream_window=self.stream_window, configuration=self._make_config(True))
        conn = QuicMuxedConnection(self, quic, addr, is_client=True, expected=expected)
        self._live.add(conn)
        conn.register(quic.host_cid)
        quic.connect(addr, now=trio.current_time())
        return conn

    def close_all(self) -> None:
        for conn in list(self._live):
            conn.close_soon("endpoint closing")
