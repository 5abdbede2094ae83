"""Keyspace arithmetic and the bounded routing table."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.dht.table import KEY_BITS, RoutingTable, common_prefix_len, distance, key_in_bucket, key_of, peer_key
from ocf.identity import Identity, PeerId

LOCAL = Identity.from_seed("table-local").peer_id


def random_peer() -> PeerId:
    return PeerId.from_public_key(os.urandom(32))


def test_distance_and_prefix():
    a = bytes(32)
    b = bytes([0x80]) + bytes(31)
    assert distance(a, a) == 0
    assert common_prefix_len(a, a) == KEY_BITS
    assert common_prefix_len(a, b) == 0
    assert common_prefix_len(a, bytes(31) + b"\x01") == 255
    assert key_of(LOCAL.raw) == peer_key(LOCAL)


def test_table_is_bounded_by_k_per_bucket_and_keeps_old_peers():
    table = RoutingTable(LOCAL, k=20)
    first = [random_peer() for _ in range(200)]
    for peer in first:
        table.add(peer)
    before = set(table)
    # Ten thousand fresh identities cannot push out the peers that were there first.
    for _ in range(10_000):
        table.add(random_peer())
    sizes = table.bucket_sizes()
    assert max(sizes.values()) == 20
    assert len(table) == sum(sizes.values()) <= 20 * len(sizes)
    assert len(table) < 300  # about 20 per occupied bucket, log2(10,200) + a few buckets
    assert before <= set(table)


def test_remove_promotes_a_replacement():
    table = RoutingTable(LOCAL, k=2, replacements=1)
    # Bucket 0 holds half of all keys: fill it with three peers.
    peers = []
    while len(peers) < 3:
        p = random_peer()
        if common_prefix_len(table.local_key, peer_key(p)) == 0:
            peers.append(p)
    assert table.add(peers[0]) and table.add(peers[1])
    assert not table.add(peers[2])  # full: waits as a replacement
    assert peers[2] not in table
    assert table.remove(peers[0])
    assert set(table) == {peers[1], peers[2]}
    assert not table.add(LOCAL) and LOCAL not in table


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=60, unique=True),
    st.binary(min_size=32, max_size=32),
)
def test_closest_matches_brute_force(raws, target):
    table = RoutingTable(LOCAL, k=1000)
    peers = [PeerId.from_public_key(r) for r in raws]
    for p in peers:
        table.add(p)
    expect = sorted(peers, key=lambda p: distance(peer_key(p), target))[:10]
    assert table.closest(target, 10) == expect
    assert (
        table.closest(target, 10, exclude=expect[:1])
        == sorted(peers, key=lambda p: distance(peer_key(p), target))[1:11]
    )


def test_key_in_bucket_lands_in_that_bucket():
    table = RoutingTable(LOCAL)
    for cpl in (0, 1, 5, 9):
        key = key_in_bucket(table.local_key, cpl)
        assert common_prefix_len(table.local_key, key_of(key)) == cpl
