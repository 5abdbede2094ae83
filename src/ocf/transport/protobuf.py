"""The few protobuf wire-format pieces libp2p messages need.

libp2p's handshake payloads and identify messages are tiny protobufs with
length-delimited fields; a generated-code dependency for four messages is not
worth it. Unknown fields are skipped, as protobuf requires.
"""

from __future__ import annotations

from typing import Iterator

from ..errors import ProtocolError
from ..identity import varint


def field(out: bytearray, number: int, value: bytes) -> None:
    """Append a length-delimited field."""
    out += varint.encode(number << 3 | 2)
    out += varint.encode(len(value))
    out += value


def iter_fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
    """Yield ``(field number, value)``; raises :class:`ProtocolError` on malformed input."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = varint.decode_exact(data, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise ProtocolError("protobuf field number 0")
            if wire == 0:
                value, pos = varint.decode_exact(data, pos)
                yield number, value
            elif wire == 2:
                length, pos = varint.decode_exact(data, pos)
                if pos + length > len(data):
                    raise ProtocolError("truncated protobuf field")
                yield number, bytes(data[pos : pos + length])
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ProtocolError(f"unsupported protobuf wire type {wire}")
            if pos > len(data):
                raise ProtocolError("truncated protobuf field")
    except varint.VarintError as exc:
        raise ProtocolError(f"bad protobuf varint: {exc}") from None


def bytes_fields(data: bytes) -> dict[int, list[bytes]]:
    """All length-delimited fields by number (repeated fields keep their order)."""
    out: dict[int, list[bytes]] = {}
    for number, value in iter_fields(data):
        if isinstance(value, bytes):
            out.setdefault(number, []).append(value)
    return out
