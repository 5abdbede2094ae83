"""Provider selection as pure functions over node table entries."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.errors import BadRequest, NoRoutableIdentity, NotFound
from ocf.gateway import routing


def entry(*services, connected=True, status="online"):
    return {"service": list(services), "connected": connected, "status": status}


def llm(*models, status="healthy"):
    return {
        "name": "llm",
        "host": "localhost",
        "port": 8080,
        "status": status,
        "identity_group": [f"model={m}" for m in models],
    }


ENTRIES = {
    "A": entry(llm("m1")),
    "B": entry(llm("m2")),
    "C": entry(llm("m1", "m2"), {"name": "foo", "identity_group": []}),
    "D": entry({"name": "foo", "status": "unhealthy"}, connected=False),
}


def test_providers_and_known_services():
    assert [p.peer for p in routing.providers_of(ENTRIES, "llm", "C")] == ["A", "B", "C"]
    assert [p.local for p in routing.providers_of(ENTRIES, "llm", "C")] == [False, False, True]
    assert routing.known_services(ENTRIES) == ["foo", "llm"]
    d = routing.providers_of(ENTRIES, "foo", "C")[1]
    assert not d.healthy and not d.online


def test_identity_from_json_uses_keys_of_identity_groups_only():
    providers = routing.providers_of(ENTRIES, "llm", "")
    keys = routing.identity_keys(providers)
    assert keys == ["model"]
    assert routing.identity_from_json({"model": "m1", "temperature": 0.5, "messages": []}, keys) == {"model": "m1"}
    assert routing.identity_from_json({"model": {"nested": 1}}, keys) == {}
    assert routing.identity_from_json(["model"], keys) == {}
    assert routing.identity_from_json({"seed": 3}, ["seed"]) == {"seed": "3"}


def test_identity_header():
    assert routing.identity_from_headers(["model=m1, region=eu", "x = y"]) == {"model": "m1", "region": "eu", "x": "y"}
    with pytest.raises(BadRequest):
        routing.identity_from_headers(["justakey"])


def test_select_routes_by_model():
    providers = routing.providers_of(ENTRIES, "llm", "")
    known = routing.known_services(ENTRIES)
    assert [
        p.peer for p in routing.select(providers, {"model": "m1"}, service="llm", known=lambda: known, has_body=True)
    ] == ["A", "C"]
    assert [
        p.peer for p in routing.select(providers, {"model": "m2"}, service="llm", known=lambda: known, has_body=True)
    ] == ["B", "C"]


def test_select_errors_are_honest_and_list_what_exists():
    providers = routing.providers_of(ENTRIES, "llm", "")
    with pytest.raises(NotFound) as info:
        routing.select(providers, {"model": "gpt-9"}, service="llm", known=lambda: [], has_body=True)
    assert info.value.code == "model_not_found" and "m1, m2" in info.value.message
    with pytest.raises(NoRoutableIdentity) as info:
        routing.select(providers, {}, service="llm", known=lambda: [], has_body=True)
    assert info.value.status == 400 and "model" in info.value.message
    with pytest.raises(NotFound) as info:
        routing.select([], {}, service="nope", known=lambda: ["foo", "llm"], has_body=False)
    assert info.value.code == "service_not_found" and "foo, llm" in info.value.message


def test_select_without_body_or_identity_groups_routes_by_name():
    providers = routing.providers_of(ENTRIES, "llm", "")
    assert len(routing.select(providers, {}, service="llm", known=lambda: [], has_body=False)) == 3
    foo = routing.providers_of(ENTRIES, "foo", "")
    assert len(routing.select(foo, {}, service="foo", known=lambda: [], has_body=True)) == 2


def test_choose_prefers_fewest_in_flight_and_breaks_ties_at_random():
    providers = routing.providers_of(ENTRIES, "llm", "")
    rng = random.Random(1)
    assert routing.choose(providers, {"A": 3, "B": 1, "C": 2}, rng).peer == "B"
    picks = {routing.choose(providers, {"A": 1}, rng).peer for _ in range(50)}
    assert picks == {"B", "C"}


def test_services_list_tolerates_junk():
    entries = {"X": {"service": [None, "llm", {"name": 3}, {"name": "llm", "identity_group": ["model=a", 7, "bad"]}]}}
    (p,) = routing.providers_of(entries, "llm", "")
    assert p.groups == frozenset({"model=a", "bad"})
    assert routing.identity_keys([p]) == ["model"]


_models = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=200, deadline=None)
@given(
    tables=st.dictionaries(
        st.sampled_from(["P1", "P2", "P3", "P4", "P5"]), st.lists(_models, max_size=3, unique=True), min_size=1
    ),
    wanted=_models,
    load=st.dictionaries(st.sampled_from(["P1", "P2", "P3", "P4", "P5"]), st.integers(0, 5)),
)
def test_selection_properties(tables, wanted, load):
    entries = {peer: entry(llm(*models)) for peer, models in tables.items()}
    providers = routing.providers_of(entries, "llm", "")
    serving = {peer for peer, models in tables.items() if wanted in models}
    try:
        found = routing.select(providers, {"model": wanted}, service="llm", known=lambda: ["llm"], has_body=True)
    except NotFound as exc:
        assert not serving and exc.code == "model_not_found"
        return
    assert {p.peer for p in found} == serving
    chosen = routing.choose(found, load, random.Random(0))
    assert load.get(chosen.peer, 0) == min(load.get(p.peer, 0) for p in found)
