"""The relay side of circuit relay v2: ``/libp2p/circuit/relay/0.2.0/hop`` (``--relay``).

A relay lends its reachability to peers that have none: a peer behind NAT
reserves a slot (RESERVE), others reach it by asking the relay to CONNECT
them, and the relay splices the two streams. Relaying costs the relay its
bandwidth and memory on behalf of strangers, so everything is capped, with
go-libp2p's defaults (``relay.DefaultResources``) so that operators see the
limits they know:

- reservations: one hour each, 128 in all, 8 per IP address;
- relayed connections ("circuits"): 2 minutes and 128 KiB per direction
  each, then both ends are reset; 16 per peer (as source or target) and
  :data:`MAX_CIRCUITS_TOTAL` in all;
- every hop request: a per-peer token bucket, a deadline for the request
  message, and a size bound before it is parsed.

Both RESERVE and CONNECT are refused over a relayed connection (the spec's
advice): a relay must not become a chain of relays.
Refusals are counted in :attr:`RelayService.stats` and logged rate-limited.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

import attrs
import trio

from ... import log as logfmt
from ...errors import ProtocolError, TransportError
from ...identity import Multiaddr, PeerId
from ..identify import read_message, write_message
from ..resources import ip_key
from .messages import (
    HOP,
    MAX_MESSAGE,
    STOP,
    HopMessage,
    HopType,
    Limit,
    Peer,
    Reservation,
    Status,
    StopMessage,
    StopType,
    make_voucher,
    status_name,
)

if TYPE_CHECKING:
    from ..host import Host
    from ..muxer import MuxedStream

log = logging.getLogger("ocf.transport.relay")

MAX_CIRCUITS_TOTAL = 256
REQUEST_TIMEOUT = 10.0  # for the hop request message, and for the target's answer to STOP CONNECT
COPY_CHUNK = 64 << 10
RATE_KEYS = 4096  # per-peer buckets kept; past it the fullest (idle) are dropped


@attrs.frozen
class RelayLimits:
    """What one relay lends (go-libp2p's ``relay.DefaultResources`` and ``DefaultLimit``)."""

    reservation_ttl: float = 3600.0
    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    max_circuits: int = 16
    max_circuits_total: int = MAX_CIRCUITS_TOTAL
    circuit_duration: int = 120
    circuit_data: int = 1 << 17
    hop_rate: float = 1.0  # hop requests per second per peer
    hop_burst: int = 16

    @property
    def limit(self) -> Limit:
        return Limit(self.circuit_duration, self.circuit_data)


@attrs.define
class _Slot:
    peer: PeerId
    ip: str | None
    expire: float  # time.time()


class _Buckets:
    """Per-peer token buckets for hop requests, bounded in number of peers."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._b: dict[PeerId, tuple[float, float]] = {}

    def take(self, peer: PeerId, now: float) -> bool:
        tokens, at = self._b.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._b[peer] = (tokens - 1.0 if ok else tokens, now)
        if len(self._b) > RATE_KEYS:
            for key in list(self._b)[: RATE_KEYS // 4]:  # oldest first (dicts keep insertion order)
                del self._b[key]
        return ok


class RelayService:
    """Serves the hop protocol on ``host``; build with :func:`open_relay_service`."""

    def __init__(self, host: Host, limits: RelayLimits | None = None) -> None:
        self.host = host
        self.limits = limits or RelayLimits()
        self.reservations: dict[PeerId, _Slot] = {}
        self.circuits: dict[PeerId, int] = {}  # live circuits per peer, as source or target
        self.circuits_total = 0
        self._rate = _Buckets(self.limits.hop_rate, self.limits.hop_burst)
        self._log = logfmt.RateLimitedLog(log, host.config.refusal_log_interval)
        self.stats: dict[str, int] = {
            "reservations_accepted": 0,
            "circuits_opened": 0,
            "circuits_limit_reached": 0,
            "bytes_relayed": 0,
        }
        self.refused: dict[str, int] = {}

    # --- bookkeeping --------------------------------------------------------------------

    def _refuse(self, reason: str, peer: PeerId, **fields: object) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log.info(reason, "relay refused a request", reason=reason, peer=peer.short(), **fields)

    def _expire(self, now: float) -> None:
        for peer, slot in list(self.reservations.items()):
            if slot.expire <= now or not self.host.is_connected(peer):
                del self.reservations[peer]

    def has_reservation(self, peer: PeerId) -> bool:
        slot = self.reservations.get(peer)
        return slot is not None and slot.expire > time.time() and self.host.is_connected(peer)

    def public_addrs(self) -> list[Multiaddr]:
        """Where reserving peers tell others to find this relay: our listen addresses with ``/p2p``."""
        return [a.with_p2p(self.host.peer_id) for a in self.host.listen_addrs if not a.has("p2p-circuit")]

    # --- hop -------------------------------------------------------------------------------

    async def handle_hop(self, stream: MuxedStream) -> None:
        peer = stream.remote_peer
        conn = self.host.connection_of(stream)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                message = HopMessage.decode(await read_message(stream, MAX_MESSAGE))
        except trio.TooSlowError:
            self._refuse("hop_request_timeout", peer)
            return
        except (ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._refuse("hop_malformed", peer, error=exc)
            await self._reply(stream, Status.MALFORMED_MESSAGE)
            return
        if conn is None or conn.transport == "relay":
            self._refuse("hop_over_relay", peer)
            await self._reply(stream, Status.PERMISSION_DENIED)
            return
        if not self._rate.take(peer, trio.current_time()):
            self._refuse("hop_rate", peer)
            await self._reply(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        if message.type == HopType.RESERVE:
            await self._reserve(stream, peer, ip_key(conn.remote_addr))
        elif message.type == HopType.CONNECT:
            await self._connect(stream, peer, message)
        else:
            self._refuse("hop_unexpected", peer, type=message.type.name)
            await self._reply(stream, Status.UNEXPECTED_MESSAGE)

    async def _reply(self, stream: MuxedStream, status: Status, **extra: object) -> None:
        message = HopMessage(HopType.STATUS, status=status, **extra)  # type: ignore[arg-type]
        with contextlib.suppress(TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.fail_after(REQUEST_TIMEOUT):
                await write_message(stream, message.encode())

    async def _reserve(self, stream: MuxedStream, peer: PeerId, ip: str | None) -> None:
        now = time.time()
        self._expire(now)
        lim = self.limits
        if peer not in self.reservations:
            if len(self.reservations) >= lim.max_reservations:
                self._refuse("reservations_full", peer, limit=lim.max_reservations)
                await self._reply(stream, Status.RESERVATION_REFUSED)
                return
            if ip is not None and sum(1 for s in self.reservations.values() if s.ip == ip) >= (
                lim.max_reservations_per_ip
            ):
                self._refuse("reservations_per_ip", peer, limit=lim.max_reservations_per_ip)
                await self._reply(stream, Status.RESERVATION_REFUSED)
                return
        expire = int(now + lim.reservation_ttl)
        self.reservations[peer] = _Slot(peer, ip, float(expire))
        self.stats["reservations_accepted"] += 1
        reservation = Reservation(
            expire=expire,
            addrs=tuple(a.to_bytes() for a in self.public_addrs()),
            voucher=make_voucher(self.host.identity, peer, expire),
        )
        log.debug("reservation %s", logfmt.kv(peer=peer.short(), expire=expire))
        await self._reply(stream, Status.OK, reservation=reservation, limit=lim.limit)

    def _take_circuit(self, src: PeerId, dst: PeerId) -> bool:
        lim = self.limits
        if self.circuits_total >= lim.max_circuits_total:
            return False
        if self.circuits.get(src, 0) >= lim.max_circuits or self.circuits.get(dst, 0) >= lim.max_circuits:
            return False
        self.circuits_total += 1
        for p in (src, dst):
            self.circuits[p] = self.circuits.get(p, 0) + 1
        return True

    def _give_circuit(self, src: PeerId, dst: PeerId) -> None:
        self.circuits_total -= 1
        for p in (src, dst):
            left = self.circuits.get(p, 0) - 1
            if left > 0:
                self.circuits[p] = left
            else:
                self.circuits.pop(p, None)

    async def _connect(self, stream: MuxedStream, src: PeerId, message: HopMessage) -> None:
        try:
            if message.peer is None:
                raise ProtocolError("CONNECT without a peer")
            dst = message.peer.peer_id()
        except ProtocolError as exc:
            self._refuse("hop_malformed", src, error=exc)
            await self._reply(stream, Status.MALFORMED_MESSAGE)
            return
        if dst in (src, self.host.peer_id):
            self._refuse("hop_loop", src)
            await self._reply(stream, Status.PERMISSION_DENIED)
            return
        if not self.has_reservation(dst):
            self._refuse("no_reservation", src, target=dst.short())
            await self._reply(stream, Status.NO_RESERVATION)
            return
        if not self._take_circuit(src, dst):
            self._refuse("circuits_full", src, target=dst.short(), total=self.circuits_total)
            await self._reply(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        try:
            async with self._open_stop(src, dst) as stop:
                if stop is None:
                    await self._reply(stream, Status.CONNECTION_FAILED)
                    return
                limit = self.limits.limit
                await self._reply(stream, Status.OK, limit=limit)
                self.stats["circuits_opened"] += 1
                log.debug("circuit open %s", logfmt.kv(src=src.short(), dst=dst.short()))
                if await splice(stream, stop, limit, self.stats):
                    self.stats["circuits_limit_reached"] += 1
        finally:
            self._give_circuit(src, dst)

    @contextlib.asynccontextmanager
    async def _open_stop(self, src: PeerId, dst: PeerId) -> AsyncIterator[MuxedStream | None]:
        """The stop stream to ``dst`` once it accepted the circuit, else None (and the stream is gone)."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                stop = await self.host.new_stream(dst, STOP)
                request = StopMessage(StopType.CONNECT, peer=Peer(src.raw), limit=self.limits.limit)
                await write_message(stop, request.encode())
                answer = StopMessage.decode(await read_message(stop, MAX_MESSAGE))
        except (trio.TooSlowError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._refuse("stop_failed", src, target=dst.short(), error=exc or type(exc).__name__)
            yield None
            return
        if answer.type != StopType.STATUS or answer.status != Status.OK:
            self._refuse("stop_refused", src, target=dst.short(), status=status_name(answer.status))
            stop.reset()
            yield None
            return
        try:
            yield stop
        finally:
            with contextlib.suppress(TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
                await stop.aclose()


async def splice(a: MuxedStream, b: MuxedStream, limit: Limit, stats: dict[str, int]) -> bool:
    """Copy both ways until both ends closed, a limit is reached (True) or either stream fails.

    A direction that reaches ``limit.data`` bytes, or a circuit older than
    ``limit.duration`` seconds, resets both streams, as the spec says.
    """
    hit = False

    async def pipe(src: MuxedStream, dst: MuxedStream, cancel: trio.CancelScope) -> None:
        nonlocal hit
        sent = 0
        try:
            while True:
                chunk = await src.receive_some(COPY_CHUNK)
                if not chunk:
                    await dst.send_eof()
                    return
                if limit.data and sent + len(chunk) > limit.data:
                    # Up to the limit exactly (as go-libp2p's limited copy), so both ends can tell
                    # a circuit cut at its limit from one that failed.
                    await dst.send_all(chunk[: limit.data - sent])
                    stats["bytes_relayed"] += limit.data - sent
                    hit = True
                    cancel.cancel()
                    return
                await dst.send_all(chunk)
                sent += len(chunk)
                stats["bytes_relayed"] += len(chunk)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            cancel.cancel()

    with trio.CancelScope() as scope:
        if limit.duration:
            scope.deadline = trio.current_time() + limit.duration
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, a, b, scope)
            nursery.start_soon(pipe, b, a, scope)
    if scope.cancelled_caught:
        hit = hit or (limit.duration > 0 and trio.current_time() >= scope.deadline)
        a.reset()
        b.reset()
    return hit


@contextlib.asynccontextmanager
async def open_relay_service(host: Host, limits: RelayLimits | None = None) -> AsyncIterator[RelayService]:
    """Serve ``/libp2p/circuit/relay/0.2.0/hop`` on ``host`` for the duration of the block."""
    service = RelayService(host, limits)
    host.set_stream_handler(HOP, service.handle_hop)
    try:
        yield service
    finally:
        host.remove_stream_handler(HOP)
