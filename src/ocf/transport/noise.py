"""Noise XX handshake and transport for libp2p, sans-IO.

``Noise_XX_25519_ChaChaPoly_SHA256`` exactly as the libp2p noise spec:
messages are prefixed with a 2-byte big-endian length; the responder sends its
``NoiseHandshakePayload`` in message 2 and the initiator in message 3; each
payload carries the libp2p identity key and its Ed25519 signature over
``"noise-libp2p-static-key:" + <Noise static key>``, which binds the peer ID
to this very handshake. Primitives are `cryptography`'s; this module only
composes them per the Noise framework (rev 34) sections 5.1-5.3.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import HandshakeError, IdentityError, PeerIdMismatch, ProtocolError
from ..identity import Identity, PeerId
from ..identity.keys import KEY_TYPE_ED25519, decode_public_key
from . import protobuf

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
SIG_PREFIX = b"noise-libp2p-static-key:"
MAX_FRAME = 65535
TAG = 16
MAX_PLAINTEXT = MAX_FRAME - TAG
DHLEN = 32
MAX_NONCE = 2**64 - 1


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.new(ck, ikm, hashlib.sha256).digest()
    out1 = hmac.new(temp, b"\x01", hashlib.sha256).digest()
    out2 = hmac.new(temp, out1 + b"\x02", hashlib.sha256).digest()
    return out1, out2


def _nonce(n: int) -> bytes:
    return struct.pack("<4xQ", n)


class CipherState:
    """A key and a 64-bit counter nonce (Noise 5.1)."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise ProtocolError("noise: nonce exhausted; reconnect")
        out = self._aead.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def encrypt_in_place(self, ad: bytes, buf: memoryview, n: int) -> None:
        """Encrypt the first ``n`` bytes of ``buf`` where they lie; the tag goes in the next 16 bytes.

        Saves the copies ``encrypt`` costs (a new ciphertext object, then
        joining it with its length prefix) on the bulk data path.
        """
        if self._aead is None:
            return
        if self.n >= MAX_NONCE:
            raise ProtocolError("noise: nonce exhausted; reconnect")
        self._aead.encrypt_into(_nonce(self.n), buf[:n], ad, buf[: n + TAG])
        self.n += 1

    def decrypt(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= MAX_NONCE:
            raise ProtocolError("noise: nonce exhausted; reconnect")
        try:
            out = self._aead.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise ProtocolError("noise: message failed authentication (bad tag)") from None
        self.n += 1
        return out


class SymmetricState:
    """Chaining key and handshake hash (Noise 5.2)."""

    def __init__(self) -> None:
        self.h = PROTOCOL_NAME  # exactly HASHLEN bytes, so used as-is
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(key)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1), CipherState(k2)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(priv: X25519PrivateKey, pub_raw: bytes) -> bytes:
    try:
        return priv.exchange(X25519PublicKey.from_public_bytes(pub_raw))
    except ValueError as exc:  # low-order point -> all-zero shared secret
        raise HandshakeError(f"noise: bad Diffie-Hellman public key: {exc}") from None


def encode_payload(identity: Identity, static_pub: bytes, muxers: tuple[str, ...] = ()) -> bytes:
    """The signed NoiseHandshakePayload.

    We send no ``stream_muxers`` extension: a peer that sees it on both sides
    skips the multistream negotiation of the muxer ("early muxer
    negotiation"), which our upgrade does not implement.
    """
    out = bytearray()
    protobuf.field(out, 1, identity.public_key_proto)
    protobuf.field(out, 2, identity.sign(SIG_PREFIX + static_pub))
    if muxers:
        ext = bytearray()
        for m in muxers:
            protobuf.field(ext, 2, m.encode())
        protobuf.field(out, 4, bytes(ext))
    return bytes(out)


def verify_payload(payload: bytes, remote_static: bytes) -> PeerId:
    """Check the signed payload against the remote's Noise static key; return its peer ID."""
    fields = protobuf.bytes_fields(payload)
    key_proto = (fields.get(1) or [b""])[-1]
    signature = (fields.get(2) or [b""])[-1]
    if not key_proto or not signature:
        raise HandshakeError("noise: handshake payload lacks identity key or signature")
    try:
        key_type, raw = decode_public_key(key_proto)
        peer = PeerId.from_key_proto(key_proto)
    except IdentityError as exc:
        raise HandshakeError(f"noise: bad identity key: {exc}") from None
    if key_type != KEY_TYPE_ED25519:
        raise HandshakeError(f"noise: unsupported identity key type {key_type} (only Ed25519)")
    if not peer.verify(SIG_PREFIX + remote_static, signature):
        raise HandshakeError(f"noise: identity signature of {peer.short()} does not verify")
    return peer


class NoiseHandshake:
    """One side of the XX handshake.

    Drive it with :meth:`receive_data` / :meth:`data_to_send` until
    :attr:`complete`; then :meth:`session` gives the transport cipher.
    ``expected_peer`` (from a dialed ``/p2p/<id>``) makes a different
    authenticated peer a :class:`PeerIdMismatch`.
    """

    def __init__(self, identity: Identity, *, initiator: bool, expected_peer: PeerId | None = None) -> None:
        self.identity = identity
        self.initiator = initiator
        self.expected_peer = expected_peer
        self.remote_peer: PeerId | None = None
        self.complete = False
        self._s = X25519PrivateKey.generate()
        self._s_pub = _raw(self._s.public_key())
        self._e = X25519PrivateKey.generate()
        self._e_pub = _raw(self._e.public_key())
        self._re: bytes | None = None
        self._rs: bytes | None = None
        self._sym = SymmetricState()
        self._sym.mix_hash(b"")  # empty prologue
        self._step = 0  # messages processed so far (sent or received)
        self._inbuf = bytearray()
        self._out = bytearray()
        self._leftover = b""
        if initiator:
            self._write_message_1()

    # --- framing -------------------------------------------------------------------

    def _send(self, message: bytes) -> None:
        self._out += struct.pack(">H", len(message)) + message

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def bytes_wanted(self) -> int:
        """How many more bytes complete the next handshake message (so a driver never over-reads)."""
        buf = self._inbuf
        if len(buf) < 2:
            return 2 - len(buf)
        return max(1, 2 + ((buf[0] << 8) | buf[1]) - len(buf))

    def receive_data(self, data: bytes | bytearray) -> None:
        if self.complete:
            self._leftover += data
            return
        self._inbuf += data
        while not self.complete and len(self._inbuf) >= 2:
            (length,) = struct.unpack_from(">H", self._inbuf)
            if len(self._inbuf) < 2 + length:
                return
            message = bytes(self._inbuf[2 : 2 + length])
            del self._inbuf[: 2 + length]
            self._read_message(message)
        if self.complete and self._inbuf:
            self._leftover += bytes(self._inbuf)
            self._inbuf.clear()

    # --- the XX pattern --------------------------------------------------------------

    def _write_message_1(self) -> None:  # -> e
        self._sym.mix_hash(self._e_pub)
        self._send(self._e_pub + self._sym.encrypt_and_hash(b""))
        self._step = 1

    def _read_message(self, msg: bytes) -> None:
        if not self.initiator and self._step == 0:
            self._read_message_1(msg)
            self._write_message_2()
        elif self.initiator and self._step == 1:
            self._read_message_2(msg)
            self._write_message_3()
            self._finish()
        elif not self.initiator and self._step == 2:
            self._read_message_3(msg)
            self._finish()
        else:  # pragma: no cover - unreachable: complete stops reading
            raise ProtocolError("noise: unexpected handshake message")

    def _read_message_1(self, msg: bytes) -> None:  # <- e
        if len(msg) < DHLEN:
            raise HandshakeError("noise: message 1 too short")
        self._re = msg[:DHLEN]
        self._sym.mix_hash(self._re)
        self._sym.decrypt_and_hash(msg[DHLEN:])  # payload (empty in libp2p; ignored)

    def _write_message_2(self) -> None:  # -> e, ee, s, es + payload
        sym, re = self._sym, self._remote_ephemeral()
        sym.mix_hash(self._e_pub)
        sym.mix_key(_dh(self._e, re))  # ee
        enc_s = sym.encrypt_and_hash(self._s_pub)
        sym.mix_key(_dh(self._s, re))  # es (responder: s with re)
        payload = sym.encrypt_and_hash(encode_payload(self.identity, self._s_pub))
        self._send(self._e_pub + enc_s + payload)
        self._step = 2

    def _read_message_2(self, msg: bytes) -> None:  # <- e, ee, s, es + payload
        sym = self._sym
        if len(msg) < DHLEN + DHLEN + TAG + TAG:
            raise HandshakeError("noise: message 2 too short")
        self._re = msg[:DHLEN]
        sym.mix_hash(self._re)
        sym.mix_key(_dh(self._e, self._re))  # ee
        self._rs = self._decrypt(msg[DHLEN : DHLEN + DHLEN + TAG])
        sym.mix_key(_dh(self._e, self._rs))  # es (initiator: e with rs)
        self._authenticate(self._decrypt(msg[DHLEN + DHLEN + TAG :]))

    def _write_message_3(self) -> None:  # -> s, se + payload
        sym = self._sym
        enc_s = sym.encrypt_and_hash(self._s_pub)
        sym.mix_key(_dh(self._s, self._remote_ephemeral()))  # se (initiator: s with re)
        payload = sym.encrypt_and_hash(encode_payload(self.identity, self._s_pub))
        self._send(enc_s + payload)
        self._step = 3

    def _read_message_3(self, msg: bytes) -> None:  # <- s, se + payload
        sym = self._sym
        if len(msg) < DHLEN + TAG + TAG:
            raise HandshakeError("noise: message 3 too short")
        self._rs = self._decrypt(msg[: DHLEN + TAG])
        sym.mix_key(_dh(self._e, self._rs))  # se (responder: e with rs)
        self._authenticate(self._decrypt(msg[DHLEN + TAG :]))
        self._step = 3

    def _remote_ephemeral(self) -> bytes:
        if self._re is None:  # pragma: no cover - the message order reads it before any write uses it
            raise ProtocolError("noise: no remote ephemeral key yet")
        return self._re

    def _decrypt(self, ct: bytes) -> bytes:
        try:
            return self._sym.decrypt_and_hash(ct)
        except ProtocolError as exc:
            raise HandshakeError(str(exc)) from None

    def _authenticate(self, payload: bytes) -> None:
        assert self._rs is not None
        try:
            peer = verify_payload(payload, self._rs)
        except ProtocolError as exc:
            raise HandshakeError(f"noise: malformed handshake payload: {exc}") from None
        if self.expected_peer is not None and peer != self.expected_peer:
            raise PeerIdMismatch(f"dialed {self.expected_peer} but the peer authenticated as {peer}")
        self.remote_peer = peer

    def _finish(self) -> None:
        c1, c2 = self._sym.split()
        self._send_cs, self._recv_cs = (c1, c2) if self.initiator else (c2, c1)
        self.complete = True

    def session(self) -> NoiseSession:
        if not self.complete:
            raise RuntimeError("handshake not complete")
        return NoiseSession(self._send_cs, self._recv_cs, self._leftover)


class NoiseSession:
    """Transport phase: length-prefixed ChaCha20-Poly1305 frames, at most 65535 bytes each."""

    def __init__(self, send: CipherState, recv: CipherState, initial: bytes = b"") -> None:
        self._send = send
        self._recv = recv
        self._buf = bytearray(initial)

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytearray:
        """Frame and encrypt; large inputs become several frames in one buffer."""
        return self.encrypt_parts((plaintext,))

    def encrypt_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> bytearray:
        """Frame and encrypt the concatenation of ``parts`` (e.g. yamux headers and payloads).

        Every plaintext byte is copied once, straight to its place in the
        output between its frame's length prefix and tag, and encrypted
        there: no intermediate join, no per-frame ciphertext objects.
        """
        total = 0
        for part in parts:
            total += len(part)
        full, last = divmod(total, MAX_PLAINTEXT)
        sizes = [MAX_PLAINTEXT] * full
        if last or not full:
            sizes.append(last)
        out = bytearray(total + len(sizes) * (2 + TAG))
        view = memoryview(out)
        # Copy the plaintext in, skipping the prefix and tag of every frame.
        frame = 0
        room = sizes[0]
        pos = 2
        for part in parts:
            n = len(part)
            if n <= room:
                view[pos : pos + n] = part
                pos += n
                room -= n
            else:
                src = memoryview(part)
                off = 0
                while off < n:
                    if not room:
                        frame += 1
                        room = sizes[frame]
                        pos += TAG + 2
                    take = min(room, n - off)
                    view[pos : pos + take] = src[off : off + take]
                    pos += take
                    off += take
                    room -= take
        pos = 0
        encrypt = self._send.encrypt_in_place
        for size in sizes:
            out[pos] = (size + TAG) >> 8
            out[pos + 1] = (size + TAG) & 0xFF
            encrypt(b"", view[pos + 2 :], size)
            pos += 2 + size + TAG
        return out

    def decrypt_stream(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed ciphertext; return all plaintext of the frames now complete (``b""`` if none).

        Frames are decrypted straight out of ``data``; only a frame split
        across reads is copied, to join its pieces.
        """
        buf = self._buf
        out = []
        if buf:
            if len(buf) >= 2 and len(buf) >= 2 + ((buf[0] << 8) | buf[1]):
                # More than a frame waits (bytes read past the handshake): start over with all of it.
                data = bytes(buf) + data
                self._buf = buf = bytearray()
            else:
                plain = self._finish_frame(data)
                if plain is None:
                    return b""
                data, first = plain
                out.append(first)
        view = memoryview(data)
        decrypt = self._recv.decrypt
        pos = 0
        end = len(view)
        while end - pos >= 2:
            length = (view[pos] << 8) | view[pos + 1]
            if length < TAG:
                raise ProtocolError(f"noise: frame of {length} bytes is shorter than its tag")
            if end - pos - 2 < length:
                break
            out.append(decrypt(b"", view[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        if pos < end:
            self._buf = bytearray(view[pos:])
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _finish_frame(self, data: bytes | bytearray | memoryview) -> tuple[memoryview, bytes] | None:
        """Complete the frame begun in ``_buf`` from ``data``: (rest of data, its plaintext), or None if still short."""
        buf = self._buf
        view = memoryview(data)
        if len(buf) < 2:
            need = 2 - len(buf)
            buf += view[:need]
            view = view[need:]
            if len(buf) < 2:
                return None
        length = (buf[0] << 8) | buf[1]
        if length < TAG:
            raise ProtocolError(f"noise: frame of {length} bytes is shorter than its tag")
        need = 2 + length - len(buf)
        if need > len(view):
            buf += view
            return None
        buf += view[:need]
        self._buf = bytearray()
        return view[need:], self._recv.decrypt(b"", memoryview(buf)[2:])

    def has_buffered(self) -> bool:
        return bool(self._buf)
