"""Ed25519 node identity and the libp2p key encodings.

A node's identity is an Ed25519 key pair. libp2p serializes keys as a small
protobuf (``KeyType Type = 1; bytes Data = 2``), and that encoding of the
public key is what a peer ID hashes and what the Noise handshake payload
carries, so we keep both encodings here next to the key itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ..errors import IdentityError

if TYPE_CHECKING:
    from .peerid import PeerId

KEY_TYPE_ED25519 = 1
IDENTITY_FILE = "identity.key"


def encode_public_key(raw: bytes, key_type: int = KEY_TYPE_ED25519) -> bytes:
    """libp2p ``PublicKey`` protobuf for a raw key."""
    return _pb_key(key_type, raw)


def decode_public_key(data: bytes) -> tuple[int, bytes]:
    """Parse a libp2p ``PublicKey`` protobuf into ``(key_type, raw_key)``."""
    return _parse_pb_key(data)


def _pb_key(key_type: int, raw: bytes) -> bytes:
    if len(raw) > 127:
        # Ed25519 keys are 32 (public) / 64 (private) bytes; a 1-byte length is enough.
        raise IdentityError("key too long for this encoder")
    return bytes([0x08, key_type, 0x12, len(raw)]) + raw


def _parse_pb_key(data: bytes) -> tuple[int, bytes]:
    key_type: int | None = None
    raw: bytes | None = None
    pos = 0
    try:
        while pos < len(data):
            tag = data[pos]
            pos += 1
            if tag == 0x08:  # field 1, varint
                key_type = data[pos]
                if key_type & 0x80:
                    raise IdentityError("key type out of range")
                pos += 1
            elif tag == 0x12:  # field 2, length-delimited
                length = data[pos]
                pos += 1
                if length & 0x80:
                    # Two-byte lengths occur for RSA keys; decode generally.
                    length = (length & 0x7F) | (data[pos] << 7)
                    pos += 1
                raw = bytes(data[pos : pos + length])
                if len(raw) != length:
                    raise IdentityError("truncated key data")
                pos += length
            else:
                raise IdentityError(f"unexpected protobuf tag {tag:#x} in key")
    except IndexError:
        raise IdentityError("truncated key protobuf") from None
    if key_type is None or raw is None:
        raise IdentityError("key protobuf lacks type or data")
    return key_type, raw


def verify_ed25519(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@attrs.frozen(repr=False)
class Identity:
    """A node's Ed25519 key pair, with its libp2p peer ID."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str | bytes) -> Identity:
        """Deterministic identity for tests and reproducible setups (``--seed``).

        The seed is hashed, so any string gives a valid key; the same seed
        always gives the same peer ID.
        """
        if isinstance(seed, str):
            seed = seed.encode()
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ocf-seed:" + seed).digest()))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) not in (32, 64):
            raise IdentityError(f"Ed25519 private key must be 32 or 64 bytes, got {len(raw)}")
        key = Ed25519PrivateKey.from_private_bytes(raw[:32])
        ident = cls(key)
        if len(raw) == 64 and raw[32:] != ident.public_raw:
            raise IdentityError("private key file is inconsistent (public half does not match)")
        return ident

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def private_raw(self) -> bytes:
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_key_proto(self) -> bytes:
        return encode_public_key(self.public_raw)

    @property
    def peer_id(self) -> PeerId:
        from .peerid import PeerId

        return PeerId.from_public_key(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_file_bytes(self) -> bytes:
        """libp2p ``PrivateKey`` protobuf (Ed25519: 32-byte seed + 32-byte public key), as go-libp2p stores it."""
        return _pb_key(KEY_TYPE_ED25519, self.private_raw + self.public_raw)

    @classmethod
    def from_file_bytes(cls, data: bytes) -> Identity:
        key_type, raw = _parse_pb_key(data)
        if key_type != KEY_TYPE_ED25519:
            raise IdentityError(f"unsupported identity key type {key_type} (only Ed25519)")
        return cls.from_private_bytes(raw)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def load_or_create(data_dir: Path) -> tuple[Identity, bool]:
    """Load ``<data_dir>/identity.key`` or create it (mode 0600).

    Returns ``(identity, created)``. The file is written to a temporary name,
    fsynced and renamed, so a crash never leaves a half-written key.
    """
    path = data_dir / IDENTITY_FILE
    if path.exists():
        try:
            return Identity.from_file_bytes(path.read_bytes()), False
        except IdentityError as exc:
            raise IdentityError(f"{path}: {exc}; move it away to create a new identity") from None
    identity = Identity.generate()
    save(identity, data_dir)
    return identity, True


def save(identity: Identity, data_dir: Path) -> None:
    path = data_dir / IDENTITY_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, identity.to_file_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
