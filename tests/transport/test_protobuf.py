"""Protobuf's varint rule (10 bytes, non-minimal allowed, 64-bit bound), by byte vectors.

The vectors are protobuf's own: the encoding guide's ``08 96 01`` (field 1 = 150) and the
64-bit extremes as Go's ``protowire`` writes and reads them.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from ocf.errors import ProtocolError
from ocf.identity import varint
from ocf.transport import protobuf
from ocf.transport.identify import IdentifyMessage

U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("hexbytes", "value", "length"),
    [
        ("00", 0, 1),
        ("01", 1, 1),
        ("7f", 127, 1),
        ("9601", 150, 2),
        ("ffffffffffffffff7f", (1 << 63) - 1, 9),  # the multiformats ceiling: 9 bytes
        ("80808080808080808001", 1 << 63, 10),  # a 10th byte: past the multiformats cap
        ("ffffffffffffffffff01", U64_MAX, 10),  # -1 as int64, the longest protobuf varint
        ("8000", 0, 2),  # padded (non-minimal) zero
        ("ff00", 127, 2),  # padded 127
        ("80808080808080808000", 0, 10),  # zero padded to the full 10 bytes
    ],
)
def test_protobuf_varint_vectors(hexbytes, value, length):
    data = bytes.fromhex(hexbytes) + b"\xaa"  # a trailing byte must stay unread
    assert protobuf.read_varint(data, 0) == (value, length)


@pytest.mark.parametrize(
    ("hexbytes", "why"),
    [
        ("", "truncated"),
        ("80", "truncated"),
        ("ffffffffffffffffff", "truncated"),  # 9 bytes, all continued
        ("ffffffffffffffffff02", "overflows"),  # bit 64
        ("ffffffffffffffffff81", "overflows"),  # a continued 10th byte
        ("ffffffffffffffffffff01", "overflows"),  # 11 bytes
        ("8080808080808080808000", "overflows"),  # zero padded to 11 bytes
    ],
)
def test_protobuf_varint_refusals(hexbytes, why):
    with pytest.raises(ProtocolError, match=why):
        protobuf.read_varint(bytes.fromhex(hexbytes), 0)


def test_multiformats_varint_keeps_its_stricter_rule():
    """The two rules differ exactly where the specs differ: multiformats refuses both."""
    with pytest.raises(varint.VarintError):
        varint.decode_exact(bytes.fromhex("80808080808080808001"))
    with pytest.raises(varint.VarintError):
        varint.decode_exact(bytes.fromhex("8000"))


def test_read_varint_never_reads_more_than_ten_bytes():
    """A long run of continuation bytes is refused after 10 of them, whatever follows."""
    data = b"\xff" * 1_000_000
    with pytest.raises(ProtocolError, match="overflows"):
        protobuf.read_varint(data, 0)
    with pytest.raises(ProtocolError, match="truncated"):
        protobuf.read_varint(data[:9], 0)


@given(st.integers(min_value=0, max_value=U64_MAX), st.integers(min_value=0, max_value=9))
def test_minimal_and_padded_encodings_decode_alike(value, pad):
    minimal = varint.encode(value)
    assert protobuf.read_varint(minimal, 0) == (value, len(minimal))
    if len(minimal) + pad <= protobuf.MAX_VARINT_BYTES:
        # Pad: set the continuation bit on the last byte, add 0x80s, end with 0x00.
        padded = minimal[:-1] + bytes([minimal[-1] | 0x80]) + b"\x80" * (pad - 1) + b"\x00" if pad else minimal
        assert protobuf.read_varint(padded, 0) == (value, len(padded))


def test_iter_fields_reads_a_10_byte_varint_field_and_padded_keys_and_lengths():
    data = bytes.fromhex(
        "08"
        "ffffffffffffffffff01"  # field 1, varint: uint64 max
        "9200"
        "83"
        "00"
        "616263"  # field 2 (padded key), length 3 padded to 2 bytes, "abc"
        "0896"
        "01"  # field 1 again: 150
    )
    assert list(protobuf.iter_fields(data)) == [(1, U64_MAX), (2, b"abc"), (1, 150)]


@pytest.mark.parametrize(
    ("hexbytes", "why"),
    [
        ("00", "field number 0"),
        ("808080801000", "out of range"),  # field number 2**29 (wire 0): one past protobuf's maximum
        ("0affffffffffffffffff01", "truncated"),  # a 2**64-1 length: refused, never allocated
        ("0a056162", "truncated"),
        ("0900000000", "truncated"),  # fixed64 with 4 bytes
        ("0b", "wire type 3"),
    ],
)
def test_iter_fields_refusals(hexbytes, why):
    with pytest.raises(ProtocolError, match=why):
        list(protobuf.iter_fields(bytes.fromhex(hexbytes)))


def test_identify_accepts_padded_varints_another_implementation_may_send():
    """Padded tag and length, as a protobuf encoder is allowed to write them, decode like minimal ones."""
    msg = IdentifyMessage(protocol_version="ipfs/0.1.0", agent_version="x", protocols=("/ipfs/ping/1.0.0",))
    minimal = msg.encode()
    padded = bytearray()
    for number, value in protobuf.iter_fields(minimal):
        assert isinstance(value, bytes)
        padded += bytes([(number << 3 | 2) | 0x80, 0x00])  # key in two bytes
        padded += bytes([len(value) | 0x80, 0x80, 0x00])  # length in three bytes
        padded += value
    assert IdentifyMessage.decode(bytes(padded)) == msg
