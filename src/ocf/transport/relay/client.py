"""The client side of circuit relay v2: dial through relays, be reached through them.

Three jobs, one object (:class:`RelayClient`), attached to the host by
:func:`open_relay_client`:

- **Dial** ``…/p2p/<relay>/p2p-circuit/p2p/<peer>``: the host hands such
  addresses to :meth:`RelayClient.connect`, which opens a ``hop`` stream to
  the relay, asks it to CONNECT, and gives the host that stream as a raw
  connection. The host upgrades it with Noise and yamux like a TCP socket,
  so the relay sees only ciphertext and the peer is authenticated end to end.
- **Be reached**: ``/libp2p/circuit/relay/0.2.0/stop`` accepts a relayed
  connection from a relay we hold a reservation with (a stranger's stop
  stream would let anyone pose as a relay), at most ``max_inbound`` at once,
  and serves it as an inbound connection of the host.
- **Reserve** a slot on relays (:meth:`RelayClient.keep`), refresh it
  before it expires, and publish ``<relay addr>/p2p-circuit`` among the
  host's addresses (identify, and the node table through ``on_addrs``) while
  it holds. Which relays and when is the NAT manager's decision
  (:mod:`ocf.transport.relay.nat`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator, Callable

import attrs
import trio

from ... import log as logfmt
from ...errors import MultiaddrError, PeerUnreachable, ProtocolError, RelayRefused, TransportError
from ...identity import Multiaddr, PeerId
from ..identify import read_message, write_message
from ..tcp import RawConn
from .messages import (
    HOP,
    MAX_MESSAGE,
    STOP,
    HopMessage,
    HopType,
    Limit,
    Peer,
    Status,
    StopMessage,
    StopType,
    open_voucher,
    status_name,
)

if TYPE_CHECKING:
    from ..host import Host
    from ..muxer import MuxedStream

log = logging.getLogger("ocf.transport.relay")

REQUEST_TIMEOUT = 10.0
MAX_INBOUND_RELAYED = 64
MIN_REFRESH = 1.0  # seconds between two reservations on one relay, whatever its TTL says
LIMIT_MEMORY = 30.0  # seconds a circuit cut at its limit is remembered, for the gateway's answer
MAX_LIMIT_HITS = 1024


@attrs.define
class Held:
    """A reservation we hold on a relay."""

    relay: PeerId
    expire: float  # UNIX seconds
    addrs: list[Multiaddr]  # our circuit addresses through this relay, with /p2p/<us>
    limit: Limit | None


class CircuitStream(trio.abc.HalfCloseableStream):
    """A relayed connection's byte stream, watching for the relay cutting it at its limit.

    The relay resets a circuit that reached its time or data limit; the
    connection over it then just fails. So that callers can say why (the
    gateway's 503 ``relay_limit``), a failure after ``limit.duration``
    seconds, or after ``limit.data`` bytes one way, is reported to
    ``on_limit`` at once, before the connection's streams learn of it.
    """

    def __init__(self, stream: MuxedStream, limit: Limit | None, on_limit: Callable[[str], None]) -> None:
        self.stream = stream
        self.limit = limit
        self.sent = 0
        self.received = 0
        self._opened = trio.current_time()
        self._on_limit = on_limit
        self._reported = False

    def _ended(self) -> None:
        lim = self.limit
        if lim is None or self._reported:
            return
        if lim.duration and trio.current_time() - self._opened >= lim.duration - 1:
            reason = f"its limit of {lim.duration} s per relayed connection"
        elif lim.data and max(self.sent, self.received) >= lim.data:
            reason = f"its limit of {lim.data} bytes each way per relayed connection"
        else:
            return
        self._reported = True
        self._on_limit(reason)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.sent += len(data)
            self._ended()
            raise
        self.sent += len(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise
        if not data:
            self._ended()
        self.received += len(data)
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def split_circuit(addr: Multiaddr) -> tuple[Multiaddr, PeerId, PeerId | None]:
    """``(relay part, relay peer, target peer or None)`` of a ``/p2p-circuit`` address."""
    parts = addr.parts
    idx = next((i for i, (name, _) in enumerate(parts) if name == "p2p-circuit"), None)
    if idx is None:
        raise PeerUnreachable(f"{addr} is not a relay address")
    relay_part = Multiaddr(parts[:idx])
    relay = relay_part.peer_id
    if relay is None:
        raise PeerUnreachable(f"{addr}: a relay address needs the relay's /p2p/<id> before /p2p-circuit")
    rest = parts[idx + 1 :]
    if len(rest) > 1 or (rest and rest[0][0] != "p2p"):
        raise PeerUnreachable(f"{addr}: only /p2p/<id> may follow /p2p-circuit")
    return relay_part, relay, addr.peer_id if rest else None


class RelayClient:
    """Dial through relays, accept relayed connections, hold reservations (see the module doc)."""

    def __init__(self, host: Host, *, max_inbound: int = MAX_INBOUND_RELAYED) -> None:
        self.host = host
        self.max_inbound = max_inbound
        self.reservations: dict[PeerId, Held] = {}
        self.inbound = 0
        self.on_addrs: list[Callable[[], None]] = []
        self._log = logfmt.RateLimitedLog(log, host.config.refusal_log_interval)
        self.refused: dict[str, int] = {}
        self.stats = {"relayed_dials": 0, "relayed_inbound": 0, "limits_reached": 0}
        self._limit_hits: dict[PeerId, tuple[float, str]] = {}

    def _refuse(self, reason: str, peer: PeerId, **fields: object) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log.info(reason, "relayed connection refused", reason=reason, peer=peer.short(), **fields)

    def _limit_hit(self, peer: PeerId, reason: str) -> None:
        self.stats["limits_reached"] += 1
        now = trio.current_time()
        if len(self._limit_hits) >= MAX_LIMIT_HITS:
            self._limit_hits = {p: v for p, v in self._limit_hits.items() if v[0] > now - LIMIT_MEMORY}
            if len(self._limit_hits) >= MAX_LIMIT_HITS:
                self._limit_hits.clear()
        self._limit_hits[peer] = (now, reason)
        log.info("relayed connection cut at the relay's limit %s", logfmt.kv(peer=peer.short(), limit=reason))

    def limit_reason(self, peer: PeerId) -> str | None:
        """Why our relayed connection to ``peer`` ended just now, if the relay cut it at its limit."""
        hit = self._limit_hits.get(peer)
        if hit is None or hit[0] < trio.current_time() - LIMIT_MEMORY:
            return None
        return hit[1]

    # --- dialing through a relay (the host's transport for /p2p-circuit) ---------------------

    @contextlib.asynccontextmanager
    async def connect(self, addr: Multiaddr, timeout: float) -> AsyncIterator[RawConn]:  # noqa: ASYNC109 - dial only
        relay_part, relay, target = split_circuit(addr)
        if target is None:
            raise PeerUnreachable(f"{addr}: which peer? a relay address to dial ends in /p2p-circuit/p2p/<id>")
        if relay == self.host.peer_id or target == relay:
            raise PeerUnreachable(f"{addr}: a circuit through ourselves or to the relay itself")
        stream: MuxedStream | None = None
        try:
            with trio.fail_after(timeout):
                if len(relay_part.parts) > 1 and not self.host.is_connected(relay):
                    await self.host.connect(relay_part, learned=True)
                if any(c.relayed for c in self.host.connections(relay)) and not any(
                    not c.relayed for c in self.host.connections(relay)
                ):
                    raise PeerUnreachable(f"relay {relay.short()} is itself reached only through a relay")
                stream = await self.host.new_stream(relay, HOP)
                request = HopMessage(HopType.CONNECT, peer=Peer(target.raw))
                await write_message(stream, request.encode())
                answer = HopMessage.decode(await read_message(stream, MAX_MESSAGE))
        except BaseException as exc:
            if stream is not None:
                stream.reset()
            if isinstance(exc, trio.TooSlowError):
                raise PeerUnreachable(f"relay {relay.short()} did not connect us within {timeout:g}s") from None
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                raise PeerUnreachable(f"relay {relay.short()} closed the stream ({exc or 'EOF'})") from None
            raise
        if answer.type != HopType.STATUS or answer.status != Status.OK:
            stream.reset()
            name = status_name(answer.status)
            raise RelayRefused(f"relay {relay.short()} refused to connect us: {name}", status=name)
        self.stats["relayed_dials"] += 1
        self._limit_hits.pop(target, None)
        circuit = CircuitStream(stream, answer.limit, lambda reason: self._limit_hit(target, reason))
        try:
            yield RawConn(circuit, remote_addr=addr.without_p2p(), local_addr=None, transport="relay")
        finally:
            with contextlib.suppress(TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    # --- being reached: the stop protocol ----------------------------------------------------

    async def handle_stop(self, stream: MuxedStream) -> None:
        relay = stream.remote_peer
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                message = StopMessage.decode(await read_message(stream, MAX_MESSAGE))
            if message.type != StopType.CONNECT or message.peer is None:
                raise ProtocolError("stop stream did not start with CONNECT and a peer")
            src = message.peer.peer_id()
        except trio.TooSlowError:
            self._refuse("stop_timeout", relay)
            return
        except (ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._refuse("stop_malformed", relay, error=exc)
            await self._answer(stream, Status.MALFORMED_MESSAGE)
            return
        conn = self.host.connection_of(stream)
        if relay not in self.reservations or conn is None or conn.relayed:
            self._refuse("stop_not_our_relay", relay)
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        if self.inbound >= self.max_inbound:
            self._refuse("stop_inbound_full", relay, limit=self.max_inbound)
            await self._answer(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        if not await self._answer(stream, Status.OK):
            return
        via = conn.remote_addr.parts if conn.remote_addr is not None else ()
        remote = Multiaddr(tuple(via) + (("p2p", relay.to_string()), ("p2p-circuit", None)))
        self.inbound += 1
        self.stats["relayed_inbound"] += 1
        log.debug("relayed connection %s", logfmt.kv(relay=relay.short(), src=src.short()))
        try:
            self._limit_hits.pop(src, None)
            circuit = CircuitStream(stream, message.limit, lambda reason: self._limit_hit(src, reason))
            await self.host.serve_inbound(RawConn(circuit, remote_addr=remote, local_addr=None, transport="relay"))
        finally:
            self.inbound -= 1

    async def _answer(self, stream: MuxedStream, status: Status) -> bool:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await write_message(stream, StopMessage(StopType.STATUS, status=status).encode())
        except (trio.TooSlowError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    # --- reservations --------------------------------------------------------------------------

    def circuit_addrs(self) -> list[Multiaddr]:
        return [a for held in self.reservations.values() for a in held.addrs]

    async def reserve(self, relay: PeerId) -> Held:
        """Reserve (or refresh) a slot on ``relay``; raises :class:`RelayRefused` or another TransportError."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                stream = await self.host.new_stream(relay, HOP)
                async with stream:
                    await write_message(stream, HopMessage(HopType.RESERVE).encode())
                    answer = HopMessage.decode(await read_message(stream, MAX_MESSAGE))
        except trio.TooSlowError:
            raise PeerUnreachable(f"relay {relay.short()} did not answer our reservation") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerUnreachable(f"relay {relay.short()} closed the stream ({exc or 'EOF'})") from None
        if answer.type != HopType.STATUS or answer.status != Status.OK or answer.reservation is None:
            name = status_name(answer.status)
            raise RelayRefused(f"relay {relay.short()} refused our reservation: {name}", status=name)
        rsvp = answer.reservation
        if rsvp.voucher:
            voucher = open_voucher(rsvp.voucher)
            if voucher.relay != relay or voucher.peer != self.host.peer_id:
                raise ProtocolError("relay's voucher names another relay or peer")
        addrs = []
        for raw in rsvp.addrs:
            try:
                ma = Multiaddr.from_bytes(raw)
            except MultiaddrError:
                continue
            if ma.has("p2p-circuit") or (ma.peer_id is not None and ma.peer_id != relay):
                continue
            addrs.append(ma.without_p2p())
        if not addrs:  # js-libp2p and go-libp2p may send none: the address we reach it at will do
            addrs = [c.remote_addr for c in self.host.connections(relay) if c.remote_addr and not c.relayed]
        circuits = []
        for ma in addrs[:8]:
            circuit = Multiaddr(ma.with_p2p(relay).parts + (("p2p-circuit", None),)).with_p2p(self.host.peer_id)
            if circuit not in circuits:
                circuits.append(circuit)
        held = Held(relay, float(rsvp.expire), circuits, answer.limit)
        self._set(relay, held)
        log.info(
            "relay reservation %s",
            logfmt.kv(relay=relay.short(), expires_in=round(held.expire - time.time()), addrs=len(circuits)),
        )
        return held

    def _set(self, relay: PeerId, held: Held | None) -> None:
        old = self.reservations.pop(relay, None)
        if held is not None:
            self.reservations[relay] = held
        mine = self.host.listen_addrs
        for a in old.addrs if old is not None else ():
            if a in mine:
                mine.remove(a)
        for a in held.addrs if held is not None else ():
            if a not in mine:
                mine.append(a)
        for callback in list(self.on_addrs):
            callback()
        self.host.notify_changed()

    async def keep(self, relay: PeerId, *, task_status: trio.TaskStatus[Held] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold a reservation on ``relay`` until it disconnects or refuses; raises what the first try raised."""
        held = await self.reserve(relay)
        task_status.started(held)
        try:
            while True:
                refresh_at = time.time() + max(MIN_REFRESH, (held.expire - time.time()) / 2)
                while time.time() < refresh_at and self.host.is_connected(relay):
                    with trio.move_on_after(max(0.0, refresh_at - time.time())):
                        await self.host.wait_changed()
                if not self.host.is_connected(relay):
                    log.info("relay disconnected; reservation dropped %s", logfmt.kv(relay=relay.short()))
                    return
                try:
                    held = await self.reserve(relay)
                except TransportError as exc:
                    log.warning("relay reservation lost %s", logfmt.kv(relay=relay.short(), reason=exc))
                    return
        finally:
            self._set(relay, None)


@contextlib.asynccontextmanager
async def open_relay_client(host: Host) -> AsyncIterator[RelayClient]:
    """Attach a :class:`RelayClient` to ``host`` (stop handler, ``/p2p-circuit`` dialing) for the block."""
    client = RelayClient(host)
    host.set_stream_handler(STOP, client.handle_stop)
    host.set_circuit_transport(client)
    try:
        yield client
    finally:
        host.set_circuit_transport(None)
        host.remove_stream_handler(STOP)
