"""What one DHT node lets peers (and its own clients) make it do, and the checks on what they tell it.

Every figure a hostile peer could push on is bounded here: how often it may
ask (:class:`PeerRateLimiter`), how much it may send before we parse (the
frame limits in :mod:`ocf.dht.wire`), how many peers and addresses a reply
may list, how long an exchange may take, how many lookups run at once, and
how many third-party addresses we remember (:class:`AddrBook`). A listed
peer ID must be one a key can stand behind (:func:`checked_peer_id`);
whether the addresses listed for it really are its own is settled only by
dialing them with that ID expected, which the Noise handshake proves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

from ..config import Config
from ..errors import IdentityError, MultiaddrError
from ..identity import Multiaddr, PeerId
from ..identity.keys import decode_public_key
from ..identity.peerid import MH_IDENTITY
from . import wire
from .lookup import ALPHA, MAX_QUERIES
from .table import K

#: libp2p key types whose public keys are small enough to be inlined in a peer ID, and their sizes.
INLINE_KEY_SIZES = {1: 32, 2: 33}  # Ed25519, secp256k1


@attrs.frozen
class DhtLimits:
    """Budgets of one DHT node (defaults follow go-libp2p-kad-dht where it has one)."""

    k: int = K
    alpha: int = ALPHA
    max_queries: int = MAX_QUERIES
    rpc_timeout: float = 10.0  # one request and its reply, dial included
    lookup_timeout: float = 30.0  # a whole iterative lookup
    inbound_timeout: float = 10.0  # each inbound request, first byte to last, and the idle wait before it
    max_request: int = wire.MAX_REQUEST
    max_response: int = wire.MAX_RESPONSE
    max_closer: int = wire.MAX_CLOSER_PEERS
    max_addrs: int = wire.MAX_ADDRS_PER_PEER
    query_rate: float = 10.0  # inbound requests per second per peer
    query_burst: float = 50.0
    max_streams_per_peer: int = 4  # concurrent inbound DHT streams per peer
    max_inbound_streams: int = 256  # concurrent inbound DHT streams in all
    max_tracked_peers: int = 4096  # rate-limiter entries
    max_lookups: int = 16  # concurrent outbound lookups (the gateway can start them)
    negative_ttl: float = 30.0  # seconds a peer not found is not looked up again
    max_negative: int = 1024
    addr_book_peers: int = 2048  # peers whose third-party addresses we remember
    refresh_interval: float = 600.0  # seconds between self-lookups that keep the table fresh (0: none)

    @classmethod
    def from_config(cls, config: Config) -> DhtLimits:
        return cls(query_rate=config.dht_query_rate, query_burst=5 * config.dht_query_rate)


class PeerRateLimiter:
    """A token bucket per peer, in an LRU bounded at ``max_peers`` entries.

    Forgetting the least recently active peer refills its bucket; to gain
    from that an attacker needs ``max_peers`` live identities, each paying
    for a connection and a handshake.
    """

    def __init__(self, rate: float, burst: float, max_peers: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: OrderedDict[PeerId, tuple[float, float]] = OrderedDict()  # peer -> (tokens, stamp)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, peer: PeerId, now: float) -> bool:
        tokens, stamp = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - stamp) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[peer] = (tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed


class AddrBook:
    """Addresses third parties gave for peers, LRU-bounded, kept apart from the host's own book.

    What a DHT reply says about other peers is hearsay: it may be stale or a
    lie meant to crowd out real addresses. So it never overwrites what the
    host learned first-hand (identify, the node table, the operator); the
    lookup dials from here, and only an address that answered with the
    right key is handed to the host.
    """

    def __init__(self, max_peers: int, max_addrs: int) -> None:
        self.max_peers = max_peers
        self.max_addrs = max_addrs
        self._addrs: OrderedDict[PeerId, tuple[Multiaddr, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._addrs)

    def put(self, peer: PeerId, addrs: Sequence[Multiaddr]) -> None:
        if not addrs:
            return
        self._addrs.pop(peer, None)
        self._addrs[peer] = tuple(addrs[: self.max_addrs])
        while len(self._addrs) > self.max_peers:
            self._addrs.popitem(last=False)

    def get(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        return self._addrs.get(peer, ())

    def drop(self, peer: PeerId) -> None:
        self._addrs.pop(peer, None)


def checked_peer_id(raw: bytes) -> PeerId | None:
    """The peer ID in a reply's entry, or None if no key can stand behind it.

    An identity multihash must inline a well-formed public key of a type and
    size libp2p inlines; a sha256 one (RSA keys) cannot be checked until its
    owner shows the key in a handshake, which any dial to it requires.
    """
    try:
        peer = PeerId(raw)
    except (IdentityError, ValueError, IndexError):
        return None
    if raw[0] != MH_IDENTITY:
        return peer
    try:
        key_type, key = decode_public_key(raw[2:])
    except (IdentityError, ValueError, IndexError):
        return None
    if INLINE_KEY_SIZES.get(key_type) != len(key):
        return None
    return peer


def parse_addrs(raw: Sequence[bytes]) -> list[Multiaddr]:
    """The addresses we understand, without a trailing ``/p2p`` (unknown transports are skipped, as identify does).

    Only the last component is dropped: a relayed address keeps its relay's ``/p2p/<id>/p2p-circuit``.
    """
    out: list[Multiaddr] = []
    for item in raw:
        try:
            addr = Multiaddr.from_bytes(item)
        except (MultiaddrError, IdentityError, ValueError):
            continue
        if addr.parts[-1][0] == "p2p":
            addr = Multiaddr(addr.parts[:-1])
        if addr.parts and addr not in out:
            out.append(addr)
    return out
