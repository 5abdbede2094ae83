"""The few protobuf wire-format pieces libp2p messages need.

libp2p's handshake payloads and identify messages are tiny protobufs with
length-delimited fields; a generated-code dependency for four messages is not
worth it. Unknown fields are skipped, as protobuf requires.

Protobuf's varints are not multiformats' (:mod:`ocf.identity.varint`, which
caps them at 9 bytes and refuses non-minimal encodings, as the multiformats
spec says): protobuf carries 64-bit values, so a varint may take 10 bytes,
and decoders accept padded (non-minimal) encodings. Refusing either would
refuse messages other libp2p implementations may legally send, so fields are
read with :func:`read_varint`, which follows protobuf's rule and is still
bounded: at most 10 bytes, and a value that fits in 64 bits. We write minimal
encodings, which both rules accept.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ProtocolError
from ..identity import varint

#: A 64-bit value takes at most ten 7-bit groups.
MAX_VARINT_BYTES = 10
#: Protobuf field numbers are 1 .. 2**29 - 1.
MAX_FIELD_NUMBER = (1 << 29) - 1


def read_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """Decode a protobuf varint at ``pos``; returns ``(value, new_pos)``.

    Accepts non-minimal encodings (as protobuf decoders do) and refuses, with
    :class:`ProtocolError`, a varint that runs past the data, past 10 bytes,
    or past 64 bits (a tenth byte above 1).
    """
    value = 0
    end = min(len(data), pos + MAX_VARINT_BYTES)
    for i in range(pos, end):
        byte = data[i]
        if i - pos == MAX_VARINT_BYTES - 1 and byte > 1:
            # The tenth byte holds bit 63 only; anything more (or a continuation) overflows.
            raise ProtocolError("protobuf varint overflows 64 bits")
        value |= (byte & 0x7F) << (7 * (i - pos))
        if not byte & 0x80:
            return value, i + 1
    raise ProtocolError("truncated protobuf varint")


def field(out: bytearray, number: int, value: bytes) -> None:
    """Append a length-delimited field."""
    out += varint.encode(number << 3 | 2)
    out += varint.encode(len(value))
    out += value


def iter_fields(data: bytes, *, fixed64: bool = False) -> Iterator[tuple[int, bytes | int]]:
    """Yield ``(field number, value)``; raises :class:`ProtocolError` on malformed input.

    64-bit fixed fields are skipped unless ``fixed64`` (then yielded as ints, little-endian unsigned).
    """
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if not 0 < number <= MAX_FIELD_NUMBER:
            raise ProtocolError(f"protobuf field number {number} out of range")
        if wire == 0:
            value, pos = read_varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = read_varint(data, pos)
            if length > len(data) - pos:
                raise ProtocolError("truncated protobuf field")
            yield number, bytes(data[pos : pos + length])
            pos += length
        elif wire == 1:
            if fixed64 and pos + 8 <= len(data):
                yield number, int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtocolError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ProtocolError("truncated protobuf field")


def bytes_fields(data: bytes) -> dict[int, list[bytes]]:
    """All length-delimited fields by number (repeated fields keep their order)."""
    out: dict[int, list[bytes]] = {}
    for number, value in iter_fields(data):
        if isinstance(value, bytes):
            out.setdefault(number, []).append(value)
    return out


def fixed64_field(out: bytearray, number: int, value: int) -> None:
    """Append a 64-bit fixed field (``fixed64``: AutoNAT v2's nonce)."""
    out += varint.encode(number << 3 | 1)
    out += (value & (1 << 64) - 1).to_bytes(8, "little")


def varint_field(out: bytearray, number: int, value: int) -> None:
    """Append a varint field (enums, uint32, uint64)."""
    out += varint.encode(number << 3)
    out += varint.encode(value)


def int_field(value: bytes | int, what: str) -> int:
    """A field's value that must be a varint; :class:`ProtocolError` if it came length-delimited."""
    if not isinstance(value, int):
        raise ProtocolError(f"{what} must be a varint field")
    return value
