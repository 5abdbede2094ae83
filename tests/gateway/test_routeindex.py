"""The routing index: O(1) lookups by service and identity group, and weighted power-of-two picks."""

import collections
import random

from ocf.gateway import routeindex, routing


def entries(n: int) -> dict:
    return {
        f"peer{i}": {
            "id": f"peer{i}",
            "service": [{"name": "llm", "status": "healthy", "identity_group": [f"model=m{i % 3}", "region=eu"]}],
        }
        for i in range(n)
    }


def test_lookup_matches_the_per_request_scan() -> None:
    table = entries(30)
    index = routeindex.build(table, "peer0")
    for identity in ({}, {"model": "m1"}, {"model": "m2", "region": "eu"}, {"model": "nope"}):
        scanned = [p for p in routing.providers_of(table, "llm", "peer0") if routing.matches(p, identity)]
        assert [p.peer for p in index.lookup("llm", identity)] == [p.peer for p in scanned]
    assert index.keys["llm"] == ["model", "region"]
    assert index.lookup("other", {}) == ()
    assert [p.local for p in index.providers("llm")][:2] == [True, False]


def test_pick_favours_light_providers_but_spreads() -> None:
    index = routeindex.build(entries(4), "me")
    load = {"peer0": 0, "peer1": 0, "peer2": 9, "peer3": 9}
    rng = random.Random(7)
    counts = collections.Counter(
        routeindex.pick(index.providers("llm"), lambda p: routeindex.weight(True, None, load[p.peer]), rng).peer
        for _ in range(4000)
    )
    light, heavy = counts["peer0"] + counts["peer1"], counts["peer2"] + counts["peer3"]
    assert light > 2 * heavy  # two samples, then by weight: the loaded ones lose most contests
    assert heavy > 0  # but not nothing: no herd on one provider


def test_pick_skips_unusable_and_gives_none_when_nothing_is_usable() -> None:
    providers = routeindex.build(entries(50), "me").providers("llm")
    only = providers[17]
    rng = random.Random(1)
    for _ in range(100):
        assert routeindex.pick(providers, lambda p: 1.0 if p is only else 0.0, rng) is only
    assert routeindex.pick(providers, lambda p: 0.0, rng) is None
    assert routeindex.pick((), lambda p: 1.0, rng) is None


def test_pick_favours_near_providers_and_the_floor_keeps_a_lan_even() -> None:
    index = routeindex.build(entries(2), "me")
    rng = random.Random(3)

    def shares(rtt: dict[str, float]) -> float:
        counts = collections.Counter(
            routeindex.pick(index.providers("llm"), lambda p: routeindex.weight(True, rtt[p.peer], 0), rng).peer
            for _ in range(4000)
        )
        return counts["peer0"] / 4000

    # 1 ms against 200 ms: the weights are 1/0.021 and 1/0.22, about 10:1.
    assert 0.85 < shares({"peer0": 0.001, "peer1": 0.2}) < 0.95
    # 0.2 ms against 2 ms on one LAN: nearly even (load decides there, not jitter).
    assert 0.45 < shares({"peer0": 0.0002, "peer1": 0.002}) < 0.6


def test_an_unmeasured_provider_is_neither_favoured_nor_shunned() -> None:
    near, unmeasured, far = (routeindex.weight(True, rtt, 0) for rtt in (0.005, None, 0.3))
    assert near > unmeasured > far
