"""libp2p peer IDs.

A peer ID is a multihash of the protobuf-encoded public key. Ed25519 keys are
small, so libp2p inlines them with the *identity* multihash (code 0x00); the
base58btc text of those always starts ``12D3KooW``. Larger keys (RSA) use
sha256 (``Qm…``); we can parse those but cannot recover their key.
"""

from __future__ import annotations

import hashlib

import attrs

from ..errors import IdentityError
from . import base58, varint
from .keys import KEY_TYPE_ED25519, decode_public_key, encode_public_key, verify_ed25519

MH_IDENTITY = 0x00
MH_SHA256 = 0x12
MAX_INLINE_KEY = 42  # libp2p: keys whose protobuf is <= 42 bytes are inlined


@attrs.frozen(order=True)
class PeerId:
    """The binary multihash; compare and hash by bytes, print as base58btc."""

    raw: bytes
    # The base58 text, computed on first use: peer IDs are printed on every
    # forwarded request and log line, and base58 costs a big-integer division per character.
    _text: str | None = attrs.field(default=None, init=False, eq=False, order=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_multihash(self.raw)

    @classmethod
    def from_public_key(cls, public_raw: bytes, key_type: int = KEY_TYPE_ED25519) -> PeerId:
        proto = encode_public_key(public_raw, key_type)
        if len(proto) <= MAX_INLINE_KEY:
            return cls(bytes([MH_IDENTITY, len(proto)]) + proto)
        return cls(bytes([MH_SHA256, 32]) + hashlib.sha256(proto).digest())

    @classmethod
    def from_key_proto(cls, proto: bytes) -> PeerId:
        key_type, raw = decode_public_key(proto)
        return cls.from_public_key(raw, key_type)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58btc form (``12D3KooW…`` or ``Qm…``)."""
        if not isinstance(text, str) or not text:
            raise IdentityError("empty peer ID")
        try:
            raw = base58.decode(text)
        except ValueError as exc:
            raise IdentityError(f"invalid peer ID {text!r}: {exc}") from None
        try:
            peer = cls(raw)
        except IdentityError as exc:
            raise IdentityError(f"invalid peer ID {text!r}: {exc}") from None
        # base58btc has one spelling per byte string, so the text parsed is the text printed.
        object.__setattr__(peer, "_text", text)
        return peer

    def to_string(self) -> str:
        text = self._text
        if text is None:
            text = base58.encode(self.raw)
            object.__setattr__(self, "_text", text)
        return text

    def __str__(self) -> str:
        return self.to_string()

    def short(self) -> str:
        """Short form for logs: last 6 characters, as libp2p tooling prints them."""
        text = self.to_string()
        return f"…{text[-6:]}"

    def public_key(self) -> bytes:
        """The raw Ed25519 public key inlined in this ID.

        Raises :class:`IdentityError` for hashed IDs or non-Ed25519 keys.
        """
        if self.raw[0] != MH_IDENTITY:
            raise IdentityError("peer ID does not inline its public key")
        key_type, raw = decode_public_key(self.raw[2:])
        if key_type != KEY_TYPE_ED25519 or len(raw) != 32:
            raise IdentityError("peer ID key is not Ed25519")
        return raw

    def matches_key_proto(self, proto: bytes) -> bool:
        try:
            return PeerId.from_key_proto(proto) == self
        except IdentityError:
            return False

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Verify an Ed25519 signature made by the key this ID embeds."""
        try:
            key = self.public_key()
        except IdentityError:
            return False
        return verify_ed25519(key, data, signature)


def _check_multihash(raw: bytes) -> None:
    try:
        code, pos = varint.decode_exact(raw)
        length, pos = varint.decode_exact(raw, pos)
    except varint.VarintError as exc:
        raise IdentityError(f"bad multihash: {exc}") from None
    if code not in (MH_IDENTITY, MH_SHA256):
        raise IdentityError(f"unsupported multihash code {code:#x}")
    if len(raw) - pos != length:
        raise IdentityError("multihash length does not match its digest")
    if code == MH_SHA256 and length != 32:
        raise IdentityError("sha256 multihash must be 32 bytes")
    if code == MH_IDENTITY:
        decode_public_key(raw[pos:])
