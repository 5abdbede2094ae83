"""The kad-dht codec: byte vectors from js-libp2p's encoder, bounds, framing under any chunking."""

from __future__ import annotations

import contextlib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.dht import wire
from ocf.errors import ProtocolError
from ocf.identity import varint

KEY = bytes.fromhex("0024080112204242424242424242424242424242424242424242424242424242424242424242")
ADDR = bytes.fromhex("047f000001060fa1")  # /ip4/127.0.0.1/tcp/4001

# Produced by @libp2p/kad-dht 16.4.5's Message.encode (protons), the peer we interoperate with.
JS_FIND_NODE = bytes.fromhex("08041226" + KEY.hex())
JS_REPLY = bytes.fromhex("080442340a26" + KEY.hex() + "1208" + ADDR.hex() + "1800")
JS_PING = bytes.fromhex("0805")


def test_find_node_request_matches_js_bytes():
    assert wire.Message(wire.MessageType.FIND_NODE, key=KEY).encode() == JS_FIND_NODE
    assert wire.decode(JS_FIND_NODE) == wire.Message(wire.MessageType.FIND_NODE, key=KEY)


def test_js_reply_decodes():
    msg = wire.decode(JS_REPLY)
    assert msg.type == wire.MessageType.FIND_NODE
    assert msg.closer == (wire.PeerEntry(KEY, (ADDR,), 0),)
    # We omit a zero connection field, which protobuf readers treat the same.
    assert wire.decode(msg.encode()) == msg


def test_ping_and_absent_type():
    assert wire.Message(wire.MessageType.PING).encode() == JS_PING
    assert wire.decode(b"").type == wire.MessageType.PUT_VALUE  # proto3 zero value


def test_unknown_fields_are_skipped():
    data = JS_FIND_NODE + b"\x50\x07" + b"\x3a\x02hi"  # clusterLevel 7, field 7 bytes
    msg = wire.decode(data)
    assert msg.key == KEY and msg.cluster_level == 7


def test_too_many_peers_refuses_the_whole_message():
    entry = wire.PeerEntry(KEY, (ADDR,))
    ok = wire.Message(wire.MessageType.FIND_NODE, closer=(entry,) * 32).encode()
    assert len(wire.decode(ok, max_peers=32).closer) == 32
    over = wire.Message(wire.MessageType.FIND_NODE, closer=(entry,) * 33).encode()
    with pytest.raises(ProtocolError, match="more than 32 peers"):
        wire.decode(over, max_peers=32)


def test_addresses_per_peer_are_capped():
    entry = wire.PeerEntry(KEY, (ADDR,) * 100)
    msg = wire.decode(wire.Message(wire.MessageType.FIND_NODE, closer=(entry,)).encode(), max_addrs=32)
    assert len(msg.closer[0].addrs) == 32


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x05abc",  # truncated key
        b"\x42\x02\x12\x00",  # peer entry without an id
        b"\x42\x05\x0a\x10",  # peer entry truncated inside
        b"\x0b",  # wire type 3
        b"\x08" + b"\xff" * 10 + b"\x01",  # over-long varint
    ],
)
def test_malformed_input_is_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        wire.decode(data)


def test_frame_reader_refuses_a_huge_declared_length_before_its_body():
    reader = wire.FrameReader(limit=4096)
    with pytest.raises(ProtocolError, match="exceeds the 4096-byte limit"):
        reader.feed(varint.encode(4097))
    assert reader.buffered == 0


def test_frame_reader_refuses_a_bad_length_varint():
    with pytest.raises(ProtocolError):
        wire.FrameReader(limit=4096).feed(b"\x80\x00")  # non-minimal


peer_ids = st.binary(min_size=1, max_size=40)
entries = st.builds(
    wire.PeerEntry,
    peer_ids,
    st.lists(st.binary(max_size=20), max_size=4).map(tuple),
    st.integers(0, 3),
)
messages = st.builds(
    wire.Message,
    st.integers(0, 5),
    st.binary(max_size=40),
    st.lists(entries, max_size=5).map(tuple),
    st.lists(entries, max_size=3).map(tuple),
    st.binary(max_size=20),
    st.integers(0, 1000),
)


@settings(max_examples=80, deadline=None)
@given(messages)
def test_round_trip(msg):
    assert wire.decode(msg.encode()) == msg


@settings(max_examples=80, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_frames_survive_any_chunking(msgs, data):
    stream = b"".join(wire.frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = wire.FrameReader(limit=1 << 16)
    frames = []
    start = 0
    for cut in [*cuts, len(stream)]:
        frames += reader.feed(stream[start:cut])
        start = cut
    assert [wire.decode(f) for f in frames] == msgs
    assert not reader.pending


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        wire.decode(data)
