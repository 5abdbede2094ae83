"""The Kademlia keyspace and a bounded k-bucket routing table.

Keys live in sha256 space: a peer's key is ``sha256(binary peer ID)`` and
the distance between two keys is their XOR read as a big-endian integer
(libp2p kad-dht spec), so a peer cannot choose its distance from a target
without grinding keys.

The table keeps at most ``k`` peers per bucket, bucket ``i`` holding peers
whose key shares exactly ``i`` leading bits with ours: 256 buckets of ``k``
bound it at 5,120 live entries however many peers a hostile network
announces. When a bucket is full a newcomer waits in that bucket's small
replacement cache instead of evicting anyone (Kademlia's preference for
long-lived peers, which an attacker with fresh identities cannot displace);
when a member fails a query it is dropped and the freshest replacement takes
its place.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from ..identity import PeerId

KEY_BITS = 256
K = 20
#: Replacement candidates remembered per full bucket.
REPLACEMENTS = 5


def key_of(raw: bytes) -> bytes:
    """The keyspace position of a binary key (a peer ID's multihash bytes)."""
    return hashlib.sha256(raw).digest()


def peer_key(peer: PeerId) -> bytes:
    return key_of(peer.raw)


def distance(a: bytes, b: bytes) -> int:
    """XOR distance of two 32-byte keys, as an integer (smaller is closer)."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def common_prefix_len(a: bytes, b: bytes) -> int:
    """Leading bits ``a`` and ``b`` share (256 when equal)."""
    return KEY_BITS - distance(a, b).bit_length()


def key_in_bucket(local_key: bytes, cpl: int) -> bytes:
    """A random lookup key (a sha256-style peer ID) whose position shares exactly ``cpl`` bits with ``local_key``.

    Lookups send keys, which servers hash, so a key for a given bucket is
    found by trying random ones: 2**(cpl+1) hashes on average, cheap for the
    shallow buckets a refresh visits.
    """
    while True:
        raw = b"\x12\x20" + os.urandom(32)
        if common_prefix_len(local_key, key_of(raw)) == cpl:
            return raw


class RoutingTable:
    """Peers by bucket, least recently seen first; see the module docstring for the bounds."""

    def __init__(self, local: PeerId, *, k: int = K, replacements: int = REPLACEMENTS) -> None:
        self.local = local
        self.local_key = peer_key(local)
        self.k = k
        self.replacements = replacements
        self._buckets: list[OrderedDict[PeerId, bytes]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._spare: list[OrderedDict[PeerId, bytes]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, PeerId) or peer == self.local:
            return False
        return peer in self._buckets[self._index(peer_key(peer))]

    def __iter__(self) -> Iterator[PeerId]:
        for bucket in self._buckets:
            yield from bucket

    def _index(self, key: bytes) -> int:
        return min(common_prefix_len(self.local_key, key), KEY_BITS - 1)

    def bucket_size(self, index: int) -> int:
        return len(self._buckets[index])

    def bucket_sizes(self) -> dict[int, int]:
        """Non-empty buckets and their sizes (for /metrics and tests)."""
        return {i: len(b) for i, b in enumerate(self._buckets) if b}

    def add(self, peer: PeerId) -> bool:
        """Note ``peer`` as a live DHT server; True if it is (now) in the table.

        A known peer moves to its bucket's most-recently-seen end. A new peer
        joins a bucket with room; in a full bucket it becomes a replacement.
        """
        if peer == self.local:
            return False
        key = peer_key(peer)
        index = self._index(key)
        bucket = self._buckets[index]
        if peer in bucket:
            bucket.move_to_end(peer)
            return True
        if len(bucket) < self.k:
            bucket[peer] = key
            self._size += 1
            self._spare[index].pop(peer, None)
            return True
        spare = self._spare[index]
        spare[peer] = key
        spare.move_to_end(peer)
        while len(spare) > self.replacements:
            spare.popitem(last=False)
        return False

    def remove(self, peer: PeerId) -> bool:
        """Drop ``peer`` (it failed us); the freshest replacement, if any, takes its place."""
        if peer == self.local:
            return False
        index = self._index(peer_key(peer))
        bucket = self._buckets[index]
        spare = self._spare[index]
        spare.pop(peer, None)
        if bucket.pop(peer, None) is None:
            return False
        self._size -= 1
        if spare:
            newcomer, key = spare.popitem(last=True)
            bucket[newcomer] = key
            self._size += 1
        return True

    def closest(self, key: bytes, count: int = K, exclude: Iterable[PeerId] = ()) -> list[PeerId]:
        """Up to ``count`` table peers closest to ``key``, closest first."""
        skip = set(exclude)
        target = int.from_bytes(key, "big")
        pairs = ((int.from_bytes(pk, "big") ^ target, p) for b in self._buckets for p, pk in b.items() if p not in skip)
        return [p for _, p in heapq.nsmallest(count, pairs, key=lambda pair: pair[0])]
