"""The QUIC transport the host uses: listen on ``/udp/P/quic-v1``, dial such addresses.

Unlike TCP, what a QUIC dial or accept produces is already secure and
multiplexed, so the host skips its upgrader for it and gets a
:class:`~.connection.QuicMuxedConnection` whose peer is proven by the TLS
certificate. Dials go out from the listening socket of the same address
family when there is one: the peer then sees our listen port as our source
(identify's observed address is right, and NAT traversal builds on it).
A dial-only host (``ocf ping``) opens one ephemeral socket per family.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import ssl
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicProtocolVersion

from ...errors import MultiaddrError, PeerUnreachable, TransportError
from ...identity import Identity, Multiaddr, PeerId
from ..resources import HandshakeSlot, ResourceManager
from ..taskstatus import StartedOnce
from ..tcp import _expand_wildcard
from .connection import QuicMuxedConnection
from .addr import is_quic_addr, quic_multiaddr
from .endpoint import QuicEndpoint
from .tls import ALPN, make_certificate

#: Receive credit per stream; also the initial connection-wide credit is 16 of these.
STREAM_WINDOW = 1 << 20
#: Payload per datagram: fits a 1500-byte MTU with IPv6 and UDP headers and some tunnel overhead.
MAX_DATAGRAM_SIZE = 1350
IDLE_TIMEOUT = 60.0

OnInbound = Callable[[QuicMuxedConnection], Awaitable[None]]


class QuicTransport:
    """Owns the node's UDP endpoints and its libp2p TLS certificate."""

    def __init__(
        self,
        identity: Identity,
        *,
        resources: ResourceManager,
        handshake_timeout: float = 10.0,
        retry: str = "auto",
        stream_window: int = STREAM_WINDOW,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.identity = identity
        self.resources = resources
        self.handshake_timeout = handshake_timeout
        self.retry = retry
        self.stream_window = stream_window
        self.idle_timeout = idle_timeout
        self._cert = make_certificate(identity)
        self.endpoints: list[QuicEndpoint] = []
        # by address family; negative keys: ephemeral sockets for what a bound listener cannot reach
        self._dialers: dict[int, QuicEndpoint] = {}
        self._listen_ips: dict[QuicEndpoint, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
        self._nursery: trio.Nursery | None = None
        self._on_inbound: OnInbound | None = None

    def can_dial(self, addr: Multiaddr) -> bool:
        return is_quic_addr(addr)

    def make_config(self, is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            certificate=self._cert.certificate,
            private_key=self._cert.private_key,
            verify_mode=ssl.CERT_NONE,  # the libp2p extension is checked instead (see .tls)
            idle_timeout=self.idle_timeout,
            max_data=16 * self.stream_window,
            max_stream_data=self.stream_window,
            max_datagram_size=MAX_DATAGRAM_SIZE,
            supported_versions=[QuicProtocolVersion.VERSION_1],
        )

    def _endpoint(self, sock: socket.socket, on_inbound: bool) -> QuicEndpoint:
        return QuicEndpoint(
            sock,
            self.make_config,
            resources=self.resources,
            handshake_timeout=self.handshake_timeout,
            stream_window=self.stream_window,
            on_inbound=self._serve_inbound if on_inbound else None,
            retry=self.retry,
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        on_inbound: OnInbound,
        nursery: trio.Nursery,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind ``host:port`` (UDP), report the listen multiaddrs, serve until cancelled."""
        self._nursery = nursery
        self._on_inbound = on_inbound
        wildcard = host in ("", "*", "0.0.0.0", "::")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("0.0.0.0" if wildcard and family == socket.AF_INET else host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise TransportError(
                    f"cannot listen on {host}:{port}/udp (--udpport): address already in use"
                ) from None
            raise TransportError(f"cannot listen on {host}:{port}/udp (--udpport): {exc.strerror or exc}") from None
        endpoint = self._endpoint(sock, on_inbound=True)
        self.endpoints.append(endpoint)
        self._listen_ips[endpoint] = None if wildcard else ipaddress.ip_address(host)
        self._dialers.setdefault(family, endpoint)
        addrs = [a for a in (quic_multiaddr(s) for s in _expand_wildcard(sock.getsockname()[:2])) if a is not None]
        try:
            with sock:
                await endpoint.run(nursery, task_status=_Reporting(task_status, addrs))
        finally:
            endpoint.close_all()
            self._listen_ips.pop(endpoint, None)
            if self._dialers.get(family) is endpoint:
                del self._dialers[family]

    def start_dialing(self, nursery: trio.Nursery) -> None:
        """Where dial-only sockets run (the host's nursery)."""
        if self._nursery is None:
            self._nursery = nursery

    async def _dialer(self, family: int, target: str) -> QuicEndpoint:
        """The socket to dial ``target`` from: the listener's when it can reach it, else an ephemeral one."""
        endpoint = self._dialers.get(family)
        if endpoint is not None and self._reaches(endpoint, target):
            return endpoint
        endpoint = self._dialers.get(-family)  # the ephemeral one, for targets a bound listener cannot reach
        if endpoint is not None:
            return endpoint
        if self._nursery is None:
            raise TransportError("QUIC transport is not running")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        endpoint = self._endpoint(sock, on_inbound=False)
        self._dialers[family if family not in self._dialers else -family] = endpoint
        await self._nursery.start(self._run_dialer, endpoint, sock)
        return endpoint

    def _reaches(self, endpoint: QuicEndpoint, target: str) -> bool:
        """A listener bound to one address sends from it: fine for a wildcard or a loopback pair only."""
        bound = self._listen_ips.get(endpoint)
        if bound is None:
            return True
        try:
            return ipaddress.ip_address(target.split("%", 1)[0]).is_loopback == bound.is_loopback
        except ValueError:
            return False

    async def _run_dialer(self, endpoint: QuicEndpoint, sock: socket.socket, *, task_status: Any) -> None:
        status = StartedOnce(task_status)
        del task_status  # the endpoint outlives the dial that opened it: see StartedOnce
        try:
            with sock:
                assert self._nursery is not None
                await endpoint.run(self._nursery, task_status=status)
        finally:
            endpoint.close_all()

    # --- dialing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connect(
        self,
        addr: Multiaddr,
        expected: PeerId | None,
        timeout: float,  # noqa: ASYNC109 - bounds the dial and handshake only, not the connection's life
    ) -> AsyncIterator[QuicMuxedConnection]:
        """A handshaken connection to ``addr`` for the duration of the block (its driver runs meanwhile)."""
        if not is_quic_addr(addr):
            raise PeerUnreachable(f"{addr}: not a QUIC address")
        kind, host, port = _udp_target(addr)
        family = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6, "dns4": socket.AF_INET, "dns6": socket.AF_INET6}
        try:
            with trio.fail_after(timeout):
                infos = await trio.socket.getaddrinfo(
                    host, port, family=family.get(kind, socket.AF_UNSPEC), type=socket.SOCK_DGRAM
                )
        except (OSError, trio.TooSlowError, UnicodeError) as exc:
            raise PeerUnreachable(f"{addr}: cannot resolve: {exc}") from None
        if not infos:
            raise PeerUnreachable(f"{addr}: resolves to nothing")
        fam, _, _, _, sockaddr = infos[0]
        endpoint = await self._dialer(int(fam), str(sockaddr[0]))
        conn = endpoint.dial((str(sockaddr[0]), int(sockaddr[1])), expected)
        failure: TransportError | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.drive)
            with trio.move_on_after(timeout) as scope:
                await conn.handshake_done.wait()
            if scope.cancelled_caught:
                failure = PeerUnreachable(f"dial {addr} timed out after {timeout:g}s")
            elif conn.handshake_error is not None:
                failure = conn.handshake_error
                if conn.quic.tls._peer_certificate is None:  # never got as far as the peer's certificate
                    failure = PeerUnreachable(f"dial {addr} failed: {conn.close_reason or failure}")
            if failure is None:
                try:
                    yield conn
                finally:
                    conn.close_soon("connection done")
                    nursery.cancel_scope.cancel()
            else:
                conn.close_soon("handshake failed")
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def punch(self, addr: Multiaddr, payload: bytes) -> None:
        """Send one datagram to ``addr`` from the socket our dials leave from (DCUtR over QUIC).

        It opens our NAT's mapping towards the peer, so that the peer's QUIC
        dial to our address gets through; the peer's endpoint drops it.
        """
        if not is_quic_addr(addr) or addr.parts[0][0] not in ("ip4", "ip6"):
            raise PeerUnreachable(f"{addr}: not an IP QUIC address")
        kind, host, port = _udp_target(addr)
        family = socket.AF_INET6 if kind == "ip6" else socket.AF_INET
        endpoint = await self._dialer(family, host)
        endpoint.send_datagram(payload, (host, port))

    # --- inbound ----------------------------------------------------------------------------

    async def _serve_inbound(self, conn: QuicMuxedConnection, slot: HandshakeSlot) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.drive)
            try:
                with trio.CancelScope(deadline=slot.deadline) as scope:
                    slot.cancel_scope = scope  # eviction for a newcomer cancels it
                    await conn.handshake_done.wait()
            finally:
                slot.release()
            if conn.remote_peer is None or conn.handshake_error is not None:
                reason = "timed out" if scope.cancelled_caught else str(conn.handshake_error or "failed")
                self.resources.note_refusal(
                    "transient", "handshake_failed", "inbound QUIC handshake failed", remote=conn.label, error=reason
                )
                conn.close_soon("handshake failed")
                nursery.cancel_scope.cancel()
                return
            try:
                assert self._on_inbound is not None
                await self._on_inbound(conn)
            finally:
                conn.close_soon("connection done")
                nursery.cancel_scope.cancel()

    def stats(self) -> dict[str, int]:
        """Counters summed over every endpoint."""
        total: dict[str, int] = {}
        for endpoint in {id(e): e for e in [*self.endpoints, *self._dialers.values()]}.values():
            for name, value in attrs.asdict(endpoint.stats).items():
                total[name] = total.get(name, 0) + value
        return total


class _Reporting:
    """Turns the endpoint's ``started()`` into ``started(addrs)`` for the host."""

    def __init__(self, status: Any, addrs: list[Multiaddr]) -> None:
        self._status = status
        self._addrs = addrs

    def started(self, value: Any = None) -> None:
        self._status.started(self._addrs)


def _udp_target(addr: Multiaddr) -> tuple[str, str, int]:
    """``(kind, host, port)`` of a QUIC address (kind: ip4, ip6, dns4, ...); a bad port is unreachable."""
    try:
        port = int(addr.value_for("udp") or "")
    except (ValueError, MultiaddrError):
        raise PeerUnreachable(f"{addr}: bad UDP port") from None
    return addr.parts[0][0], addr.parts[0][1] or "", port
