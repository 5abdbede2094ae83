"""DCUtR (``/libp2p/dcutr``): upgrade a relayed connection to a direct one by a TCP simultaneous open.

Relays lend little (2 minutes, 128 KiB by default); two peers that met
through one should talk directly. When a relayed connection comes in, its
inbound side B coordinates over it with the dialer A (the spec's roles)::

    B -> A  CONNECT  B's addresses            (B starts timing)
    A -> B  CONNECT  A's addresses            (B: rtt = elapsed)
    B -> A  SYNC                              (A dials at once; B after rtt/2)

Both then dial each other at once, so that each NAT has seen an outbound
packet for the pair of addresses when the other side's arrives: a TCP
simultaneous open. For the purpose of everything above TCP, A is the
client (Noise initiator) and B the server.

Over QUIC (when both listen on it) the punch runs alongside: each side also
sends its IPs with its QUIC listen port (QUIC dials leave from the listening
socket); A QUIC-dials B's, and B sends random datagrams to A's so that its
own NAT lets A's dial in (see :meth:`HolePuncher._dial`).

Which addresses: each side binds a fresh TCP socket first and sends the IP
the relay observed for it (identify's ``observedAddr``) with that socket's
port, plus its own non-loopback listen IPs with that port: a NAT that keeps
the source port (Linux masquerade does when it can) maps the punch socket
to exactly that address. The dials then go out from that port
(``SO_REUSEPORT``, so one socket per candidate address). B also sends its
direct TCP listen addresses: A dials as the client, which is what a listener
expects, and an A that cannot dial from a chosen port (js-libp2p) gets through
to a B whose listener is reachable.

Limits: the stream is accepted only on a relayed connection; messages are
at most 4 KiB and at most :data:`MAX_ADDRS` addresses of each transport are used (IPv4 TCP and QUIC),
and only those the dial policy allows (a peer cannot make us dial
anywhere); each step has a deadline; one punch per peer and
:data:`MAX_CONCURRENT` in all at a time; B tries :data:`ATTEMPTS` times.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

import trio

from ... import log as logfmt
from ...errors import MultiaddrError, ProtocolError, TransportError
from ...identity import Multiaddr, PeerId
from ..dialpolicy import classify
from ..identify import read_message, write_message
from ..quic import QuicTransport, is_quic_addr
from ..tcp import is_tcp_addr
from .punch import MAX_MESSAGE, HolePunch, MsgType, PunchTransport, Dials, punch_datagram

if TYPE_CHECKING:
    from ..host import Connection, DialTransport, Host
    from ..muxer import MuxedStream
    from .nat import Nat

log = logging.getLogger("ocf.transport.dcutr")

PROTOCOL = "/libp2p/dcutr"
MAX_ADDRS = 4
STEP_TIMEOUT = 10.0
DIAL_TIMEOUT = 5.0
ATTEMPTS = 3
MAX_CONCURRENT = 8


def _public(addr: Multiaddr) -> bool:
    """A public IP address, or an address that is not an IP one at all (the in-memory transport)."""
    if not addr.parts or addr.parts[0][0] not in ("ip4", "ip6"):
        return addr.has("memory")
    try:
        return classify(ipaddress.ip_address(addr.parts[0][1] or ""))[0] == "public"
    except ValueError:
        return False


def _relay_of(conn: Connection) -> PeerId | None:
    """The relay a relayed connection runs through (from its ``…/p2p/<relay>/p2p-circuit`` address)."""
    if conn.remote_addr is None:
        return None
    relay = None
    for name, value in conn.remote_addr.parts:
        if name == "p2p-circuit":
            break
        if name == "p2p" and value:
            relay = value
    try:
        return PeerId.from_string(relay) if relay else None
    except Exception:  # noqa: BLE001 - our own address record; nothing to do if odd
        return None


class HolePuncher:
    """Runs DCUtR for one host (see the module doc)."""

    def __init__(self, host: Host, nat: Nat | None = None) -> None:
        self.host = host
        self.nat = nat
        self._active: set[PeerId] = set()
        self._nursery: trio.Nursery | None = None
        self.stats = {"attempts": 0, "succeeded": 0, "succeeded_quic": 0, "failed": 0, "unilateral": 0}
        self.refused: dict[str, int] = {}
        self.last_ms: float | None = None  # duration of the last successful punch, for benchmarks
        self._log = logfmt.RateLimitedLog(log, host.config.refusal_log_interval)

    def _count(self, what: str) -> None:
        self.stats[what] += 1

    def _refuse(self, reason: str, peer: PeerId) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log.info(reason, "hole punch refused", reason=reason, peer=peer.short())

    def _our_ips(self, conn: Connection) -> list[str]:
        """The IP the relay sees us at, then our own non-loopback listen IPs (IPv4)."""
        ips: list[str] = []
        relay = _relay_of(conn)
        info = self.host.peer_info(relay) if relay is not None else None
        observed = info.observed_addr if info is not None else None
        if observed is not None and observed.parts and observed.parts[0][0] == "ip4":
            ips.append(observed.parts[0][1] or "")
        for a in self.host.listen_addrs:
            if a.parts and a.parts[0][0] == "ip4" and not a.has("p2p-circuit"):
                ip = a.parts[0][1] or ""
                if ip not in ips and not ipaddress.ip_address(ip).is_loopback:
                    ips.append(ip)
        return [ip for ip in ips if ip and not ipaddress.ip_address(ip).is_unspecified]

    def _our_addrs(self, conn: Connection, port: int) -> list[Multiaddr]:
        """TCP: our IPs with the punch socket's port; QUIC: our IPs with the QUIC listen port (dials leave from it)."""
        ips = self._our_ips(conn)
        out = [Multiaddr((("ip4", ip), ("tcp", str(port)))) for ip in ips][:MAX_ADDRS]
        ports = {a.value_for("udp") for a in self.host.listen_addrs if is_quic_addr(a) and a.parts[0][0] == "ip4"}
        for udp in sorted(p for p in ports if p):
            out += [Multiaddr((("ip4", ip), ("udp", udp), ("quic-v1", None))) for ip in ips][:MAX_ADDRS]
        return out

    def _listen_addrs(self) -> list[Multiaddr]:
        """B's own direct TCP listen addresses, which A may dial as the client it is.

        A implementation whose dials cannot leave from a chosen port (js-libp2p)
        reaches B at its listener; go-libp2p's listen port is its punch port.
        Only B sends them: B's dials run as the server, and a listener of A's
        would be a second server on the same connection.
        """
        out: list[Multiaddr] = []
        for a in self.host.listen_addrs:
            a = a.without_p2p()
            if not is_tcp_addr(a) or a.has("ws") or a.has("p2p-circuit") or a.parts[0][0] != "ip4":
                continue
            ip = ipaddress.ip_address(a.parts[0][1] or "")
            if not (ip.is_loopback or ip.is_unspecified) and a not in out:
                out.append(a)
        return out[:MAX_ADDRS]

    def _their_addrs(self, raw: tuple[bytes, ...]) -> list[Multiaddr]:
        """The peer's IPv4 TCP and QUIC addresses the dial policy allows, at most :data:`MAX_ADDRS` of each."""
        out: list[Multiaddr] = []
        counts = {"tcp": 0, "quic": 0}
        for item in raw:
            try:
                ma = Multiaddr.from_bytes(item).without_p2p()
            except MultiaddrError:
                continue
            if not ma.parts or ma.parts[0][0] != "ip4" or ma.has("p2p-circuit"):
                continue
            kind = "quic" if is_quic_addr(ma) else "tcp" if is_tcp_addr(ma) and not ma.has("ws") else None
            if kind is None or counts[kind] >= MAX_ADDRS:
                continue
            if self.host.dial_policy.refusal(ma) is not None or ma in out:
                continue
            out.append(ma)
            counts[kind] += 1
        return out

    def _admit(self, peer: PeerId) -> bool:
        if peer in self._active or len(self._active) >= MAX_CONCURRENT:
            return False
        self._active.add(peer)
        return True

    # --- A: the dialer of the relayed connection answers ---------------------------------------

    async def handle(self, stream: MuxedStream) -> None:
        peer = stream.remote_peer
        conn = self.host.connection_of(stream)
        if conn is None or not conn.relayed:
            self._refuse("not_relayed", peer)
            return
        if not self._admit(peer):
            self._refuse("busy", peer)
            return
        # The exchange runs in the puncher's nursery, not in this handler's task: a successful punch
        # retires the relayed connection, whose handlers are cancelled when it closes, possibly before
        # the punch has seen its own success.
        done = trio.Event()

        async def answer() -> None:
            try:
                await self._answer(stream, conn, peer)
            except Exception as exc:  # noqa: BLE001 - one peer's exchange must not stop the puncher
                log.warning("hole punch failed %s", logfmt.kv(peer=peer.short(), exc=repr(exc)), exc_info=True)
            finally:
                self._active.discard(peer)
                done.set()

        assert self._nursery is not None
        self._nursery.start_soon(answer)
        await done.wait()

    async def _answer(self, stream: MuxedStream, conn: Connection, peer: PeerId) -> None:
        while True:  # B may retry on the same stream
            punch = await PunchTransport.bind()
            try:
                try:
                    with trio.fail_after(STEP_TIMEOUT):
                        message = HolePunch.decode(await read_message(stream, MAX_MESSAGE))
                        if message.type != MsgType.CONNECT:
                            raise ProtocolError("expected CONNECT")
                        theirs = self._their_addrs(message.addrs)
                        ours = self._our_addrs(conn, punch.port)
                        await write_message(
                            stream, HolePunch(MsgType.CONNECT, tuple(a.to_bytes() for a in ours)).encode()
                        )
                        sync = HolePunch.decode(await read_message(stream, MAX_MESSAGE))
                        if sync.type != MsgType.SYNC:
                            raise ProtocolError("expected SYNC")
                except (
                    trio.TooSlowError,
                    ProtocolError,
                    TransportError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                ):
                    return  # B gave up, or the stream ended: nothing more to do here
                self._count("attempts")
                t0 = trio.current_time()
                if await self._dial(punch, theirs, peer, client=True):
                    self._done(peer, t0)
                    return
                self._count("failed")
            finally:
                punch.close()

    # --- B: the inbound side of the relayed connection starts ---------------------------------

    async def initiate(self, peer: PeerId) -> bool:
        """Try to replace our relayed connection to ``peer`` by a direct one; True if it worked."""
        if not self._admit(peer):
            return False
        try:
            with trio.move_on_after(STEP_TIMEOUT):  # identify tells us its addresses and protocols
                while self.host.peer_info(peer) is None and self.host.is_connected(peer):
                    await self.host.wait_changed()
            if await self._unilateral(peer):
                return True
            for attempt in range(ATTEMPTS):
                conn = next((c for c in self.host.connections(peer) if c.usable and c.relayed), None)
                if conn is None or self._direct(peer):
                    return self._direct(peer)
                if await self._attempt(conn, peer):
                    return True
                log.debug("hole punch attempt failed %s", logfmt.kv(peer=peer.short(), attempt=attempt + 1))
            return False
        finally:
            self._active.discard(peer)

    async def _unilateral(self, peer: PeerId) -> bool:
        """The spec's first step: if the dialer published public addresses, just dial one.

        Public only (as go-libp2p): a private address of a peer that needed a
        relay to reach us is most likely behind its NAT, and a dial there
        would only spend :data:`DIAL_TIMEOUT` before the punch.
        """
        for addr in self.host.peer_addrs(peer)[:MAX_ADDRS]:
            if addr.has("p2p-circuit") or self.host.dial_policy.refusal(addr) is not None or not _public(addr):
                continue
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    await self.host.connect_via(self.host.transport_for(addr), addr.with_p2p(peer))
            except (TransportError, trio.TooSlowError) as exc:
                log.debug("direct dial failed %s", logfmt.kv(peer=peer.short(), addr=addr, reason=exc or "timeout"))
                continue
            if self._direct(peer):
                self._count("unilateral")
                log.info("relayed connection upgraded by a direct dial %s", logfmt.kv(peer=peer.short(), addr=addr))
                return True
        return False

    async def _attempt(self, conn: Connection, peer: PeerId) -> bool:
        punch = await PunchTransport.bind()
        try:
            ours = self._our_addrs(conn, punch.port) + self._listen_addrs()
            try:
                with trio.fail_after(STEP_TIMEOUT):
                    stream = await conn.muxed.open_stream()
                    stream.protocol = await self.host.upgrader.select(stream, [PROTOCOL])
                    async with stream:
                        await write_message(
                            stream, HolePunch(MsgType.CONNECT, tuple(a.to_bytes() for a in ours)).encode()
                        )
                        t0 = trio.current_time()
                        answer = HolePunch.decode(await read_message(stream, MAX_MESSAGE))
                        rtt = trio.current_time() - t0
                        if answer.type != MsgType.CONNECT:
                            raise ProtocolError("expected CONNECT")
                        await write_message(stream, HolePunch(MsgType.SYNC).encode())
            except (
                trio.TooSlowError,
                ProtocolError,
                TransportError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                log.debug(
                    "hole punch exchange failed %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__)
                )
                return False
            theirs = self._their_addrs(answer.addrs)
            self._count("attempts")
            t0 = trio.current_time()
            await trio.sleep(rtt / 2)
            if await self._dial(punch, theirs, peer, client=False):
                self._done(peer, t0)
                return True
            self._count("failed")
            return False
        finally:
            punch.close()

    def _direct(self, peer: PeerId) -> bool:
        return any(c.usable and not c.relayed for c in self.host.connections(peer))

    def _done(self, peer: PeerId, t0: float) -> None:
        if any(
            c.usable and not c.relayed and c.remote_addr and is_quic_addr(c.remote_addr)
            for c in self.host.connections(peer)
        ):
            self.stats["succeeded_quic"] += 1
        self._count("succeeded")
        self.last_ms = (trio.current_time() - t0) * 1000
        log.info("hole punch succeeded %s", logfmt.kv(peer=peer.short(), ms=round(self.last_ms, 1)))

    async def _dial(self, punch: PunchTransport, addrs: list[Multiaddr], peer: PeerId, *, client: bool) -> bool:
        """Punch towards every candidate at once; True once a direct connection to ``peer`` is up.

        TCP: A dials each address from the punch port; B connects from it too
        and serves what connects as the server (a simultaneous open). QUIC: A
        dials from its QUIC socket (the client); B sends random datagrams from
        its own to A's addresses every 10-200 ms, opening its NAT to A's
        dial, which QUIC's own retransmission brings through.
        """
        if not addrs:
            log.debug("hole punch: no address of the peer to dial %s", logfmt.kv(peer=peer.short()))
            return False
        assert self._nursery is not None
        tcp = [a for a in addrs if not is_quic_addr(a)]
        quic = [a for a in addrs if is_quic_addr(a) and self._can_quic(a)]

        # Once every dial of A's has failed, A gives up at once, so that B's next attempt finds it
        # reading the next CONNECT. B waits DIAL_TIMEOUT more after its own failed (A may still reach
        # B's listener), and as long as it punches over QUIC (which never "fails").
        dials = Dials(len(tcp) + len(quic) if client else 0 if quic else len(tcp))

        async def one(addr: Multiaddr, transport: DialTransport) -> None:
            try:
                await self.host.connect_via(transport, addr.with_p2p(peer))
            except TransportError as exc:
                log.debug("hole punch dial failed %s", logfmt.kv(peer=peer.short(), addr=addr, reason=exc))
                dials.failed()

        if not client:
            # B is the server: it serves the socket as an inbound connection, which
            # must outlive this call, so the dials run in the puncher's nursery.
            for addr in tcp:
                self._nursery.start_soon(self._serve_punched, punch, addr, peer, dials)
        with trio.move_on_after(DIAL_TIMEOUT + STEP_TIMEOUT) as scope:
            async with trio.open_nursery() as nursery:
                if client:
                    for addr in tcp:
                        nursery.start_soon(one, addr, punch)
                    for addr in quic:
                        nursery.start_soon(one, addr, self.host.transport_for(addr))
                elif quic:
                    nursery.start_soon(self._punch_udp, quic)
                grace = False
                # gone altogether (both connections closed): nothing left to upgrade; a new relayed
                # connection starts its own punch, which this one must not hold up
                while not self._direct(peer) and self.host.is_connected(peer):
                    if not dials.all_failed.is_set():
                        await self._changed_or(dials.all_failed)
                        continue
                    if client:
                        break
                    if not grace:
                        scope.deadline = min(scope.deadline, trio.current_time() + DIAL_TIMEOUT)
                        grace = True
                    await self.host.wait_changed()
                nursery.cancel_scope.cancel()
        return self._direct(peer)

    async def _changed_or(self, event: trio.Event) -> None:
        """Return at the host's next change or when ``event`` is set."""
        async with trio.open_nursery() as nursery:

            async def changed() -> None:
                await self.host.wait_changed()
                nursery.cancel_scope.cancel()

            async def other() -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(changed)
            nursery.start_soon(other)

    def _can_quic(self, addr: Multiaddr) -> bool:
        try:
            return isinstance(self.host.transport_for(addr), QuicTransport)
        except TransportError:
            return False

    async def _punch_udp(self, addrs: list[Multiaddr]) -> None:
        """B's side over QUIC: random datagrams from our QUIC socket until cancelled (the spec's 10-200 ms)."""
        transport = self.host.transport_for(addrs[0])
        assert isinstance(transport, QuicTransport)
        while True:
            for addr in addrs:
                try:
                    await transport.punch(addr, punch_datagram())
                except TransportError as exc:
                    log.debug("udp punch failed %s", logfmt.kv(addr=addr, reason=exc))
            await trio.sleep(random.uniform(0.01, 0.2))  # noqa: S311 - spacing, not a secret

    async def _serve_punched(self, punch: PunchTransport, addr: Multiaddr, peer: PeerId, dials: Dials) -> None:
        try:
            async with punch.connect(addr, DIAL_TIMEOUT) as raw:
                await self.host.serve_inbound(raw)
        except (TransportError, OSError) as exc:
            log.debug("hole punch dial failed %s", logfmt.kv(peer=peer.short(), addr=addr, reason=exc))
            dials.failed()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """B's side: a new relayed inbound connection starts a hole punch."""
        async with self.host.subscribe() as events:
            task_status.started()
            async for event in events:
                if event.kind != "connected":
                    continue
                conns = self.host.connections(event.peer)
                if conns and all(c.relayed and not c.outbound for c in conns) and self._nursery is not None:
                    self._nursery.start_soon(self.initiate, event.peer)


@contextlib.asynccontextmanager
async def open_holepunch(host: Host, nat: Nat | None = None) -> AsyncIterator[HolePuncher]:
    """Serve ``/libp2p/dcutr`` and punch holes for relayed inbound connections, for the block."""
    puncher = HolePuncher(host, nat)
    host.set_stream_handler(PROTOCOL, puncher.handle)
    try:
        async with trio.open_nursery() as nursery:
            puncher._nursery = nursery
            await nursery.start(puncher.watch)
            try:
                yield puncher
            finally:
                nursery.cancel_scope.cancel()
    finally:
        host.remove_stream_handler(PROTOCOL)
