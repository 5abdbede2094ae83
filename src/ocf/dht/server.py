"""Serving the kad-dht protocol: what a DHT server answers, and the limits on who may ask how much.

Each inbound stream may carry several requests, answered in order (the
spec requires accepting that). A request is bounded in size before it is
parsed, must arrive whole within ``inbound_timeout`` of the previous answer
(trickling bytes does not extend that), and spends one token of its peer's
rate limit; a peer holds at most ``max_streams_per_peer`` streams at once.
Any refusal resets the stream, which is how the protocol signals errors,
and is counted and logged rate-limited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError, TransportError
from ..identity import PeerId
from . import wire
from .limits import checked_peer_id
from .table import key_of

if TYPE_CHECKING:
    from ..transport.muxer import MuxedStream
    from .service import Dht

READ_CHUNK = 16 * 1024


async def serve(dht: Dht, stream: MuxedStream) -> None:
    """Serve one inbound stream: requests in order, each under the rate, size and time limits."""
    peer = stream.remote_peer
    lim = dht.limits
    if (
        dht.inbound_streams.get(peer, 0) >= lim.max_streams_per_peer
        or sum(dht.inbound_streams.values()) >= lim.max_inbound_streams
    ):
        dht.refuse("inbound_refused_streams", "dht: too many inbound streams; reset", peer=peer.short())
        stream.reset()
        return
    dht.inbound_streams[peer] = dht.inbound_streams.get(peer, 0) + 1
    try:
        await _serve_requests(dht, peer, stream)
    finally:
        left = dht.inbound_streams[peer] - 1
        if left:
            dht.inbound_streams[peer] = left
        else:
            del dht.inbound_streams[peer]


async def _serve_requests(dht: Dht, peer: PeerId, stream: MuxedStream) -> None:
    lim = dht.limits
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
                dht.refuse("inbound_malformed", "dht: bad request framing; reset", peer=peer.short(), reason=exc)
                stream.reset()
                return
            for body in frames:
                if not dht.rate.allow(peer, trio.current_time()):
                    dht.refuse("inbound_refused_rate", "dht: peer over its query rate; reset", peer=peer.short())
                    stream.reset()
                    return
                dht.stats["inbound_requests"] += 1
                try:
                    request = wire.decode(body, max_peers=lim.max_closer, max_addrs=lim.max_addrs)
                except ProtocolError as exc:
                    dht.refuse("inbound_malformed", "dht: malformed request; reset", peer=peer.short(), reason=exc)
                    stream.reset()
                    return
                reply = answer(dht, peer, request)
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
        dht.refuse("inbound_timeouts", "dht: request not received in time; reset", peer=peer.short())
        stream.reset()
        return


def answer(dht: Dht, asker: PeerId, request: wire.Message) -> wire.Message | wire.Refused | None:
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
        closer=tuple(_closer_entries(dht, asker, request.key, find_node=mtype == wire.MessageType.FIND_NODE)),
        cluster_level=request.cluster_level,
    )


def _closer_entries(dht: Dht, asker: PeerId, key: bytes, *, find_node: bool) -> list[wire.PeerEntry]:
    target = checked_peer_id(key) if find_node else None
    peers = dht.table.closest(key_of(key), dht.limits.k, exclude=(asker,))
    # Like go-libp2p: a peer we know how to reach is listed when it is the one asked
    # for, even when it is a client and so not in the table (this is how NATed nodes
    # that keep a connection to a server are found).
    if target is not None and target != asker and target not in peers:
        peers.append(target)
    entries = []
    for peer in peers:
        if peer == dht.host.peer_id:
            addrs = [a.without_p2p() for a in dht.host.listen_addrs]
        else:
            addrs = dht.host.peer_addrs(peer) or list(dht.addr_book.get(peer))
        if not addrs:
            continue
        connected = wire.Connectedness.CONNECTED if dht.host.is_connected(peer) else 0
        entries.append(wire.PeerEntry(peer.raw, tuple(a.to_bytes() for a in addrs[: dht.limits.max_addrs]), connected))
    return entries
