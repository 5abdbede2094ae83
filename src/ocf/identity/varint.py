"""Unsigned LEB128 varints, as used by multiformats (multiaddr, multihash,
multistream-select length prefixes).

Varints here are capped at 9 bytes (63 bits), the multiformats limit, so a
peer cannot make us parse an unbounded number.
"""

from __future__ import annotations

MAX_VARINT_BYTES = 9


class VarintError(ValueError):
    """The bytes are not a valid (minimal, bounded) unsigned varint."""


def encode(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned varint."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a varint at ``offset``.

    Returns ``(value, new_offset)``, or ``None`` if ``data`` ends before the
    varint does (the caller should wait for more bytes). Raises
    :class:`VarintError` for an over-long or non-minimal encoding.
    """
    value = 0
    shift = 0
    for i in range(MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            return None
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise VarintError("non-minimal varint encoding")
            return value, pos + 1
        shift += 7
    raise VarintError(f"varint longer than {MAX_VARINT_BYTES} bytes")


def decode_exact(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Like :func:`decode` but a truncated varint is an error, not 'need more'."""
    result = decode(data, offset)
    if result is None:
        raise VarintError("truncated varint")
    return result
