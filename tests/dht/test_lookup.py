"""The lookup state machine on a simulated network (no I/O): convergence and budgets."""

from __future__ import annotations

import functools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.dht.lookup import Lookup
from ocf.dht.table import RoutingTable, distance, peer_key
from ocf.identity import Identity, PeerId


@functools.cache
def network(n: int, seed: int) -> tuple[list[PeerId], dict[PeerId, RoutingTable]]:
    """A converged network: every table saw every peer, in random order, and kept what k-buckets keep."""
    rng = random.Random(seed)
    peers = [PeerId.from_public_key(rng.randbytes(32)) for i in range(n)]
    tables = {}
    for p in peers:
        table = RoutingTable(p)
        for q in rng.sample(peers, n):
            table.add(q)
        tables[p] = table
    return peers, tables


def run(lookup: Lookup, tables: dict[PeerId, RoutingTable], dead: set[PeerId] = frozenset()) -> None:
    steps = 0
    while not lookup.done:
        batch = lookup.next_queries()
        if not batch:
            break
        assert len(batch) <= lookup.alpha
        for peer in batch:
            if peer in dead:
                lookup.on_failure(peer)
            else:
                lookup.on_response(peer, tables[peer].closest(lookup.key, 20))
        steps += 1
        assert steps < 1000


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 1), st.integers(0, 199), st.integers(1, 199))
def test_lookup_finds_the_true_closest_peers(seed, start, goal):
    peers, tables = network(200, seed)
    origin = peers[start]
    key = peer_key(peers[goal])
    lookup = Lookup(key, tables[origin].closest(key, 20), local=origin)
    run(lookup, tables)
    truth = sorted((p for p in peers if p != origin), key=lambda p: distance(peer_key(p), key))[:20]
    assert lookup.closest() == truth
    assert lookup.queries <= 64


def test_failures_are_skipped_and_the_query_budget_holds():
    peers, tables = network(200, 7)
    origin = peers[0]
    key = peer_key(peers[5])
    dead = set(peers[1::2])
    lookup = Lookup(key, tables[origin].closest(key, 20), local=origin, max_queries=30)
    run(lookup, tables, dead)
    assert lookup.queries <= 30
    assert lookup.failures > 0
    assert not set(lookup.closest()) & dead


def test_candidates_are_bounded():
    peers, _ = network(10, 1)
    flood = [Identity.from_seed(f"flood-{i}").peer_id for i in range(500)]
    lookup = Lookup(peer_key(peers[0]), peers[1:2], local=peers[0], max_candidates=64)
    (first,) = lookup.next_queries()
    lookup.on_response(first, flood)
    assert len(lookup._state) <= 64
