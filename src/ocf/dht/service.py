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
from . import server, wire
from .limits import AddrBook, DhtLimits, PeerRateLimiter, checked_peer_id, parse_addrs
from .lookup import Lookup
from .table import RoutingTable, key_in_bucket, key_of

log = logging.getLogger("ocf.dht")

READ_CHUNK = 16 * 1024
#: Buckets a refresh looks into (go-libp2p refreshes up to 15; deeper ones hold almost no peers below millions
#: of nodes).
REFRESH_BUCKETS = 12
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
        self.inbound_streams: dict[PeerId, int] = {}
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

    def refuse(self, key: str, message: str, **fields: Any) -> None:
        self.stats[key] += 1
        self._refusals.info(key, message, **fields)

    # --- routing table upkeep ------------------------------------------------------------------

    def _on_identify(self, peer: PeerId, info: PeerInfo) -> None:
        if self.protocol in info.protocols:
            self._note_server(peer)
        else:
            self.table.remove(peer)  # it stopped serving (or never did): clients stay out of tables

    def set_mode(self, mode: str) -> None:
        """Switch role at run time (e.g. when AutoNAT learns whether we are reachable).

        Peers see the change on their next identify of us; until then a
        former server's streams are refused and it drops out of their tables
        at its first failed query.
        """
        if mode not in ("server", "client"):
            raise ValueError(f"DHT mode must be 'server' or 'client', not {mode!r}")
        if mode == self.mode:
            return
        self.mode = mode
        if mode == "server":
            self.host.set_stream_handler(self.protocol, self._serve)
        else:
            self.host.remove_stream_handler(self.protocol)
        log.info("dht mode changed %s", logfmt.kv(mode=mode))

    async def wait_ready(self) -> None:
        """Return once the routing table holds a server (lookups can start)."""
        await self._nonempty.wait()

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
                await self.refresh()
                await trio.sleep(self.limits.refresh_interval)
        finally:
            self.host.set_peer_resolver(None)
            with contextlib.suppress(ValueError):
                self.host.identify_listeners.remove(self._on_identify)
            if self.serving:
                self.host.remove_stream_handler(self.protocol)

    # --- serving (ocf.dht.server) -----------------------------------------------------------------

    async def _serve(self, stream: MuxedStream) -> None:
        await server.serve(self, stream)

    def answer(self, asker: PeerId, request: wire.Message) -> wire.Message | wire.Refused | None:
        """The reply to one request (None: no reply expected; :data:`wire.REFUSED`: reset the stream)."""
        return server.answer(self, asker, request)

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
        with trio.fail_after(lim.rpc_timeout):
            stream = await self._open(peer)
            async with stream:
                self.stats["rpcs"] += 1  # requests actually sent
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
            self.refuse("replies_refused", "dht: bad reply; peer dropped", peer=peer.short(), reason=exc)
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
                self.refuse("bad_peer_ids", "dht: reply lists an invalid peer ID; entry ignored")
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

    async def refresh(self) -> None:
        """Look ourselves up, then into each shallow bucket that is not full (as go-libp2p refreshes).

        The self-lookup fills the buckets near us and lets the servers we
        reach learn of us; the bucket lookups find peers for the far
        buckets, which a self-lookup never visits.
        """
        await self.find_closest(self.host.peer_id.raw)
        sizes = self.table.bucket_sizes()
        depth = min(max(sizes, default=-1) + 1, REFRESH_BUCKETS)
        for cpl in range(depth):
            if sizes.get(cpl, 0) < self.limits.k:
                await self.find_closest(key_in_bucket(self.table.local_key, cpl))

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
                        self.addr_book.drop(peer)
                        self.refuse(
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
            self.refuse("lookups_refused", "dht: too many lookups in progress; not looking up", peer=peer.short())
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
