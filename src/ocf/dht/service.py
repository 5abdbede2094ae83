"""The Kademlia DHT on a host: serving FIND_NODE, iterative lookups, and the host's address resolver.

``async with open_dht(host, config) as dht:`` runs it. The DHT answers one
question, "where is this peer": services stay in the node table. It plugs
into the host as its peer resolver, so ``host.new_stream(peer, …)`` for a
peer with no known address looks the peer up, dials what it finds with the
peer ID expected (the Noise handshake proves the key) and carries on.

Roles (libp2p spec): a *server* registers the protocol, so identify
advertises it and peers put it in their routing tables; a *client* only
asks. Both keep in their table only peers that advertise the protocol or
answered a query. Which role ``--dht auto`` takes is :func:`choose_mode`,
the one place to change when reachability is measured rather than assumed.

Only FIND_NODE matters to us; GET_VALUE and GET_PROVIDERS are answered with
closer peers and nothing stored (what a server with an empty store says),
PING is echoed, PUT_VALUE is refused and ADD_PROVIDER ignored.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio

from .. import log as logfmt
from ..config import Config
from ..errors import ProtocolError, TransportError
from ..identity import Multiaddr, PeerId
from ..transport.host import Host, PeerInfo
from ..transport.muxer import MuxedStream
from . import wire
from .limits import AddrBook, DhtLimits, PeerRateLimiter, checked_peer_id, parse_addrs
from .lookup import Lookup
from .table import RoutingTable, key_of

log = logging.getLogger("ocf.dht")

READ_CHUNK = 16 * 1024
#: Found-by-lookup answers: a reply's entry for the target stops the lookup once one of its addresses dials.
StopCheck = Callable[[PeerId, wire.Message], Awaitable[bool]]


def choose_mode(config: Config, reachable: bool | None = None) -> str:
    """``"server"`` or ``"client"`` for ``--dht``; ``auto`` serves when the node is reachable.

    Until reachability is measured (``reachable``, from AutoNAT), a node is
    taken as reachable when it is a standalone node (others bootstrap to it)
    or its operator gave ``--public-addr``.
    """
    if config.dht in ("server", "client"):
        return config.dht
    if reachable is not None:
        return "server" if reachable else "client"
    return "server" if config.mode == "standalone" or config.public_addr else "client"


class Dht:
    """One node's DHT; build with :func:`open_dht` (tests may pass ``limits`` and ``mode``)."""

    def __init__(self, host: Host, *, mode: str, protocol: str, limits: DhtLimits | None = None) -> None:
        self.host = host
        self.mode = mode
        self.protocol = protocol
        self.limits = limits or DhtLimits()
        self.table = RoutingTable(host.peer_id, k=self.limits.k)
        self.addr_book = AddrBook(self.limits.addr_book_peers, self.limits.max_addrs)
        self.rate = PeerRateLimiter(self.limits.query_rate, self.limits.query_burst, self.limits.max_tracked_peers)
        self._lookups = trio.Semaphore(self.limits.max_lookups)
        self._finding: dict[PeerId, trio.Event] = {}
        self._not_found: OrderedDict[PeerId, float] = OrderedDict()
        self._inbound: dict[PeerId, int] = {}
        self._nonempty = trio.Event()
        self._refusals = logfmt.RateLimitedLog(log, host.config.refusal_log_interval)
        self.stats: dict[str, int] = {
            "inbound_requests": 0,
            "inbound_refused_rate": 0,
            "inbound_refused_streams": 0,
            "inbound_malformed": 0,
            "inbound_timeouts": 0,
            "rpcs": 0,
            "rpc_failures": 0,
            "replies_refused": 0,
            "bad_peer_ids": 0,
            "target_addr_mismatch": 0,
            "lookups": 0,
            "lookups_refused": 0,
            "peers_found": 0,
        }

    @property
    def serving(self) -> bool:
        return self.mode == "server"

    def _refuse(self, key: str, message: str, **fields: Any) -> None:
        self.stats[key] += 1
        self._refusals.info(key, message, **fields)

    # --- routing table upkeep ------------------------------------------------------------------

    def _on_identify(self, peer: PeerId, info: PeerInfo) -> None:
        if self.protocol in info.protocols:
            self._note_server(peer)
        else:
            self.table.remove(peer)  # it stopped serving (or never did): clients stay out of tables

    def _note_server(self, peer: PeerId) -> None:
        if self.table.add(peer):
            self._nonempty.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve (in server mode), resolve addresses for the host, keep the table fresh."""
        if self.serving:
            self.host.set_stream_handler(self.protocol, self._serve)
        self.host.identify_listeners.append(self._on_identify)
        self.host.set_peer_resolver(self.resolve)
        for peer in self.host.connected_peers():
            info = self.host.peer_info(peer)
            if info is not None:
                self._on_identify(peer, info)
        try:
            task_status.started()
            if self.limits.refresh_interval <= 0:
                await trio.sleep_forever()  # tests drive lookups themselves
            while self.limits.refresh_interval > 0:
                # A self-lookup fills the buckets near us and makes servers we reach learn of us.
                await self._nonempty.wait()
                await self.find_closest(self.table.local_key)
                await trio.sleep(self.limits.refresh_interval)
        finally:
            self.host.set_peer_resolver(None)
            with contextlib.suppress(ValueError):
                self.host.identify_listeners.remove(self._on_identify)
            if self.serving:
                self.host.remove_stream_handler(self.protocol)

    # --- serving ---------------------------------------------------------------------------------

    async def _serve(self, stream: MuxedStream) -> None:
        peer = stream.remote_peer
        lim = self.limits
        if (
            self._inbound.get(peer, 0) >= lim.max_streams_per_peer
            or sum(self._inbound.values()) >= lim.max_inbound_streams
        ):
            self._refuse("inbound_refused_streams", "dht: too many inbound streams; reset", peer=peer.short())
            stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        try:
            await self._serve_requests(peer, stream)
        finally:
            left = self._inbound[peer] - 1
            if left:
                self._inbound[peer] = left
            else:
                del self._inbound[peer]

    async def _serve_requests(self, peer: PeerId, stream: MuxedStream) -> None:
        lim = self.limits
        reader = wire.FrameReader(lim.max_request)
        # One deadline per request, from the wait for its first byte to its last: trickling
        # bytes does not extend it.
        deadline = trio.current_time() + lim.inbound_timeout
        while True:
            with trio.move_on_at(deadline):
                try:
                    chunk = await stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError):
                    return
                try:
                    frames = reader.feed(chunk)
                except ProtocolError as exc:
                    self._refuse("inbound_malformed", "dht: bad request framing; reset", peer=peer.short(), reason=exc)
                    stream.reset()
                    return
                for body in frames:
                    if not self.rate.allow(peer, trio.current_time()):
                        self._refuse("inbound_refused_rate", "dht: peer over its query rate; reset", peer=peer.short())
                        stream.reset()
                        return
                    self.stats["inbound_requests"] += 1
                    try:
                        request = wire.decode(body, max_peers=lim.max_closer, max_addrs=lim.max_addrs)
                    except ProtocolError as exc:
                        self._refuse(
                            "inbound_malformed", "dht: malformed request; reset", peer=peer.short(), reason=exc
                        )
                        stream.reset()
                        return
                    reply = self.answer(peer, request)
                    if reply is wire.REFUSED:
                        stream.reset()
                        return
                    if reply is not None:
                        try:
                            await stream.send_all(wire.frame(reply))
                        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportError):
                            return
                    deadline = trio.current_time() + lim.inbound_timeout
                if not chunk:
                    return  # the asker is done
                continue
            self._refuse("inbound_timeouts", "dht: request not received in time; reset", peer=peer.short())
            stream.reset()
            return

    def answer(self, asker: PeerId, request: wire.Message) -> wire.Message | wire.Refused | None:
        """The reply to one request (None: no reply expected; :data:`wire.REFUSED`: reset the stream)."""
        mtype = request.type
        if mtype == wire.MessageType.PING:
            return wire.Message(wire.MessageType.PING, cluster_level=request.cluster_level)
        if mtype == wire.MessageType.ADD_PROVIDER:
            return None
        if mtype not in (wire.MessageType.FIND_NODE, wire.MessageType.GET_VALUE, wire.MessageType.GET_PROVIDERS):
            return wire.REFUSED  # PUT_VALUE (we store nothing) or a type we do not know
        if not request.key or len(request.key) > wire.MAX_KEY:
            return wire.REFUSED
        return wire.Message(
            mtype,
            key=request.key if mtype != wire.MessageType.FIND_NODE else b"",
            closer=tuple(self._closer_entries(asker, request.key, find_node=mtype == wire.MessageType.FIND_NODE)),
            cluster_level=request.cluster_level,
        )

    def _closer_entries(self, asker: PeerId, key: bytes, *, find_node: bool) -> list[wire.PeerEntry]:
        target = checked_peer_id(key) if find_node else None
        peers = self.table.closest(key_of(key), self.limits.k, exclude=(asker,))
        # Like go-libp2p: a peer we know how to reach is listed when it is the one asked
        # for, even when it is a client and so not in the table (this is how NATed nodes
        # that keep a connection to a server are found).
        if target is not None and target != asker and target not in peers:
            peers.append(target)
        entries = []
        for peer in peers:
            if peer == self.host.peer_id:
                addrs = [a.without_p2p() for a in self.host.listen_addrs]
            else:
                addrs = self.host.peer_addrs(peer) or list(self.addr_book.get(peer))
            if not addrs:
                continue
            connected = wire.Connectedness.CONNECTED if self.host.is_connected(peer) else 0
            entries.append(
                wire.PeerEntry(peer.raw, tuple(a.to_bytes() for a in addrs[: self.limits.max_addrs]), connected)
            )
        return entries

    # --- asking ----------------------------------------------------------------------------------

    async def _open(self, peer: PeerId) -> MuxedStream:
        """A stream to ``peer``; a peer we only heard of is dialed at the addresses we were told."""
        if not self.host.is_connected(peer) and not self.host.peer_addrs(peer):
            reasons = []
            for addr in self.addr_book.get(peer):
                try:
                    await self.host.connect(addr.with_p2p(peer), learned=True)
                    break
                except TransportError as exc:
                    reasons.append(str(exc))
            else:
                raise TransportError(f"no address of {peer.short()} answered ({len(reasons)} tried)")
        return await self.host.new_stream(peer, self.protocol)

    async def request(self, peer: PeerId, message: wire.Message) -> wire.Message:
        """One RPC: open a stream, send ``message``, read one reply under the size and time limits."""
        lim = self.limits
        self.stats["rpcs"] += 1
        with trio.fail_after(lim.rpc_timeout):
            stream = await self._open(peer)
            async with stream:
                await stream.send_all(wire.frame(message))
                reader = wire.FrameReader(lim.max_response)
                while True:
                    chunk = await stream.receive_some(READ_CHUNK)
                    if not chunk:
                        raise ProtocolError("stream ended before the kad reply")
                    frames = reader.feed(chunk)
                    if frames:
                        return wire.decode(frames[0], max_peers=lim.max_closer, max_addrs=lim.max_addrs)

    async def _query(
        self, peer: PeerId, key: bytes, send: trio.MemorySendChannel[tuple[PeerId, wire.Message | None]]
    ) -> None:
        try:
            reply: wire.Message | None = await self.request(peer, wire.Message(wire.MessageType.FIND_NODE, key=key))
        except ProtocolError as exc:
            self._refuse("replies_refused", "dht: bad reply; peer dropped", peer=peer.short(), reason=exc)
            reply = None
        except (TransportError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("dht query failed %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__))
            reply = None
        if reply is None:
            self.stats["rpc_failures"] += 1
            self.table.remove(peer)
        else:
            self._note_server(peer)  # it answered: it serves the DHT
        send.send_nowait((peer, reply))

    def _absorb(self, reply: wire.Message) -> list[PeerId]:
        """The peers a reply lists that we could ask next; their addresses go to the addr book."""
        out = []
        for entry in reply.closer:
            peer = checked_peer_id(entry.id)
            if peer is None:
                self._refuse("bad_peer_ids", "dht: reply lists an invalid peer ID; entry ignored")
                continue
            if peer == self.host.peer_id:
                continue
            known = self.host.is_connected(peer) or bool(self.host.peer_addrs(peer))
            if not known:
                addrs = parse_addrs(entry.addrs)
                if not addrs:
                    continue
                self.addr_book.put(peer, addrs)
            out.append(peer)
        return out

    async def lookup(self, key: bytes, stop: StopCheck | None = None) -> Lookup:
        """An iterative FIND_NODE for ``key`` (a binary peer ID); returns the finished :class:`Lookup`."""
        lim = self.limits
        target = key_of(key)
        state = Lookup(
            target,
            self.table.closest(target, lim.k),
            local=self.host.peer_id,
            k=lim.k,
            alpha=lim.alpha,
            max_queries=lim.max_queries,
        )
        self.stats["lookups"] += 1
        send, recv = trio.open_memory_channel[tuple[PeerId, wire.Message | None]](math.inf)
        with trio.move_on_after(lim.lookup_timeout):
            async with trio.open_nursery() as nursery:
                while True:
                    for peer in state.next_queries():
                        nursery.start_soon(self._query, peer, key, send)
                    if state.done or state.in_flight == 0:
                        break
                    peer, reply = await recv.receive()
                    if reply is None:
                        state.on_failure(peer)
                        continue
                    state.on_response(peer, self._absorb(reply))
                    if stop is not None and await stop(peer, reply):
                        break
                nursery.cancel_scope.cancel()
        return state

    async def find_closest(self, key: bytes) -> list[PeerId]:
        """The (up to k) DHT servers closest to ``key`` that answered us."""
        async with self._lookups:
            return (await self.lookup(key)).closest()

    async def find_peer(self, peer: PeerId) -> list[Multiaddr]:
        """Addresses of ``peer`` proved by connecting to it with its ID expected; [] if not found."""
        if peer == self.host.peer_id:
            return []
        if self.host.is_connected(peer):
            return self.host.peer_addrs(peer)
        tried: set[Multiaddr] = set()
        found: list[Multiaddr] = []

        async def stop(responder: PeerId, reply: wire.Message) -> bool:
            for entry in reply.closer:
                if entry.id != peer.raw:
                    continue
                for addr in parse_addrs(entry.addrs):
                    if addr in tried:
                        continue
                    tried.add(addr)
                    try:
                        await self.host.connect(addr.with_p2p(peer), learned=True)
                    except TransportError as exc:
                        self._refuse(
                            "target_addr_mismatch",
                            "dht: a listed address of the target did not answer as it",
                            peer=peer.short(),
                            by=responder.short(),
                            reason=exc,
                        )
                        continue
                    found.append(addr)
                    return True
            return self.host.is_connected(peer)

        async with self._lookups:
            await self.lookup(peer.raw, stop)
        if found:
            self.stats["peers_found"] += 1
            return found
        if self.host.is_connected(peer):
            self.stats["peers_found"] += 1
            return self.host.peer_addrs(peer)
        return []

    async def resolve(self, peer: PeerId) -> Sequence[Multiaddr]:
        """The host's resolver: one lookup per peer at a time, failures remembered for a while."""
        now = trio.current_time()
        failed_at = self._not_found.get(peer)
        if failed_at is not None and now - failed_at < self.limits.negative_ttl:
            self.stats["lookups_refused"] += 1
            return []
        pending = self._finding.get(peer)
        if pending is not None:
            await pending.wait()
            return self.host.peer_addrs(peer)
        if len(self._finding) >= self.limits.max_lookups:
            self._refuse("lookups_refused", "dht: too many lookups in progress; not looking up", peer=peer.short())
            return []
        done = self._finding[peer] = trio.Event()
        try:
            addrs = await self.find_peer(peer)
        finally:
            del self._finding[peer]
            done.set()
        if not addrs:
            self._not_found[peer] = trio.current_time()
            self._not_found.move_to_end(peer)
            while len(self._not_found) > self.limits.max_negative:
                self._not_found.popitem(last=False)
        return addrs


@contextlib.asynccontextmanager
async def open_dht(
    host: Host, config: Config, *, mode: str | None = None, limits: DhtLimits | None = None
) -> AsyncIterator[Dht]:
    """Run the DHT on ``host`` for the block (mode from ``--dht`` unless given)."""
    dht = Dht(
        host,
        mode=mode or choose_mode(config),
        protocol=config.dht_protocol,
        limits=limits or DhtLimits.from_config(config),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(dht.run)
        log.info("dht started %s", logfmt.kv(mode=dht.mode, protocol=dht.protocol))
        try:
            yield dht
        finally:
            nursery.cancel_scope.cancel()
