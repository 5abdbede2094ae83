"""Base58btc (the Bitcoin alphabet), the text form of libp2p peer IDs.

Small enough to own; peer IDs are at most a few dozen bytes, so the
quadratic big-integer approach is fine.
"""

from __future__ import annotations

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    num = int.from_bytes(data, "big")
    chars = []
    while num:
        num, rem = divmod(num, 58)
        chars.append(ALPHABET[rem])
    return "1" * zeros + "".join(reversed(chars))


def decode(text: str) -> bytes:
    if not text:
        raise ValueError("empty base58 string")
    num = 0
    for c in text:
        try:
            num = num * 58 + _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid base58 character {c!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * zeros + body
