"""Noise XX (libp2p): handshake, peer authentication, transport frames, fuzzing."""

import contextlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ocf.errors import HandshakeError, PeerIdMismatch, ProtocolError
from ocf.identity import Identity
from ocf.transport import noise
from ocf.transport.noise import NoiseHandshake

ALICE, BOB, EVE = Identity.from_seed("alice"), Identity.from_seed("bob"), Identity.from_seed("eve")


def handshake(init: NoiseHandshake, resp: NoiseHandshake):
    to_resp = init.data_to_send()
    while not (init.complete and resp.complete):
        resp.receive_data(to_resp)
        to_init = resp.data_to_send()
        init.receive_data(to_init)
        to_resp = init.data_to_send()
        if to_resp:
            resp.receive_data(to_resp)
            to_resp = b""
    return init.session(), resp.session()


def test_protocol_name_is_hash_length():
    assert len(noise.PROTOCOL_NAME) == 32


def test_handshake_authenticates_both_peers_and_encrypts():
    i = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    r = NoiseHandshake(BOB, initiator=False)
    si, sr = handshake(i, r)
    assert i.remote_peer == BOB.peer_id and r.remote_peer == ALICE.peer_id
    frame = si.encrypt(b"hello")
    assert b"hello" not in frame and struct.unpack(">H", frame[:2])[0] == len(frame) - 2
    assert sr.decrypt_stream(frame) == b"hello"
    assert si.decrypt_stream(sr.encrypt(b"back")) == b"back"


def test_message_sizes_match_spec():
    i = NoiseHandshake(ALICE, initiator=True)
    msg1 = i.data_to_send()
    assert len(msg1) == 2 + 32  # -> e, empty payload


def test_large_writes_are_split_into_max_frames():
    si, sr = handshake(NoiseHandshake(ALICE, initiator=True), NoiseHandshake(BOB, initiator=False))
    data = bytes(range(256)) * 1000  # 256 KB
    wire = si.encrypt(data)
    out = b""
    pos = 0
    while pos < len(wire):
        length = struct.unpack(">H", wire[pos : pos + 2])[0]
        assert length <= 65535
        pos += 2 + length
    for i in range(0, len(wire), 7777):  # any chunking
        out += sr.decrypt_stream(wire[i : i + 7777])
    assert out == data


def test_wrong_expected_peer_is_rejected():
    i = NoiseHandshake(ALICE, initiator=True, expected_peer=EVE.peer_id)
    r = NoiseHandshake(BOB, initiator=False)
    with pytest.raises(PeerIdMismatch):
        handshake(i, r)


def test_forged_signature_is_rejected(monkeypatch):
    # Bob claims Eve's identity key but can only sign with his own.
    real = noise.encode_payload

    def forged(identity, static_pub, muxers=()):
        payload = bytearray()
        noise.protobuf.field(payload, 1, EVE.public_key_proto)
        noise.protobuf.field(payload, 2, BOB.sign(noise.SIG_PREFIX + static_pub))
        return bytes(payload)

    i = NoiseHandshake(ALICE, initiator=True)
    r = NoiseHandshake(BOB, initiator=False)
    monkeypatch.setattr(noise, "encode_payload", forged)
    with pytest.raises(HandshakeError, match="does not verify"):
        handshake(i, r)
    monkeypatch.setattr(noise, "encode_payload", real)


def test_tampered_handshake_message_fails_authentication():
    i = NoiseHandshake(ALICE, initiator=True)
    r = NoiseHandshake(BOB, initiator=False)
    r.receive_data(i.data_to_send())
    msg2 = bytearray(r.data_to_send())
    msg2[-1] ^= 1
    with pytest.raises(HandshakeError):
        i.receive_data(bytes(msg2))


def test_tampered_transport_frame_is_protocol_error():
    si, sr = handshake(NoiseHandshake(ALICE, initiator=True), NoiseHandshake(BOB, initiator=False))
    frame = bytearray(si.encrypt(b"payload"))
    frame[5] ^= 0xFF
    with pytest.raises(ProtocolError, match="authentication"):
        sr.decrypt_stream(bytes(frame))


def test_replayed_frame_is_rejected():
    si, sr = handshake(NoiseHandshake(ALICE, initiator=True), NoiseHandshake(BOB, initiator=False))
    frame = si.encrypt(b"once")
    assert sr.decrypt_stream(frame) == b"once"
    with pytest.raises(ProtocolError):
        sr.decrypt_stream(frame)


def test_short_frame_is_protocol_error():
    si, sr = handshake(NoiseHandshake(ALICE, initiator=True), NoiseHandshake(BOB, initiator=False))
    with pytest.raises(ProtocolError):
        sr.decrypt_stream(b"\x00\x05hello")


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_responder_only_raises_handshake_errors(data):
    r = NoiseHandshake(BOB, initiator=False)
    try:
        r.receive_data(data)
        r.receive_data(data)
    except (HandshakeError, ProtocolError):
        pass


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_initiator_only_raises_handshake_errors(data):
    i = NoiseHandshake(ALICE, initiator=True)
    with contextlib.suppress(HandshakeError, ProtocolError):
        i.receive_data(struct.pack(">H", len(data)) + data)


@given(st.binary(max_size=5000))
def test_fuzz_transport_only_raises_protocol_errors(data):
    _, sr = handshake(NoiseHandshake(ALICE, initiator=True), NoiseHandshake(BOB, initiator=False))
    with contextlib.suppress(ProtocolError):
        sr.decrypt_stream(data)


def _session_pair():
    """Two transport sessions keyed alike (a's send key is b's receive key), without a handshake."""
    key = bytes(range(32))
    other = bytes(32)
    a = noise.NoiseSession(noise.CipherState(key), noise.CipherState(other))
    b = noise.NoiseSession(noise.CipherState(other), noise.CipherState(key))
    return a, b


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=70000), max_size=5), st.data())
def test_encrypt_parts_is_encrypting_their_concatenation(parts, data):
    """Laying pieces straight into the frame buffer gives the bytes a plain encrypt would."""
    a1, _ = _session_pair()
    a2, b = _session_pair()
    wire = bytes(a1.encrypt_parts(parts))
    assert wire == bytes(a2.encrypt(b"".join(parts)))
    # every frame within Noise's limit
    pos = 0
    while pos < len(wire):
        length = struct.unpack_from(">H", wire, pos)[0]
        assert noise.TAG <= length <= noise.MAX_FRAME
        pos += 2 + length
    assert pos == len(wire)
    # and it decrypts whatever the reads' boundaries
    got = bytearray()
    i = 0
    while i < len(wire):
        n = data.draw(st.integers(1, 80000))
        got += b.decrypt_stream(wire[i : i + n])
        i += n
    assert bytes(got) == b"".join(parts) and not b.has_buffered()


@settings(max_examples=50)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=6), st.data())
def test_bytes_read_past_the_handshake_may_hold_several_frames(messages, data):
    a, _ = _session_pair()
    wire = b"".join(bytes(a.encrypt(m)) for m in messages)
    cut = data.draw(st.integers(0, len(wire)))
    key = bytes(range(32))
    b = noise.NoiseSession(noise.CipherState(bytes(32)), noise.CipherState(key), wire[:cut])
    got = b.decrypt_stream(b"") + b.decrypt_stream(wire[cut:])
    assert got == b"".join(messages)
