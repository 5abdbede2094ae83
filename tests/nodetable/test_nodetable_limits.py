"""The sans-IO pieces behind the node table's limits: heartbeats, buckets, summary pages, the reader."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocf.errors import ProtocolError, ValidationError
from ocf.identity import Identity, varint
from ocf.nodetable import wire
from ocf.nodetable.heartbeat import Heartbeat, TokenBucket, signing_bytes

ALICE = Identity.from_seed("alice")
MALLORY = Identity.from_seed("mallory")


def test_heartbeat_verifies_only_with_the_owners_key():
    beat = Heartbeat.create(ALICE, 1_700_000_000_000)
    assert beat.verify()
    again = Heartbeat.from_wire(ALICE.peer_id, json.loads(json.dumps(beat.to_wire())))
    assert again == beat and again.verify()
    forged = Heartbeat(ALICE.peer_id, beat.ms + 1, MALLORY.sign(signing_bytes(ALICE.peer_id, beat.ms + 1)))
    assert not forged.verify()
    moved = Heartbeat(ALICE.peer_id, beat.ms + 1, beat.signature)  # a replayed signature on a newer time
    assert not moved.verify()
    other = Heartbeat(MALLORY.peer_id, beat.ms, beat.signature)
    assert not other.verify()


@pytest.mark.parametrize(
    "obj",
    [None, [], [1], [True, "00" * 64], [-1, "00" * 64], [1, "zz" * 64], [1, "00" * 63], "x", [1 << 64, "00" * 64]],
)
def test_malformed_heartbeats_are_validation_errors(obj):
    with pytest.raises(ValidationError):
        Heartbeat.from_wire(ALICE.peer_id, obj)


def test_token_bucket_burst_then_rate():
    bucket = TokenBucket.full(rate=2.0, burst=5, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(100)) == 5
    assert sum(bucket.take(1.0) for _ in range(100)) == 2  # two tokens a second
    assert sum(bucket.take(1000.0) for _ in range(100)) == 5  # never more than the burst


@given(st.lists(st.integers(0, 1 << 40), max_size=300), st.integers(200, 5000))
def test_summary_pages_cover_everything_under_the_budget(seqs, budget):
    items = sorted((f"12D3KooW{i:040d}", seq, seq // 2) for i, seq in enumerate(seqs))
    pages = list(wire.summary_pages(items, budget))
    seen = {}
    for i, page in enumerate(pages):
        lo, hi = wire.page_range(page)
        assert len(page["have"]) == 1 or sum(len(t) + wire.ENTRY_OVERHEAD for t in page["have"]) <= budget
        assert all(lo <= t and (hi is None or t < hi) for t in page["have"])
        assert hi == (pages[i + 1]["lo"] if i + 1 < len(pages) else None)
        seen.update(page["have"])
    assert seen == {t: [s, m] for t, s, m in items}
    texts = [t for t, _, _ in items]
    for page in pages:
        assert wire.in_range(texts, page["lo"], page["hi"]) == sorted(page["have"])


def test_a_20000_entry_summary_pages_under_the_message_limit():
    limit = 1 << 20
    items = sorted((f"12D3KooW{i:044d}", 1, 1_700_000_000_000) for i in range(20_000))
    sizes = [len(wire.encode(page)) for page in wire.summary_pages(items, limit // 2)]
    assert len(sizes) >= 3 and max(sizes) < limit


@pytest.mark.parametrize(
    "page",
    [
        {"t": "summary"},
        {"t": "summary", "have": {}, "lo": 1},
        {"t": "summary", "have": {}, "hi": []},
        {"t": "summary", "have": []},
    ],
)
def test_malformed_pages_are_protocol_errors(page):
    with pytest.raises(ProtocolError):
        wire.page_range(page)


def test_reader_reports_partial_messages_and_releases_its_buffer():
    reader = wire.Reader(1 << 20)
    message = wire.encode({"t": "beats", "beats": {}})
    assert reader.feed(message[:3]) == [] and reader.partial
    assert reader.feed(message[3:]) == [{"t": "beats", "beats": {}}] and not reader.partial
    # A declared 1 MiB message pins only what actually arrived.
    reader.feed(varint.encode(1 << 20) + b"x" * 1000)
    assert reader.partial and len(reader._buf) == 1000 + len(varint.encode(1 << 20))
    with pytest.raises(ProtocolError):
        wire.Reader(100).feed(varint.encode(101))


def test_a_message_nested_past_pythons_parser_is_a_protocol_error():
    """[[[[...]]]] thousands deep: json raises RecursionError, no ValueError, so the stream's handler
    crashed (counted as a handler failure, not a bad message). Now it is refused like any bad message."""
    body = b"[" * 50_000 + b"]" * 50_000
    with pytest.raises(ProtocolError, match="nests too deep"):
        wire.Reader(1 << 20).feed(varint.encode(len(body)) + body)


@pytest.mark.parametrize(
    "message",
    [
        {"t": "offer", "o": []},
        {"t": "offer", "o": {"12D3KooWx": -1}},
        {"t": "offer", "o": {"12D3KooWx": True}},
        {"t": "offer", "o": {"12D3KooWx": 1 << 64}},
        {"t": "offer", "o": {"12D3KooWx": "1"}},
        {"t": "offer", "o": {"x" * 129: 1}},
        {"t": "offer"},
    ],
)
def test_a_malformed_offer_is_a_protocol_error(message):
    with pytest.raises(ProtocolError):
        wire.parse_offer(message)


@pytest.mark.parametrize(
    "message", [{"t": "want", "o": {}}, {"t": "want", "o": [1]}, {"t": "want", "o": ["x" * 129]}, {"t": "want"}]
)
def test_a_malformed_want_is_a_protocol_error(message):
    with pytest.raises(ProtocolError):
        wire.parse_want(message)


def test_offers_and_wants_are_read_on_2_1_only():
    """A 2.0.0 stream (an older node's) carries no offer: it is an unknown message there, as that node reads it."""
    frame = wire.encode({"t": "offer", "o": {"12D3KooWx": 1}})
    assert wire.Reader(1 << 20, wire.kinds_of(wire.PROTOCOL)).feed(frame) == [{"t": "offer", "o": {"12D3KooWx": 1}}]
    with pytest.raises(ProtocolError):
        wire.Reader(1 << 20, wire.kinds_of(wire.PROTOCOL_2_0)).feed(frame)
    assert wire.parse_offer({"t": "offer", "o": {"12D3KooWx": (1 << 64) - 1}}) == {"12D3KooWx": (1 << 64) - 1}
    assert wire.parse_want({"t": "want", "o": ["12D3KooWx"]}) == ["12D3KooWx"]
