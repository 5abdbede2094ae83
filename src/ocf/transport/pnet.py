"""Private networks: libp2p's pre-shared-key connection protector (pnet, PSK v1).

With ``--network-key FILE`` every raw connection (TCP, WebSocket, in-memory)
is wrapped before multistream-select: each side sends a random 24-byte nonce,
then every byte in each direction is XOR'ed with the XSalsa20 keystream of
(key, sender's nonce). A peer without the key cannot produce one meaningful
byte, so the closed cluster refuses it before any Noise state exists. pnet adds
no authenticity of its own: Noise on top still authenticates and encrypts.

Wire compatible with go-libp2p (``p2p/net/pnet``) and js-libp2p
(``@libp2p/pnet``), key files included (go-libp2p's ``swarm.key`` format).

A wrong key (or a peer not in a private network at all) shows up as garbage
where the multistream header must be. Rather than feeding that to the
multistream parser, which could wait for a length the garbage claims, the
stream checks the peer's first bytes against the header that every libp2p
connection starts with, byte by byte, and refuses at the first wrong one with
:class:`~ocf.errors.PrivateNetworkRefused`.

The cipher is libsodium's ``crypto_stream_xsalsa20_xor_ic``, from the
libsodium that PyNaCl ships (``cryptography`` has no XSalsa20); nothing here
is hand-rolled crypto.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path
from collections.abc import Callable

import attrs
import trio

from .. import log as logfmt
from ..errors import PrivateNetworkRefused
from .layered import LayeredStream

log = logging.getLogger("ocf.transport.pnet")

KEY_SIZE = 32
NONCE_SIZE = 24
BLOCK = 64  # Salsa20 block: the keystream counter counts these
PSK_V1_HEADER = b"/key/swarm/psk/1.0.0/"
ENCODINGS = (b"/base16/", b"/base64/", b"/bin/")
MAX_KEY_FILE = 4096  # a swarm key is ~100 bytes; refuse to slurp anything big
MISMATCH = "network key mismatch or peer is not in this private network"
RECEIVE_SIZE = 256 * 1024
REFUSAL_LOG_INTERVAL = 60.0


# --- the key ------------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class NetworkKey:
    """A 32-byte pre-shared key. Its repr and str never show the key (configs get logged)."""

    psk: bytes = attrs.field(validator=lambda _i, _a, v: _check_len(v))
    source: str = ""
    world_readable: bool = False

    @property
    def fingerprint(self) -> str:
        """A short digest to compare keys between nodes in logs, without revealing the key."""
        return hashlib.sha256(b"ocf pnet fingerprint\0" + self.psk).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"NetworkKey(fingerprint={self.fingerprint}, source={self.source!r})"

    __str__ = __repr__


def _check_len(value: bytes) -> None:
    if len(value) != KEY_SIZE:
        raise ValueError(f"a network key is {KEY_SIZE} bytes, got {len(value)}")


def parse_swarm_key(data: bytes) -> bytes:
    """The 32-byte key of a go-libp2p ``swarm.key`` (``/base16/``, ``/base64/`` or ``/bin/``).

    Raises ValueError with a one-line reason. Stricter than go-libp2p about
    what follows the key: only whitespace (or, for ``/bin/``, one newline), so
    a truncated or doubled key is an error instead of a silent other key.
    """
    header, sep, rest = data.partition(b"\n")
    if header.rstrip(b"\r") != PSK_V1_HEADER:
        shown = header[:40].decode("utf-8", "replace")
        raise ValueError(f"not a swarm key: first line must be {PSK_V1_HEADER.decode()!r}, got {shown!r}")
    encoding, sep, body = rest.partition(b"\n")
    encoding = encoding.rstrip(b"\r")
    if not sep or encoding not in ENCODINGS:
        shown = encoding[:40].decode("utf-8", "replace")
        raise ValueError(
            f"unknown key encoding {shown!r} on the second line (expected one of /base16/, /base64/, /bin/)"
        )
    if encoding == b"/bin/":
        key = body[:-1] if len(body) == KEY_SIZE + 1 and body.endswith(b"\n") else body
    else:
        text = body.strip()
        if any(ch in text for ch in b" \t\r\n"):
            raise ValueError("the key must be on one line after the encoding line")
        try:
            key = (
                bytes.fromhex(text.decode("ascii"))
                if encoding == b"/base16/"
                else base64.b64decode(text, validate=True)
            )
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise ValueError(f"the key is not valid {encoding.decode().strip('/')}") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"the key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


def load_network_key(path: str | Path) -> NetworkKey:
    """Read and parse a swarm key file; ValueError with a one-line reason if it cannot be used."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a swarm key file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise ValueError(f"{path} is too large to be a swarm key (over {MAX_KEY_FILE} bytes)")
    try:
        psk = parse_swarm_key(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return NetworkKey(psk, str(path), world_readable=bool(mode & (stat.S_IRGRP | stat.S_IROTH)))


def format_swarm_key(psk: bytes) -> bytes:
    """A key in the ``/base16/`` form that go-libp2p, js-libp2p and IPFS read."""
    _check_len(psk)
    return PSK_V1_HEADER + b"\n/base16/\n" + psk.hex().encode() + b"\n"


def generate_swarm_key() -> bytes:
    return format_swarm_key(secrets.token_bytes(KEY_SIZE))


# --- the cipher (sans-IO) -----------------------------------------------------------------------


def _load_xor_ic() -> Callable[..., int]:
    """libsodium's ``crypto_stream_xsalsa20_xor_ic``.

    PyNaCl bundles libsodium and its extension exports the whole libsodium
    API, but its Python bindings do not wrap the raw stream cipher, so we
    call the C function through ctypes (from PyNaCl's copy, else a system one).
    """
    import nacl.bindings

    nacl.bindings.sodium_init()
    import nacl._sodium

    candidates = [nacl._sodium.__file__, ctypes.util.find_library("sodium")]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            fn = ctypes.CDLL(candidate).crypto_stream_xsalsa20_xor_ic
        except (OSError, AttributeError):
            continue
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_ulonglong,
            ctypes.c_char_p,
            ctypes.c_uint64,
            ctypes.c_char_p,
        ]
        fn.restype = ctypes.c_int
        return fn
    raise RuntimeError("libsodium's crypto_stream_xsalsa20_xor_ic is not available (is PyNaCl installed?)")


@functools.lru_cache(maxsize=1)
def _xor_ic() -> Callable[..., int]:
    """The C function, looked up once (on first use, so importing this module costs nothing)."""
    return _load_xor_ic()


class XSalsa20Stream:
    """One direction's keystream: XOR bytes in order; the position carries across calls.

    Splitting the same bytes into different chunks gives the same output,
    which is what lets each side XOR whatever the socket hands it.
    """

    def __init__(self, key: bytes, nonce: bytes) -> None:
        _check_len(key)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"an XSalsa20 nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
        self._key = bytes(key)
        self._nonce = bytes(nonce)
        self.position = 0
        self._fn = _xor_ic()

    def process(self, data: bytes | bytearray | memoryview) -> bytes:
        """XOR ``data`` with the next ``len(data)`` keystream bytes (encrypts and decrypts alike)."""
        n = len(data)
        if n == 0:
            return b""
        block, skip = divmod(self.position, BLOCK)
        # libsodium starts at a block boundary: pad the front of a partial block and drop it after.
        message = bytes(skip) + bytes(data) if skip else bytes(data)  # bytes(b) is b: no copy
        out = ctypes.create_string_buffer(len(message))
        if self._fn(out, message, len(message), self._nonce, block, self._key) != 0:
            raise RuntimeError("crypto_stream_xsalsa20_xor_ic failed")
        self.position += n
        return out.raw[skip:] if skip else out.raw


class PnetSession:
    """Both directions of one protected connection, fed bytes, no I/O.

    ``expect`` is what the peer's plaintext must start with (the multistream
    header); a byte that differs means the peer has another key, or none.
    """

    def __init__(self, psk: bytes, *, local_nonce: bytes | None = None, expect: bytes = b"") -> None:
        self.local_nonce = secrets.token_bytes(NONCE_SIZE) if local_nonce is None else local_nonce
        self._psk = psk
        self._send = XSalsa20Stream(psk, self.local_nonce)
        self._recv: XSalsa20Stream | None = None
        self._nonce_buf = b""
        self._expect = expect
        self._checked = 0

    @property
    def nonce_received(self) -> bool:
        return self._recv is not None

    @property
    def verified(self) -> bool:
        """The peer's nonce arrived and its first bytes decrypted to what ``expect`` says."""
        return self._recv is not None and self._checked >= len(self._expect)

    def receive_wanted(self, max_bytes: int) -> int:
        """Ciphertext bytes to read so at most ``max_bytes`` of plaintext come out."""
        return max_bytes + (0 if self._recv is not None else NONCE_SIZE - len(self._nonce_buf))

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._send.process(data)

    def decrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """Plaintext of ``data``; the peer's nonce is taken from the front of the stream first."""
        if self._recv is None:
            need = NONCE_SIZE - len(self._nonce_buf)
            self._nonce_buf += bytes(data[:need])
            data = data[need:]
            if len(self._nonce_buf) < NONCE_SIZE:
                return b""
            self._recv = XSalsa20Stream(self._psk, self._nonce_buf)
        plain = self._recv.process(data)
        if self._checked < len(self._expect) and plain:
            want = self._expect[self._checked : self._checked + len(plain)]
            if plain[: len(want)] != want:
                raise PrivateNetworkRefused(MISMATCH)
            self._checked += len(want)
        return plain


# --- the Trio wrapper ---------------------------------------------------------------------------


class PnetStream(LayeredStream):
    """A raw connection seen through the pnet cipher. Until the peer proved the key,
    its closing or breaking the connection counts as a refusal too (it could not read us)."""

    def __init__(self, transport: trio.abc.Stream, session: PnetSession) -> None:
        super().__init__(transport)
        self.session = session
        self._pending = b""  # plaintext a carrier handed over with the nonce, despite being asked for less

    def _refused(self, reason: str) -> PrivateNetworkRefused:
        return PrivateNetworkRefused(f"{MISMATCH} ({reason})")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.transport.send_all(self.session.encrypt(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.session.verified:
                raise
            raise self._refused("the peer closed the connection") from None

    async def _receive_raw(self, want: int) -> bytes | bytearray:
        """Next ciphertext; until the peer proved the key, its EOF or reset is a refusal."""
        try:
            data = await self.transport.receive_some(want)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.session.verified:
                raise
            raise self._refused("the peer broke the connection") from None
        if not data and not self.session.verified:
            raise self._refused("the peer closed the connection")
        return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = RECEIVE_SIZE if max_bytes is None else max_bytes
        if self._pending:
            await trio.lowlevel.checkpoint()
            data, self._pending = self._pending[:limit], self._pending[limit:]
            return data
        while True:
            raw = await self._receive_raw(self.session.receive_wanted(limit))
            if not raw:
                return b""
            plain = self.session.decrypt(raw)
            if plain:
                return plain

    async def receive_nonce(self) -> None:
        """Read exactly the peer's nonce: what follows stays in the carrier for :meth:`receive_some`."""
        while not self.session.nonce_received:
            self._pending += self.session.decrypt(await self._receive_raw(self.session.receive_wanted(0)))


class Protector:
    """Wraps raw connections for one network key; counts and logs refusals (rate-limited)."""

    def __init__(self, key: NetworkKey, *, expect: bytes = b"", log_interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.key = key
        self.expect = expect
        self.stats = {"protected": 0, "refused": 0}
        self._log = logfmt.RateLimitedLog(log, log_interval, clock=trio.current_time)

    async def protect(self, stream: trio.abc.Stream, *, initiator: bool) -> PnetStream:
        """Exchange nonces and return the wrapped stream.

        The dialer sends its nonce at once and reads the peer's with its first
        bytes, so its multistream proposal goes out in the same round trip and
        a peer outside the network sees garbage and hangs up at once. The
        listener speaks only after the dialer's nonce arrived: js-libp2p over
        WebSocket drops a message that comes with the upgrade response, and
        every dialer sends its nonce without waiting for ours.
        """
        session = PnetSession(self.key.psk, expect=self.expect)
        wrapped = PnetStream(stream, session)
        if not initiator:
            await wrapped.receive_nonce()
        try:
            await stream.send_all(session.local_nonce)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise wrapped._refused("the peer closed the connection") from None
        self.stats["protected"] += 1
        return wrapped

    def refused(self, exc: PrivateNetworkRefused, *, inbound: bool) -> None:
        """Count a refusal; inbound ones are logged at most once per interval, with the count."""
        self.stats["refused"] += 1
        if not inbound:
            return
        self._log.warning(
            "refused", "refused connections without this network's key", total=self.stats["refused"], reason=exc
        )


def protector_for(key: NetworkKey) -> Protector:
    """The protector a host uses: it expects the multistream header first, as every libp2p connection starts."""
    from .multistream import HEADER, encode

    log.info(
        "private network: only peers with this network key can connect %s",
        logfmt.kv(fingerprint=key.fingerprint, file=key.source or "-"),
    )
    if key.world_readable:
        log.warning("the network key file is readable by other users; chmod 600 it %s", logfmt.kv(file=key.source))
    return Protector(key, expect=encode(HEADER))
