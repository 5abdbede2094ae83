import contextlib

import pytest
from hypothesis import given, strategies as st

from ocf.errors import IdentityError
from ocf.identity import Identity, PeerId
from ocf.identity import base58, varint
from ocf.identity.keys import decode_public_key, load_or_create

# libp2p peer-ids spec, Ed25519 test vector (private key protobuf -> public key protobuf -> peer ID)
SPEC_PRIVATE = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
SPEC_PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_spec_vector():
    ident = Identity.from_file_bytes(SPEC_PRIVATE)
    assert ident.public_key_proto == SPEC_PUBLIC
    assert str(ident.peer_id) == SPEC_PEER
    assert ident.to_file_bytes() == SPEC_PRIVATE
    assert PeerId.from_key_proto(SPEC_PUBLIC) == ident.peer_id


def test_parse_format_roundtrip_and_key_extraction():
    peer = PeerId.from_string(SPEC_PEER)
    assert peer.to_string() == SPEC_PEER
    assert peer.public_key() == decode_public_key(SPEC_PUBLIC)[1]
    assert peer.short().endswith(SPEC_PEER[-6:])


def test_hashed_peer_id_parses_but_has_no_key():
    # An RSA-era ID as printed by OCF's own log in seed 000.
    peer = PeerId.from_string("QmP3MQe3yGi7FQUKHVKrUQMTum3RHpVJs5iynZLdC2mFZq")
    assert str(peer) == "QmP3MQe3yGi7FQUKHVKrUQMTum3RHpVJs5iynZLdC2mFZq"
    with pytest.raises(IdentityError):
        peer.public_key()
    assert not peer.verify(b"x", b"\0" * 64)


@pytest.mark.parametrize("bad", ["", "0OIl", "12D3KooW", "QmShort", "1" * 10, "zzzzzzzzzzzz"])
def test_bad_peer_ids_rejected(bad):
    with pytest.raises(IdentityError):
        PeerId.from_string(bad)


def test_sign_and_verify():
    ident = Identity.from_seed("alice")
    sig = ident.sign(b"hello")
    assert ident.peer_id.verify(b"hello", sig)
    assert not ident.peer_id.verify(b"hellO", sig)
    assert not Identity.from_seed("bob").peer_id.verify(b"hello", sig)


def test_seed_is_deterministic_and_distinct():
    assert Identity.from_seed("a").peer_id == Identity.from_seed("a").peer_id
    assert Identity.from_seed("a").peer_id != Identity.from_seed("b").peer_id
    assert str(Identity.from_seed("a").peer_id).startswith("12D3KooW")


def test_identity_file_persists_with_mode_0600(tmp_path):
    first, created = load_or_create(tmp_path)
    assert created
    assert (tmp_path / "identity.key").stat().st_mode & 0o777 == 0o600
    again, created = load_or_create(tmp_path)
    assert not created
    assert again.peer_id == first.peer_id


def test_corrupt_identity_file_is_a_clear_error(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="identity.key"):
        load_or_create(tmp_path)


@given(st.binary(min_size=1, max_size=64))
def test_base58_roundtrip(data):
    assert base58.decode(base58.encode(data)) == data


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_roundtrip(n):
    encoded = varint.encode(n)
    assert varint.decode(encoded) == (n, len(encoded))
    assert varint.decode(encoded[:-1]) is None


@given(st.binary(max_size=80))
def test_peer_id_parser_never_crashes(data):
    with contextlib.suppress(IdentityError):
        PeerId(data)


def test_varint_rejects_overlong_and_nonminimal():
    with pytest.raises(varint.VarintError):
        varint.decode(b"\xff" * 10)
    with pytest.raises(varint.VarintError):
        varint.decode(b"\x80\x00")


@given(st.binary(min_size=32, max_size=32))
def test_parsed_text_is_the_text_printed(seed):
    """from_string keeps the text it parsed; base58btc has one spelling per byte string, so it must equal encode()."""
    raw = PeerId.from_public_key(seed).raw
    text = base58.encode(raw)
    parsed = PeerId.from_string(text)
    assert str(parsed) == text == str(PeerId(raw))
    assert base58.encode(base58.decode("11" + text)) == "11" + text
