"""SWIM wire form: round trips, a byte vector, and bounds on what a hostile peer can send."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, strategies as st

from ocf.errors import ProtocolError
from ocf.membership import messages
from ocf.membership.messages import Ack, Digest, Gossip, Page, Ping, PingReq
from ocf.membership.update import Status, Update

peers = st.text("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", min_size=1, max_size=60)
signed = st.builds(
    Update,
    peer=peers,
    incarnation=st.integers(0, 2**63 - 1),
    status=st.sampled_from([Status.ALIVE, Status.LEFT]),
    load=st.integers(0, 2**31 - 1),
    addrs=st.lists(st.text(max_size=40), max_size=4).map(tuple),
    signature=st.binary(min_size=64, max_size=64),
)
opinion = st.builds(
    Update, peer=peers, incarnation=st.integers(0, 2**63 - 1), status=st.sampled_from([Status.SUSPECT, Status.DEAD])
)
updates = st.lists(st.one_of(signed, opinion), max_size=8).map(tuple)
seqs = st.integers(0, 2**63 - 1)
KIND_NAMES = list(messages.KINDS)
any_message = st.one_of(
    st.builds(Ping, seqs, updates),
    st.builds(Ack, seqs, updates),
    st.builds(PingReq, seqs, peers, updates),
    st.builds(Gossip, updates),
    st.builds(Digest, st.lists(st.integers(0, 2**64 - 1), min_size=64, max_size=64).map(tuple), st.booleans()),
    st.builds(Page, st.integers(0, 63), st.lists(st.tuples(signed, st.none()), max_size=5).map(tuple)),
)


@given(any_message)
def test_round_trip(message: messages.Message) -> None:
    text = json.dumps(messages.to_wire(message))
    decoded, bad = messages.from_wire(json.loads(text))
    assert bad == 0
    assert decoded == message


def test_byte_vector() -> None:
    ping = Ping(7, (Update("QmPeer", 3, Status.SUSPECT),))
    assert json.dumps(messages.to_wire(ping), separators=(",", ":")) == '{"t":"ping","s":7,"u":[["QmPeer",3,1]]}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(KIND_NAMES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["t", "s", "u", "p", "d", "r", "b", "m"]), json_values, max_size=6))
def test_arbitrary_objects_are_refused_or_parsed(obj: dict) -> None:
    with contextlib.suppress(ProtocolError):
        messages.from_wire(obj)


def test_updates_past_the_cap_are_cut_and_counted() -> None:
    many = [["p", 1, 1]] * (messages.MAX_UPDATES + 10)
    decoded, bad = messages.from_wire({"t": "gsp", "u": many})
    assert len(decoded.updates) == messages.MAX_UPDATES
    assert bad == 10


@pytest.mark.parametrize(
    "item",
    [
        ["p", 1, 0],  # alive without a signature
        ["p", 1, 1, 0, [], "00" * 64],  # suspect with one
        ["p", -1, 2],
        ["p", 1, 9],
        ["p", True, 1],
        ["", 1, 1],
        ["p", 1, 0, 0, ["a"] * 5, "00" * 64],
        ["\ud800", 1, 1],  # lone surrogates (JSON's "\ud800" escape) cannot be hashed or signed
        ["p", 1, 0, 0, ["/ip4/1.2.3.4/tcp/1", "/dns4/\udfff/tcp/1"], "00" * 64],
    ],
)
def test_malformed_updates_are_dropped(item: list) -> None:
    decoded, bad = messages.from_wire({"t": "gsp", "u": [item]})
    assert decoded.updates == () and bad == 1


def test_a_lone_surrogate_costs_its_update_only_never_the_message() -> None:
    """Found in review: it raised UnicodeEncodeError out of the parser, and the whole stream was reset."""
    good = ["QmGood", 2, 2]
    body = json.dumps({"t": "gsp", "u": [["p", 1, 0, 0, ["\ud800"], "00" * 64], good]})
    assert "\\ud800" in body  # as a hostile peer sends it: an escape, valid JSON
    decoded, bad = messages.from_wire(json.loads(body))
    assert bad == 1 and decoded.updates == (Update("QmGood", 2, Status.DEAD),)


@given(
    addrs=st.lists(st.text(max_size=128), max_size=4).map(tuple),
    signature=st.one_of(st.just(b""), st.binary(min_size=64, max_size=64)),
)
def test_an_update_gives_back_exactly_the_addresses_and_signature_it_was_made_with(addrs, signature) -> None:
    """Kept in one bytes object, read back on use: any text (newlines, NULs, any script) comes back as it went in."""
    u = Update("QmPeer", 7, Status.ALIVE, 3, addrs, signature)
    assert (u.addrs, u.signature) == (addrs, signature)
    twin = Update("QmPeer", 7, Status.ALIVE, 3, addrs, signature)
    assert u == twin and hash(u) == hash(twin)
    assert u != Update("QmPeer", 7, Status.ALIVE, 3, (*addrs, "/x"), signature)
    renamed = u.renamed("".join(["Qm", "Peer"]))
    assert renamed == u and renamed.addrs == addrs and renamed.peer is not u.peer


def test_an_update_is_immutable_and_holds_its_signature_and_addresses_in_one_object() -> None:
    import sys

    addrs = ("/ip4/203.0.113.7/tcp/43905", "/ip4/203.0.113.7/udp/43905/quic-v1", "/ip6/2001:db8::7/tcp/43905")
    u = Update("12D3KooWLB9aJ5RMVhXoF2rmtu4pUGuwXrj5Mg5jNzeCpCerbgXz", 2**40, Status.ALIVE, 0, addrs, b"s" * 64)
    with pytest.raises(AttributeError):
        u.incarnation = 2**41  # type: ignore[misc]
    held = sys.getsizeof(u) + sys.getsizeof(u._tail)
    # The same fields as separate objects: a signature, a tuple and one string per address.
    apart = sys.getsizeof(u) + sys.getsizeof(b"s" * 64) + sys.getsizeof(addrs) + sum(sys.getsizeof(a) for a in addrs)
    assert apart - held >= 190, (held, apart)
    assert Update("p", 1, Status.SUSPECT)._tail == b""  # an opinion holds no bytes of its own
