"""The Host: listeners, dialing, one secure muxed connection per peer, protocol handlers.

``async with open_host(identity, config) as host:`` is what the node enters
first; everything else talks to peers through it (see docs/internals.md)::

    host.set_stream_handler("/ocf/dnt/sync/1.0.0", handler)   # async handler(stream)
    stream = await host.new_stream(peer, "/ocf/dnt/sync/1.0.0")  # dials if needed
    await host.connect(Multiaddr.parse("/ip4/1.2.3.4/tcp/43905/p2p/12D3KooW…"))

A raw connection becomes a peer connection through libp2p's "upgrade"
(:mod:`ocf.transport.upgrade`: Noise, then yamux, under the private
network's cipher if there is one); QUIC connections come secured and
multiplexed (:mod:`ocf.transport.quic`). Then every stream negotiates its own
protocol with multistream-select.

Connection manager rules, and why:

- **One connection per peer.** Dials to a peer we are connected to, or are
  already dialing, reuse that connection or wait for that dial.
- **Simultaneous dial tie-break.** When both peers dial each other at once,
  each ends up with two connections. Both sides keep the one *initiated by the
  peer with the smaller peer ID* (byte order), which both can compute without
  talking (the newest, if the same peer initiated both). The other one is told
  GoAway (no new streams) and closed when its streams are done, so nothing in
  flight is cut.
- **Limits** come from :class:`~ocf.config.Config` through the resource
  manager (:mod:`ocf.transport.resources`): connections (in, out, per peer,
  per IP), pending handshakes (system and per IP, under one deadline for the
  whole upgrade), streams and received-but-unread bytes (system and per
  peer). Excess inbound connections are closed before any crypto is spent;
  refusals are counted for /metrics and logged once per interval.
- **Isolation.** Every connection runs in its own task in the host's nursery,
  with its own nursery for its streams; an error on one connection is logged
  and closes that connection only.
- **Dial policy.** Addresses the operator gives (:meth:`Host.connect`) are
  dialed as given; addresses peers tell us (:meth:`Host.add_addrs`, identify)
  only where :mod:`ocf.transport.dialpolicy` allows, at most
  ``max_addrs_per_peer`` of them per peer.
- **Typed failures.** A dial fails with a :class:`~ocf.errors.TransportError`
  subclass, never with the ``ExceptionGroup`` a nursery inside the
  transports wraps it in: every ``except TransportError`` relies on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Protocol
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import attrs
import trio

from .. import log as logfmt
from ..config import DEFAULT_UDP_PORT, Config
from ..errors import (
    HandshakeError,
    MultiaddrError,
    PeerUnreachable,
    PrivateNetworkRefused,
    ProtocolNotSupported,
    RelayRefused,
    TransportError,
    transport_failure,
    transport_errors_unwrapped,
)
from ..identity import Identity, Multiaddr, PeerId
from .dialpolicy import DialPolicy, is_wildcard, parse_cidrs, resolve_learned
from .memory import MemoryNetwork, MemoryTransport
from .muxer import MuxedConnection, MuxedStream
from .quic import QuicMuxedConnection, QuicTransport, is_quic_addr
from .resources import HandshakeSlot, Limits, ResourceManager, ip_key
from .taskstatus import StartedOnce
from .tcp import RawConn, TcpTransport, is_tcp_addr
from .upgrade import Libp2pUpgrader, Upgrader, default_upgrader

log = logging.getLogger("ocf.transport")

StreamHandler = Callable[[MuxedStream], Awaitable[None]]
#: Asked for a peer's addresses when a stream is wanted and none is known (the DHT answers).
PeerResolver = Callable[[PeerId], Awaitable[Sequence[Multiaddr]]]
#: Told what identify learned about a peer (the DHT learns which peers serve it).
IdentifyListener = Callable[[PeerId, "PeerInfo"], None]

SUBSCRIBER_QUEUE = 1024
MAX_OPERATOR_ADDRS = 1024  # addresses the operator gave us, remembered as trusted for redials
RETIRE_GRACE = 30.0  # seconds a tie-break loser may keep serving its open streams
SHUTDOWN_GRACE = 2.0
PEER_LOG_BURST = 20  # connect/disconnect lines per refusal-log interval
QUIC_FAILURE_MEMORY = 600.0  # seconds a failed QUIC dial puts TCP first for that peer
MAX_QUIC_FAILURES = 4096  # peers remembered that way (oldest forgotten first)
# Addresses only identify gave outlive the peer's last connection this long, for this many peers
# (oldest forgotten first), as libp2p's "recently connected" TTL: enough to redial a peer that just
# left (the DHT answers with them), bounded against identities made for one connection each.
RECENTLY_CONNECTED_FOR = 600.0
MAX_RECENTLY_CONNECTED = 1024
DIRECT_BUDGET_WITH_RELAY = 2.0  # seconds for all direct addresses, together, of a peer that also has relay addresses


@attrs.frozen
class PeerEvent:
    """A change of connectivity: ``kind`` is ``"connected"`` or ``"disconnected"``."""

    kind: str
    peer: PeerId


@attrs.define(eq=False)
class Connection:
    """One upgraded connection to a peer."""

    muxed: MuxedConnection | QuicMuxedConnection
    peer: PeerId
    outbound: bool
    initiator: PeerId
    remote_addr: Multiaddr | None
    local_addr: Multiaddr | None
    transport: str
    opened_at: float = attrs.field(factory=time.time)
    ip: str | None = None  # resource-manager scope of an inbound connection's source

    @property
    def usable(self) -> bool:
        """Open and accepting new streams."""
        return self.muxed.is_open and not self.muxed.going_away

    @property
    def relayed(self) -> bool:
        """Carried by a circuit relay: limited in time and bytes, so a direct connection is preferred."""
        return self.transport == "relay"


@attrs.define
class PeerInfo:
    """What identify told us about a peer."""

    protocols: list[str] = attrs.field(factory=list)
    agent_version: str = ""
    protocol_version: str = ""
    observed_addr: Multiaddr | None = None


class DialTransport(Protocol):
    """A transport that only dials (the circuit relay client): ``connect`` yields a :class:`RawConn`."""

    def connect(self, addr: Multiaddr, timeout: float) -> contextlib.AbstractAsyncContextManager[RawConn]: ...


class CircuitTransport(DialTransport, Protocol):
    """The circuit relay client, as the host uses it."""

    def limit_reason(self, peer: PeerId) -> str | None: ...


class Host:
    """A libp2p-style host. Build with :func:`open_host`; methods are safe to call from any task of the run."""

    def __init__(
        self,
        identity: Identity,
        config: Config,
        *,
        memory_network: MemoryNetwork | None = None,
        upgrader: Upgrader | None = None,
    ) -> None:
        if upgrader is None:
            upgrader = default_upgrader(identity, config)
        self.identity = identity
        self.peer_id: PeerId = identity.peer_id
        self.config = config
        self.listen_addrs: list[Multiaddr] = []
        self.upgrader = upgrader
        self.resources = ResourceManager(Limits.from_config(config), log_interval=config.refusal_log_interval)
        # Connect/disconnect lines are worth having, but a peer churning
        # through fresh identities must not turn them into a log flood.
        self._peer_log = logfmt.RateLimitedLog(log, config.refusal_log_interval, burst=PEER_LOG_BURST)
        self._tcp = TcpTransport(
            ws=config.ws,
            handshake_timeout=config.handshake_timeout,
            ws_max_message=config.ws_max_message,
            resources=self.resources,
            message_timeout=config.message_timeout,
        )
        self._memory = MemoryTransport(memory_network) if memory_network is not None else None
        # QUIC is secure and multiplexed by itself: its connections skip the upgrader (see _outbound_quic).
        self._quic = (
            QuicTransport(
                identity, resources=self.resources, handshake_timeout=config.handshake_timeout, retry=config.quic_retry
            )
            if config.quic and config.network_key is None
            else None
        )
        self._circuit: CircuitTransport | None = None  # circuit relay client (ocf.transport.relay), once attached
        self._handlers: dict[str, StreamHandler] = {}
        self._conns: dict[PeerId, list[Connection]] = {}
        self._dials: dict[PeerId, trio.Event] = {}
        self._addrs: dict[PeerId, list[Multiaddr]] = {}
        self._operator_addrs: set[Multiaddr] = set()
        self._quic_failed: dict[PeerId, float] = {}
        self.dial_policy = DialPolicy(allow=parse_cidrs(config.dial_allow))
        for text in config.bootstrap_addrs:  # the operator's peers are in this node's networks
            with contextlib.suppress(MultiaddrError):
                self.dial_policy.note_home_addr(Multiaddr.parse(text))
        if config.mode == "local":
            self.dial_policy.note_home("127.0.0.1")
        if config.public_addr:
            self.dial_policy.note_home(config.public_addr)
        # What identify told us: of a peer no layer above keeps (see _kept), dropped with its last
        # connection. Kept for good, every identity that ever connected left its answer here (up to
        # 64 KiB of protocol names).
        self._info: dict[PeerId, PeerInfo] = {}
        # Peers whose addresses a layer above keeps (node table, membership, gateway, the resolver,
        # our own dials). Those only identify gave stay a while after the peer's last connection
        # (_recent: when it ended), then go.
        self._kept: set[PeerId] = set()
        self._recent: dict[PeerId, float] = {}
        self._keep_duplicates: dict[PeerId, int] = {}
        self._resolver: PeerResolver | None = None
        self.identify_listeners: list[IdentifyListener] = []
        self._subscribers: set[trio.MemorySendChannel[PeerEvent]] = set()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._listen_scope: trio.CancelScope | None = None
        self._quic_listen_scope = trio.CancelScope()
        self._closing = False
        self._dialing = True  # False once the node stops: see stop_dialing
        self.stats = {"inbound_refused": 0, "handshake_failures": 0, "dials": 0, "dials_refused_stopping": 0}

    def __repr__(self) -> str:
        return f"<Host {self.peer_id.short()} conns={sum(len(v) for v in self._conns.values())}>"

    # --- handlers --------------------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol`` on inbound streams; the stream is closed when ``handler`` returns."""
        self._handlers[protocol] = handler

    def pnet_stats(self) -> dict[str, int] | None:
        """The private network's connection counters (``--network-key``), or None outside one."""
        upgrader = self.upgrader
        if isinstance(upgrader, Libp2pUpgrader) and upgrader.protector is not None:
            return dict(upgrader.protector.stats)
        return None

    def quic_stats(self) -> dict[str, int] | None:
        """The QUIC endpoints' datagram counters, or None when QUIC is off."""
        return self._quic.stats() if self._quic is not None else None

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return list(self._handlers)

    def set_peer_resolver(self, resolver: PeerResolver | None) -> None:
        """Where to look up a peer with no known address before giving up on it (e.g. the DHT)."""
        self._resolver = resolver

    # --- peers -------------------------------------------------------------------------------

    def is_connected(self, peer: PeerId) -> bool:
        return any(c.muxed.is_open for c in self._conns.get(peer, ()))

    def connected_peers(self) -> list[PeerId]:
        return [p for p, conns in self._conns.items() if any(c.muxed.is_open for c in conns)]

    async def wait_connected(self, peer: PeerId) -> None:
        """Return once ``peer`` is connected (e.g. the far side of a dial that just completed)."""
        while not self.is_connected(peer):
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def connections(self, peer: PeerId | None = None) -> list[Connection]:
        if peer is not None:
            return list(self._conns.get(peer, ()))
        return [c for conns in self._conns.values() for c in conns]

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        """Addresses we know for ``peer`` (dialed, or from identify, or added), without ``/p2p``."""
        return list(self._addrs.get(peer, ()))

    def peer_info(self, peer: PeerId) -> PeerInfo | None:
        return self._info.get(peer)

    def add_addrs(self, peer: PeerId, addrs: Sequence[Multiaddr | str], *, keep: bool = True) -> None:
        """Remember addresses a peer published (node table, identify) so ``new_stream`` can dial it.

        These are learned addresses: the ones the dial policy refuses are
        dropped here (and logged at debug), the rest are judged again when
        dialed (a name is judged by what it resolves to). With ``keep``
        they stay until :meth:`forget_addrs`; without (identify: any peer
        that connects says them), they stay RECENTLY_CONNECTED_FOR after
        the peer's last connection, for at most MAX_RECENTLY_CONNECTED
        peers: identities made for one connection each leave a bounded trace.
        """
        for addr in addrs:
            try:
                ma = Multiaddr.parse(addr) if isinstance(addr, str) else addr
            except MultiaddrError:
                continue
            self._remember_addr(peer, ma, keep=keep)

    def forget_addrs(self, peer: PeerId) -> None:
        """Drop what we learned about a peer we are not connected to (the node table pruned it)."""
        self._kept.discard(peer)
        self._recent.pop(peer, None)
        if not self.is_connected(peer):
            self._addrs.pop(peer, None)
            self._info.pop(peer, None)

    def _remember_addr(self, peer: PeerId, addr: Multiaddr, *, operator: bool = False, keep: bool = True) -> None:
        if peer == self.peer_id:
            return
        addr = addr.without_p2p()
        if not self._can_dial(addr):
            return
        if operator:
            if len(self._operator_addrs) < MAX_OPERATOR_ADDRS:
                self._operator_addrs.add(addr)
        elif addr not in self._operator_addrs:
            refusal = self.dial_policy.refusal(addr)
            if refusal is not None:
                log.debug("not dialing learned address %s", logfmt.kv(peer=peer.short(), addr=addr, reason=refusal))
                return
        known = self._addrs.setdefault(peer, [])
        if keep:
            self._kept.add(peer)
            self._recent.pop(peer, None)
        if addr in known:
            return
        known.append(addr)
        del known[: -self.config.max_addrs_per_peer]

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[PeerEvent]]:
        """Receive :class:`PeerEvent`\\ s while the block runs (a slow subscriber drops events, logged)."""
        send, recv = trio.open_memory_channel[PeerEvent](SUBSCRIBER_QUEUE)
        self._subscribers.add(send)
        try:
            async with recv:
                yield recv
        finally:
            self._subscribers.discard(send)
            send.close()

    def _emit(self, kind: str, peer: PeerId) -> None:
        event = PeerEvent(kind, peer)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("peer event dropped: subscriber too slow %s", logfmt.kv(kind=kind, peer=peer.short()))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.discard(send)

    # --- dialing -------------------------------------------------------------------------------

    def set_circuit_transport(self, transport: CircuitTransport | None) -> None:
        """Dial ``/p2p-circuit`` addresses through ``transport`` (None: not at all)."""
        self._circuit = transport

    def transport_for(self, addr: Multiaddr) -> DialTransport:
        """The transport that dials ``addr``; :class:`PeerUnreachable` if none does."""
        transport: DialTransport = self._transport_for(addr)
        return transport

    def _transport_for(self, addr: Multiaddr) -> Any:
        if addr.has("p2p-circuit"):
            if self._circuit is None:
                raise PeerUnreachable(f"{addr}: this host has no circuit relay client")
            return self._circuit
        if addr.has("memory"):
            if self._memory is None:
                raise PeerUnreachable(f"{addr}: this host has no in-memory network")
            return self._memory
        if is_tcp_addr(addr):
            return self._tcp
        if is_quic_addr(addr):
            if self._quic is None:
                raise PeerUnreachable(f"{addr}: QUIC is disabled on this node (--no-quic or a private network)")
            return self._quic
        raise PeerUnreachable(
            f"{addr}: no transport for this address (supported: /tcp, /tcp/…/ws, /udp/…/quic-v1, /memory)"
        )

    def _can_dial(self, addr: Multiaddr) -> bool:
        try:
            self._transport_for(addr)
        except PeerUnreachable:
            return False
        return True

    def _usable(self, peer: PeerId) -> Connection | None:
        relayed = None
        for conn in self._conns.get(peer, ()):
            if conn.usable:
                if not conn.relayed:
                    return conn
                relayed = relayed or conn
        return relayed

    async def connect(self, addr: Multiaddr | str, *, learned: bool = False) -> PeerId:
        """Connect to the peer at ``addr`` (reusing an existing connection); returns its peer ID.

        Without ``/p2p/<id>`` in ``addr``, whichever peer answers is accepted.
        ``learned=True`` for an address a peer (not the operator) gave: it
        is dialed only if the dial policy allows it. Raises
        :class:`PeerUnreachable`, :class:`HandshakeError` (including
        :class:`~ocf.errors.PeerIdMismatch`) or :class:`TransportError`,
        never an exception group.
        """
        if isinstance(addr, str):
            try:
                addr = Multiaddr.parse(addr)
            except MultiaddrError as exc:
                raise PeerUnreachable(str(exc)) from None
        if self._nursery is None or self._closing:
            raise TransportError("host is not running")
        expected = addr.peer_id
        if expected == self.peer_id:
            raise PeerUnreachable("refusing to dial our own peer ID")
        self._transport_for(addr)
        if learned:
            refusal = self.dial_policy.refusal(addr)
            if refusal is not None:
                raise PeerUnreachable(f"{addr.without_p2p()}: {refusal}")
        if expected is not None:
            self._remember_addr(expected, addr, operator=not learned)
            while True:
                if self._usable(expected) is not None:
                    await trio.lowlevel.checkpoint()
                    return expected
                pending = self._dials.get(expected)
                if pending is None:
                    break
                await pending.wait()
        done = trio.Event()
        if expected is not None:
            self._dials[expected] = done
        try:
            conn: Connection = await self._dial(addr, learned)
        finally:
            if expected is not None and self._dials.get(expected) is done:
                del self._dials[expected]
            done.set()
        if not learned:
            self.dial_policy.note_home_addr(conn.remote_addr)  # where the operator's peer really is
        return conn.peer

    def stop_dialing(self) -> None:
        """Dial no one from now on: the node is stopping (inbound connections are still served).

        The layers that say goodbye (the node table's and membership's
        departures) say it on the connections they have. A dial made while
        they do (a sender whose neighbour just hung up on our "left", a degree
        dial, AutoNAT) opened a connection only to close it, and the peer
        counted it as a new one (in CI, a private network's connection totals).
        """
        self._dialing = False

    def _refuse_if_stopping(self) -> None:
        if not self._dialing:
            self.stats["dials_refused_stopping"] += 1
            raise PeerUnreachable("not dialing: this node is stopping")

    def _count_dial(self) -> None:
        """Count a new outbound connection, or refuse it (:class:`PeerUnreachable`) if the node is stopping."""
        self._refuse_if_stopping()
        self.stats["dials"] += 1

    async def _dial(self, addr: Multiaddr, learned: bool) -> Connection:
        """Run one outbound connection in the host's nursery; returns it once it is up."""
        assert self._nursery is not None
        self._count_dial()
        try:
            with transport_errors_unwrapped():
                if learned:
                    with trio.fail_after(self.config.dial_timeout):
                        addr = await resolve_learned(addr, self.dial_policy)
                conn: Connection = await self._nursery.start(self._run_outbound, addr, not learned)
                return conn
        except trio.TooSlowError:
            raise PeerUnreachable(f"resolving {addr} timed out after {self.config.dial_timeout:g}s") from None
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug met while dialing must not reach the caller untyped
            log.error("dial crashed %s", logfmt.kv(addr=addr, exc=repr(exc)), exc_info=True)
            raise PeerUnreachable(f"dial {addr} failed ({type(exc).__name__})") from exc

    async def connect_via(self, transport: DialTransport, addr: Multiaddr) -> PeerId:
        """Dial ``addr`` (with ``/p2p``) through ``transport`` as an outbound connection of this host.

        For a hole punch, whose socket is bound to the port the peer expects;
        the connection then lives like any other (tie-break, limits, identify).
        """
        if self._nursery is None or self._closing:
            raise TransportError("host is not running")
        self._count_dial()
        try:
            with transport_errors_unwrapped():
                conn: Connection = await self._nursery.start(self._run_outbound, addr, False, transport)
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _dial: never untyped
            raise PeerUnreachable(f"dial {addr} failed ({type(exc).__name__})") from exc
        return conn.peer

    async def _run_outbound(
        self,
        addr: Multiaddr,
        operator: bool,
        transport: DialTransport | None = None,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = StartedOnce(task_status)
        del task_status  # the connection outlives its dialer: see StartedOnce
        try:
            await self._outbound(addr, operator, status, transport)
        except Exception as exc:
            if not status.done:
                raise  # the dialer gets it (see _dial)
            # Once up, the connection lives in the host's nursery: whatever ends it
            # (its transport's teardown included) must end that connection only.
            failure = transport_failure(exc)
            log.debug(
                "outbound connection ended %s",
                logfmt.kv(addr=addr, reason=repr(failure or exc)),
                exc_info=failure is None,
            )

    async def _outbound(
        self, addr: Multiaddr, operator: bool, task_status: StartedOnce, via: DialTransport | None = None
    ) -> None:
        usage = self.resources.system.usage
        if usage["conns_inbound"] + usage["conns_outbound"] + usage["handshakes"] >= self.config.max_connections:
            raise TransportError(f"connection limit reached ({self.config.max_connections})")
        transport = via if via is not None else self._transport_for(addr)
        if transport is self._quic:
            await self._outbound_quic(addr, operator, task_status)
            return
        t0 = trio.current_time()
        async with transport.connect(addr, self.config.dial_timeout) as raw:
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    secure, remote = await self.upgrader.secure(raw.stream, initiator=True, expected=addr.peer_id)
            except trio.TooSlowError:
                raise HandshakeError(
                    f"handshake with {addr} timed out after {self.config.handshake_timeout:g}s"
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerUnreachable(f"{addr} closed the connection during the handshake ({exc or 'EOF'})") from None
            if remote == self.peer_id:
                raise PeerUnreachable(f"{addr} is ourselves")
            if addr.peer_id is None:
                self._remember_addr(remote, addr, operator=operator)
            if not self.resources.try_reserve("conns_outbound", peer=remote):
                raise TransportError(f"connection limit reached for {remote.short()}")
            conn = self._new_connection(secure, remote, raw, outbound=True)
            log.debug(
                "dialed %s", logfmt.kv(peer=remote.short(), addr=addr, ms=round((trio.current_time() - t0) * 1000, 1))
            )
            await self._serve_connection(conn, task_status=task_status)

    async def _outbound_quic(self, addr: Multiaddr, operator: bool, task_status: StartedOnce) -> None:
        assert self._quic is not None
        timeout = min(self.config.dial_timeout, self.config.handshake_timeout)
        async with self._quic.connect(addr, addr.peer_id, timeout) as muxed:
            remote = muxed.remote_peer
            assert remote is not None
            if remote == self.peer_id:
                raise PeerUnreachable(f"{addr} is ourselves")
            if addr.peer_id is None:
                self._remember_addr(remote, addr, operator=operator)
            if not self.resources.try_reserve("conns_outbound", peer=remote):
                raise TransportError(f"connection limit reached for {remote.short()}")
            conn = self._quic_connection(muxed, outbound=True)
            await self._serve_connection(conn, task_status=task_status)

    async def _on_quic_inbound(self, muxed: QuicMuxedConnection) -> None:
        """A QUIC connection whose handshake (and peer ID check) is done; same budgets as TCP from here."""
        remote = muxed.remote_peer
        if self._closing or remote is None:
            return
        if remote == self.peer_id:
            log.info("refusing connection from ourselves %s", logfmt.kv(remote=muxed.label))
            return
        conn = self._quic_connection(muxed, outbound=False)
        conn.ip = ip_key(conn.remote_addr)
        if not self.resources.try_reserve("conns_inbound", peer=remote, ip=conn.ip):
            self.stats["inbound_refused"] += 1
            return
        await self._serve_connection(conn)

    def _quic_connection(self, muxed: QuicMuxedConnection, *, outbound: bool) -> Connection:
        from .quic import quic_multiaddr

        remote = muxed.remote_peer
        assert remote is not None
        remote_addr = quic_multiaddr(muxed.addr)
        muxed.attach(
            handler=self._on_stream,  # type: ignore[arg-type]
            resources=self.resources.peer_scope(remote, ip_key(remote_addr)),
            max_streams=self.config.max_streams_per_connection,
        )
        return Connection(
            muxed=muxed,
            peer=remote,
            outbound=outbound,
            initiator=self.peer_id if outbound else remote,
            remote_addr=remote_addr,
            local_addr=None,
            transport="quic",
        )

    # --- inbound -------------------------------------------------------------------------------

    async def _on_raw_inbound(self, raw: RawConn) -> None:
        cfg = self.config
        ip = ip_key(raw.remote_addr)
        # TCP takes the slot at accept (so sniffing and the WebSocket upgrade
        # count too); other transports hand over the connection without one.
        if self._closing:
            return
        slot: HandshakeSlot | None = (
            raw.slot if raw.slot is not None else self.resources.handshake(ip, cfg.handshake_timeout)
        )
        if slot is None:
            self.stats["inbound_refused"] += 1
            return
        try:
            with trio.move_on_at(slot.deadline) as scope:
                secure, remote = await self.upgrader.secure(raw.stream, initiator=False, expected=None)
            if scope.cancelled_caught:
                self.stats["handshake_failures"] += 1
                self.resources.note_refusal(
                    "transient", "handshake_timeout", "inbound handshake timed out", timeout=cfg.handshake_timeout
                )
                return
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.stats["handshake_failures"] += 1
            if isinstance(exc, PrivateNetworkRefused):
                return  # counted and logged (rate-limited) by the private network's protector
            self.resources.note_refusal(
                "transient", "handshake_failed", "inbound handshake failed", error=exc or type(exc).__name__
            )
            return
        except Exception as exc:  # noqa: BLE001 - a bug on one connection must not stop the host
            self.stats["handshake_failures"] += 1
            log.error("inbound handshake crashed %s", logfmt.kv(remote=raw.remote_addr, exc=repr(exc)), exc_info=True)
            return
        finally:
            slot.release()
        if remote == self.peer_id:
            log.info("refusing connection from ourselves %s", logfmt.kv(remote=raw.remote_addr))
            return
        if not self.resources.try_reserve("conns_inbound", peer=remote, ip=ip):
            self.stats["inbound_refused"] += 1
            return
        conn = self._new_connection(secure, remote, raw, outbound=False)
        conn.ip = ip
        await self._serve_connection(conn)

    # --- connection lifecycle -------------------------------------------------------------------

    def _num_connections(self) -> int:
        return sum(len(v) for v in self._conns.values())

    def _new_connection(self, secure: trio.abc.Stream, remote: PeerId, raw: RawConn, *, outbound: bool) -> Connection:
        """Wrap an upgraded stream; the caller has reserved the connection in the resource manager."""
        muxed = MuxedConnection(
            secure,
            is_client=outbound,
            remote_peer=remote,
            handler=self._on_stream,
            max_streams=self.config.max_streams_per_connection,
            resources=self.resources.peer_scope(remote, ip_key(raw.remote_addr)),
        )
        return Connection(
            muxed=muxed,
            peer=remote,
            outbound=outbound,
            initiator=self.peer_id if outbound else remote,
            remote_addr=raw.remote_addr,
            local_addr=raw.local_addr,
            transport=raw.transport,
        )

    async def _serve_connection(self, conn: Connection, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run a connection until it ends; registered with the host meanwhile."""
        added = False
        try:
            async with conn.muxed.running():  # in this task: no task and nursery of its own
                self._add(conn)
                added = True
                task_status.started(conn)
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the host
            log.error("connection failed %s", logfmt.kv(peer=conn.peer.short(), exc=repr(exc)), exc_info=True)
        finally:
            if added:
                self._remove(conn)
            self.resources.release("conns_outbound" if conn.outbound else "conns_inbound", peer=conn.peer, ip=conn.ip)

    def _note_recent(self, peer: PeerId) -> None:
        """Keep ``peer``'s identify-only addresses a while; forget those whose time or room is up."""
        now = time.monotonic()
        recent = self._recent
        recent.pop(peer, None)
        recent[peer] = now
        while recent:
            oldest, ended = next(iter(recent.items()))
            if len(recent) <= MAX_RECENTLY_CONNECTED and now - ended < RECENTLY_CONNECTED_FOR:
                break
            del recent[oldest]
            if oldest not in self._kept and oldest not in self._conns:
                self._addrs.pop(oldest, None)

    def _add(self, conn: Connection) -> None:
        peer = conn.peer
        self._recent.pop(peer, None)
        conns = self._conns.setdefault(peer, [])
        first = not any(c.muxed.is_open for c in conns)
        conns.append(conn)
        self._notify_changed()
        if first:
            self._peer_log.info(
                "connected",
                "peer connected",
                peer=peer.short(),
                dir="out" if conn.outbound else "in",
                via=conn.transport,
                addr=conn.remote_addr or "-",
            )
            self._emit("connected", peer)
        else:
            self._tie_break(peer)
        if conn.usable and self._nursery is not None:
            from .identify import identify_peer

            self._nursery.start_soon(identify_peer, self, conn)

    @contextlib.contextmanager
    def duplicates_allowed(self, peer: PeerId) -> Iterator[None]:
        """No tie-break between connections to ``peer`` for the block.

        AutoNAT v2: a server may dial us back under the identity it is already
        connected with; closing either connection would kill the request or
        the dial-back. The server closes its dial-back connection afterwards.
        """
        self._keep_duplicates[peer] = self._keep_duplicates.get(peer, 0) + 1
        try:
            yield
        finally:
            left = self._keep_duplicates.pop(peer) - 1
            if left:
                self._keep_duplicates[peer] = left

    def _tie_break(self, peer: PeerId) -> None:
        usable = [c for c in self._conns.get(peer, ()) if c.usable]
        if len(usable) < 2 or peer in self._keep_duplicates:
            return
        # Between connections of different initiators: the smaller peer ID's
        # (both sides compute the same). Between connections of the same
        # initiator: the newest, because a peer only redials when it no longer
        # trusts the old one (e.g. it restarted).
        # A direct connection beats a relayed one whoever dialed it (hole punching's point).
        usable = [c for c in usable if not c.relayed] or usable
        if len(usable) < 2:
            self._retire_others(peer, usable[0])
            return
        preferred = min(self.peer_id, peer)
        candidates = [c for c in usable if c.initiator == preferred] or usable
        self._retire_others(peer, candidates[-1])

    def _retire_others(self, peer: PeerId, winner: Connection) -> None:
        for conn in self._conns.get(peer, ()):
            if conn is not winner and conn.usable:
                log.debug(
                    "closing duplicate connection %s",
                    logfmt.kv(peer=peer.short(), dir="out" if conn.outbound else "in"),
                )
                conn.muxed.go_away()
                if self._nursery is not None:
                    self._nursery.start_soon(self._retire, conn)

    def notify_changed(self) -> None:
        """Wake :meth:`wait_changed` waiters (our own addresses changed, say)."""
        self._notify_changed()

    def rtt(self, peer: PeerId) -> float | None:
        """Smoothed round-trip time (seconds) of the connection new streams to ``peer`` take; None if unmeasured.

        yamux connections measure it with a ping when they open and at every
        keepalive; QUIC with every acknowledged packet. Routing weighs
        providers by it (``ocf.gateway.routeindex.weight``).
        """
        conn = self._usable(peer)
        return conn.muxed.rtt if conn is not None else None

    def relay_limit(self, peer: PeerId) -> str | None:
        """Why our relayed connection to ``peer`` just ended, if its relay cut it at its limit (else None)."""
        return self._circuit.limit_reason(peer) if self._circuit is not None else None

    def is_relayed(self, peer: PeerId) -> bool:
        """Connected to ``peer`` only through relays (limited in time and bytes)."""
        usable = [c for c in self._conns.get(peer, ()) if c.usable]
        return bool(usable) and all(c.relayed for c in usable)

    async def wait_changed(self) -> None:
        """Return at the next change of connections or of what identify told us."""
        await self._changed.wait()

    def connection_of(self, stream: MuxedStream) -> Connection | None:
        """The connection ``stream`` runs on (None once it is gone)."""
        for conn in self._conns.get(stream.remote_peer, ()):
            if conn.muxed is stream.connection:
                return conn
        return None

    async def serve_inbound(self, raw: RawConn) -> None:
        """Upgrade and serve an inbound connection another layer accepted (a relayed one); returns when it ends."""
        await self._on_raw_inbound(raw)

    async def probe(self, addr: Multiaddr, expected: PeerId, timeout: float) -> None:  # noqa: ASYNC109 - one dial-back
        """Does ``expected`` answer at ``addr``? Raises :class:`TransportError` if not (AutoNAT's dial-back).

        A fresh connection under a throwaway identity, closed at once: from
        our own identity it would be a second connection to a peer we are
        connected to, and the tie-break could close the one it already uses.
        """
        upgrader = default_upgrader(Identity.generate(), self.config)
        transport = self._transport_for(addr)
        try:
            with transport_errors_unwrapped(), trio.fail_after(timeout):
                async with transport.connect(addr, timeout) as raw:
                    await upgrader.secure(raw.stream, initiator=True, expected=expected)
        except trio.TooSlowError:
            raise PeerUnreachable(f"{addr} did not answer within {timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerUnreachable(f"{addr} closed the connection ({exc or 'EOF'})") from None

    @contextlib.asynccontextmanager
    async def probe_stream(self, addr: Multiaddr, protocol: str, timeout: float) -> AsyncIterator[MuxedStream]:  # noqa: ASYNC109
        """A stream on ``protocol`` over a fresh connection to ``addr`` from a throwaway identity (AutoNAT v2).

        As :meth:`probe`, the connection is nobody's peer connection and closes
        with the block; any peer may answer (v2 checks a nonce, not an ID).
        :class:`PeerUnreachable` if it cannot be dialed or negotiated in time.
        """
        upgrader = default_upgrader(Identity.generate(), self.config)
        transport = self._transport_for(addr)
        try:
            with transport_errors_unwrapped():
                async with transport.connect(addr, timeout) as raw, trio.open_nursery() as nursery:
                    with trio.fail_after(timeout):
                        secured, remote = await upgrader.secure(raw.stream, initiator=True, expected=None)
                        muxed = MuxedConnection(secured, is_client=True, remote_peer=remote)
                        await nursery.start(muxed.run)
                        stream = await muxed.open_stream()
                        stream.protocol = await upgrader.select(stream, [protocol])
                    try:
                        yield stream
                    finally:
                        await muxed.aclose("probe done")
                        nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise PeerUnreachable(f"{addr} did not answer within {timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerUnreachable(f"{addr} closed the connection ({exc or 'EOF'})") from None

    async def _retire(self, conn: Connection) -> None:
        with trio.move_on_after(RETIRE_GRACE):
            await conn.muxed.wait_idle()
        await conn.muxed.aclose("duplicate connection")

    def _remove(self, conn: Connection) -> None:
        conns = self._conns.get(conn.peer)
        if conns is None or conn not in conns:
            return
        conns.remove(conn)
        self._notify_changed()
        if not conns:
            del self._conns[conn.peer]
            if conn.peer not in self._kept:
                self._info.pop(conn.peer, None)
                if conn.peer in self._addrs:
                    self._note_recent(conn.peer)
        if not any(c.muxed.is_open for c in conns):
            self._peer_log.info(
                "disconnected",
                "peer disconnected",
                peer=conn.peer.short(),
                reason=conn.muxed.close_reason or "-",
                seconds=round(time.time() - conn.opened_at, 1),
            )
            self._emit("disconnected", conn.peer)

    async def disconnect(self, peer: PeerId) -> None:
        """Close every connection to ``peer``."""
        async with trio.open_nursery() as nursery:
            for conn in list(self._conns.get(peer, ())):
                nursery.start_soon(conn.muxed.aclose, "disconnected locally")

    # --- streams ----------------------------------------------------------------------------------

    async def connect_peer(self, peer: PeerId, *, resolve: bool = True) -> None:
        """Connect to ``peer`` at the addresses known for it, as a stream to it would.

        In the host's dial order (QUIC first unless it failed to this peer
        lately; a peer with relay addresses gets one short try for all its
        direct ones, then its relays), joining a dial already under way.
        ``resolve=False`` never asks the resolver (the DHT) when no address
        is known: for callers that dial often and only at addresses they hold.
        Raises :class:`TransportError` (``PeerUnreachable``) when none answers.
        """
        with transport_errors_unwrapped():  # a dial's nursery may group its failures
            await self._connection_for(peer, resolve=resolve)

    async def _connection_for(self, peer: PeerId, *, resolve: bool = True) -> Connection:
        conn = self._usable(peer)
        if conn is not None:
            return conn
        if peer == self.peer_id:
            raise PeerUnreachable("cannot open a stream to ourselves")
        pending = self._dials.get(peer)
        if pending is not None:
            await pending.wait()
            conn = self._usable(peer)
            if conn is not None:
                return conn
        self._refuse_if_stopping()  # before the resolver, which dials too
        addrs = self.peer_addrs(peer)
        if not addrs and resolve and self._resolver is not None:
            # The resolver may connect while it looks (that proves the addresses); what
            # it returns are learned addresses, judged by the dial policy like any other.
            self.add_addrs(peer, await self._resolver(peer))
            conn = self._usable(peer)
            if conn is not None:
                return conn
            addrs = self.peer_addrs(peer)
        if not addrs:
            raise PeerUnreachable(f"peer {peer.short()} is not connected and no address is known")
        reasons = []
        relay_refusal: RelayRefused | None = None
        # A peer that publishes relay addresses is likely behind NAT: its direct addresses share one
        # short try (a private one elsewhere may never answer), then the relay is dialed. Shared, not
        # one try each: a NATed peer publishes several (TCP, WebSocket and QUIC on each LAN address),
        # and a try each put the relay past a caller's dial timeout (three cost 6 s of a gateway's 10).
        relayed_peer = any(a.has("p2p-circuit") for a in addrs)
        direct_deadline = trio.current_time() + DIRECT_BUDGET_WITH_RELAY if relayed_peer else math.inf
        # QUIC first, unless it failed to this peer lately (UDP blocked on the way):
        # then TCP first, so one blocked path does not cost every dial a timeout.
        quic_failed = self._quic_failed.get(peer, -math.inf) > time.monotonic() - QUIC_FAILURE_MEMORY
        try:
            for addr in sorted(addrs, key=lambda a: _dial_preference(a, demote_quic=quic_failed))[
                : self.config.max_addrs_per_peer
            ]:
                deadline = math.inf if addr.has("p2p-circuit") else direct_deadline
                if trio.current_time() >= deadline:
                    reasons.append(f"{addr}: not tried, direct addresses had {DIRECT_BUDGET_WITH_RELAY:g}s")
                    continue
                try:
                    with trio.move_on_at(deadline) as scope:
                        await self.connect(addr.with_p2p(peer), learned=addr not in self._operator_addrs)
                    if scope.cancelled_caught:
                        reasons.append(
                            f"{addr}: no answer within the {DIRECT_BUDGET_WITH_RELAY:g}s of direct addresses"
                        )
                        continue
                except TransportError as exc:
                    reasons.append(f"{addr}: {exc}")
                    if addr.has("quic-v1"):
                        self._quic_failed[peer] = time.monotonic()
                        while len(self._quic_failed) > MAX_QUIC_FAILURES:
                            del self._quic_failed[next(iter(self._quic_failed))]
                    if isinstance(exc, RelayRefused):
                        relay_refusal = exc
                    continue
                conn = self._usable(peer)
                if conn is not None:
                    return conn
        except trio.Cancelled:
            # The caller's deadline ended the dial (a gateway request's --dial-timeout): without
            # this line such a failure leaves no trace of which addresses it spent the time on.
            log.debug("dial cancelled %s", logfmt.kv(peer=peer.short(), tried="; ".join(reasons) or "-"))
            raise
        # What each address answered is for our log, not for whoever asked: callers
        # may show this message to clients, and the addresses are the peer's choice.
        log.debug("peer unreachable %s", logfmt.kv(peer=peer.short(), tried="; ".join(reasons)))
        if relay_refusal is not None:  # the relay's status is one of a fixed set: fit to show
            raise RelayRefused(
                f"peer {peer.short()} is reachable only through a relay, which refused: {relay_refusal.status}",
                status=relay_refusal.status,
            )
        raise PeerUnreachable(f"peer {peer.short()} is unreachable ({len(reasons)} address(es) tried)")

    async def new_stream(self, peer: PeerId, protocols: str | Sequence[str]) -> MuxedStream:
        """Open a stream to ``peer`` speaking the first of ``protocols`` it supports (dials if needed)."""
        if isinstance(protocols, str):
            protocols = [protocols]
        if not protocols:
            raise ValueError("new_stream needs at least one protocol")
        # Dials run nurseries: their failures leave as the plain TransportError every caller catches.
        with transport_errors_unwrapped():
            conn = await self._connection_for(peer)
        stream = await conn.muxed.open_stream()
        try:
            with trio.fail_after(self.config.handshake_timeout):
                stream.protocol = await self.upgrader.select(stream, protocols)
        except trio.TooSlowError:
            stream.reset()
            raise TransportError(f"protocol negotiation with {peer.short()} timed out") from None
        except ProtocolNotSupported:
            await stream.aclose()
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            stream.reset()
            raise TransportError(f"stream to {peer.short()} failed during negotiation: {exc}") from None
        except BaseException:
            stream.reset()
            raise
        return stream

    async def _on_stream(self, stream: MuxedStream) -> None:
        """Inbound stream: negotiate its protocol, then run the registered handler."""
        try:
            with trio.fail_after(self.config.handshake_timeout):
                protocol = await self.upgrader.handle(stream, list(self._handlers))
        except (TransportError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug(
                "inbound stream negotiation failed %s",
                logfmt.kv(peer=stream.remote_peer.short(), reason=exc or type(exc).__name__),
            )
            stream.reset()
            return
        except Exception as exc:  # noqa: BLE001 - stays on this stream (the muxer logs handler crashes too)
            log.error(
                "inbound stream negotiation crashed %s",
                logfmt.kv(peer=stream.remote_peer.short(), exc=repr(exc)),
                exc_info=True,
            )
            stream.reset()
            return
        handler = self._handlers.get(protocol)
        if handler is None:
            stream.reset()
            return
        stream.protocol = protocol
        try:
            await handler(stream)
        except BaseException:
            stream.reset()
            raise
        await stream.aclose()

    async def ping(self, peer: PeerId) -> float:
        """RTT in seconds of one ``/ipfs/ping/1.0.0`` round trip."""
        from .ping import ping_peer

        return await ping_peer(self, peer)

    # --- lifecycle ---------------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery, *, listen: bool = True, memory_name: str | None = None) -> None:
        self._nursery = nursery
        from .identify import register as register_identify
        from .ping import register as register_ping

        register_ping(self)
        register_identify(self)
        if self._quic is not None:
            self._quic.start_dialing(nursery)
        self._listen_scope = trio.CancelScope()
        if not listen:
            return
        addrs: list[Multiaddr] = []
        if self._memory is not None:
            addrs.append(self._memory.listen(self._on_raw_inbound, nursery, memory_name))
        else:
            addrs += await nursery.start(self._listen_tcp)
            if self._quic is not None:
                addrs += await nursery.start(self._listen_quic)
            # A wildcard listener also answers on loopback; that alone does not put
            # this node in a loopback network (see ocf.transport.dialpolicy).
            wildcard = is_wildcard(self.config.host)
            for bound in addrs:
                if not (wildcard and bound.parts[0][1] in ("127.0.0.1", "::1")):
                    self.dial_policy.note_home_addr(bound)
            addrs += _public_addrs(self.config.public_addr, addrs)
        self.listen_addrs = [a.with_p2p(self.peer_id) for a in addrs]
        log.info(
            "listening %s",
            logfmt.kv(peer=self.peer_id.short(), addrs=",".join(str(a.without_p2p()) for a in self.listen_addrs)),
        )

    async def _listen_tcp(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._nursery is not None and self._listen_scope is not None
        with self._listen_scope:
            await self._tcp.serve(
                self.config.host, self.config.tcpport, self._on_raw_inbound, self._nursery, task_status=task_status
            )

    async def _listen_quic(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._nursery is not None and self._quic is not None
        with self._quic_listen_scope:
            await self._quic.serve(
                self.config.host, _udp_port(self.config), self._on_quic_inbound, self._nursery, task_status=task_status
            )

    async def aclose(self) -> None:
        """Stop listening, say goodbye on every connection, close them."""
        if self._closing:
            return
        self._closing = True
        if self._listen_scope is not None:
            self._listen_scope.cancel()
        self._quic_listen_scope.cancel()
        if self._memory is not None:
            self._memory.close()
        with trio.move_on_after(SHUTDOWN_GRACE):
            async with trio.open_nursery() as nursery:
                for conn in self.connections():
                    nursery.start_soon(conn.muxed.aclose, "host shutting down")


def _public_addrs(public: str | None, bound: list[Multiaddr]) -> list[Multiaddr]:
    """``--public-addr`` (IP or DNS name) with the bound TCP port(s), so identify advertises it."""
    if not public or not bound:
        return []
    import ipaddress

    try:
        ip = ipaddress.ip_address(public)
        head: tuple[str, str | None] = ("ip4" if ip.version == 4 else "ip6", str(ip))
    except ValueError:
        head = ("dns", public)
    out = []
    for addr in bound:
        ma = Multiaddr((head,) + addr.parts[1:])
        try:
            ma = Multiaddr.parse(str(ma))  # validates a DNS name
        except MultiaddrError:
            return []
        if ma not in bound and ma not in out:
            out.append(ma)
    return out


def _dial_preference(addr: Multiaddr, *, demote_quic: bool = False) -> tuple[int, int]:
    """Sort key: in-memory, then loopback, then others, relays last; within each, QUIC before TCP before
    WebSocket."""
    if addr.has("p2p-circuit"):
        return (4, 0)  # limited in time and bytes: only when nothing direct answers
    if addr.has("memory"):
        return (0, 0)
    kind = (3 if demote_quic else 0) if addr.has("quic-v1") else 2 if addr.has("ws") else 1
    if addr.has("ws"):
        return (3, kind)
    host = addr.parts[0][1] or ""
    return (1 if host.startswith("127.") or host == "::1" else 2, kind)


def _udp_port(config: Config) -> int:
    """``--udpport``; an ephemeral TCP port (0) makes the default UDP port ephemeral too.

    Several nodes on one machine (tests, local clusters) pick free TCP ports
    with ``--tcpport 0``; a fixed default UDP port would make all but the
    first of them fail to start.
    """
    if config.tcpport == 0 and config.udpport == DEFAULT_UDP_PORT:
        return 0
    return config.udpport


@contextlib.asynccontextmanager
async def open_host(
    identity: Identity,
    config: Config,
    memory_network: MemoryNetwork | None = None,
    *,
    upgrader: Upgrader | None = None,
    listen: bool = True,
    memory_name: str | None = None,
) -> AsyncIterator[Host]:
    """Run a :class:`Host` for the duration of the block.

    With ``memory_network`` the host listens only on that in-process network
    (at ``/memory/<memory_name>``, a fresh name by default); otherwise on TCP
    ``config.host:config.tcpport`` (plus WebSocket on the same port unless
    ``config.ws`` is false). It can dial TCP/WS addresses either way.
    ``listen=False`` makes a dial-only host (the ``ocf ping`` command).
    """
    host = Host(identity, config, memory_network=memory_network, upgrader=upgrader)
    async with trio.open_nursery() as nursery:
        await host._start(nursery, listen=listen, memory_name=memory_name)
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True):
                await host.aclose()
            nursery.cancel_scope.cancel()
