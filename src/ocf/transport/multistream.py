"""multistream-select 1.0, sans-IO.

Every libp2p connection and every stream starts by agreeing on a protocol:
both sides send ``/multistream/1.0.0``, the dialer proposes protocol IDs one
by one, the listener echoes the one it accepts or answers ``na``. Each
message is a uvarint length, the UTF-8 text and a trailing ``\\n``.

The machines here only turn bytes into decisions. :meth:`bytes_wanted` tells
a driver how much to read so it never reads past the negotiation: the bytes
after it belong to the next protocol (Noise, yamux or the application).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import attrs

from ..errors import ProtocolError, ProtocolNotSupported
from ..identity import varint

HEADER = "/multistream/1.0.0"
NA = "na"
LS = "ls"
MAX_MESSAGE = 1024  # libp2p protocol IDs are short; anything longer is abuse


def encode(text: str) -> bytes:
    data = text.encode() + b"\n"
    return varint.encode(len(data)) + data


HEADER_BYTES = encode(HEADER)


@attrs.frozen
class Agreed:
    protocol: str
    leftover: bytes = b""


class _Reader:
    """Splits the byte stream into multistream messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def bytes_wanted(self) -> int:
        """Bytes needed to complete the next message (at least 1); never more."""
        try:
            parsed = varint.decode(self._buf)
        except varint.VarintError as exc:
            raise ProtocolError(f"multistream: bad length prefix: {exc}") from None
        if parsed is None:
            return 1
        length, offset = parsed
        return max(1, offset + length - len(self._buf))

    def next_message(self) -> str | None:
        try:
            parsed = varint.decode(self._buf)
        except varint.VarintError as exc:
            raise ProtocolError(f"multistream: bad length prefix: {exc}") from None
        if parsed is None:
            if len(self._buf) > 2:
                raise ProtocolError("multistream: length prefix too long")
            return None
        length, offset = parsed
        if length > MAX_MESSAGE:
            raise ProtocolError(f"multistream: message of {length} bytes exceeds {MAX_MESSAGE}")
        if len(self._buf) < offset + length:
            return None
        raw = bytes(self._buf[offset : offset + length])
        del self._buf[: offset + length]
        if not raw.endswith(b"\n"):
            raise ProtocolError("multistream: message does not end with a newline")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise ProtocolError("multistream: message is not UTF-8") from None

    def check_prefix(self, expected: bytes) -> None:
        """Raise unless the buffered bytes could still begin with ``expected`` (checked as they arrive)."""
        n = min(len(self._buf), len(expected))
        if self._buf[:n] != expected[:n]:
            got = bytes(self._buf[: len(expected)])
            raise ProtocolError(f"multistream: expected header {HEADER!r}, got {got[:64]!r}")

    def rest(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class _Side:
    """What both roles share: message splitting, the header check, the outbox."""

    def __init__(self) -> None:
        self._reader = _Reader()
        self._out = bytearray()
        self._header_seen = False
        self.result: Agreed | None = None

    def bytes_wanted(self) -> int:
        return self._reader.bytes_wanted()

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def _messages(self, data: bytes):  # type: ignore[no-untyped-def]
        """Yield each protocol message after the header, until one is agreed."""
        self._reader.feed(data)
        if not self._header_seen:
            # Every connection and stream starts with the header: refuse on the
            # first byte that differs instead of waiting for whatever length
            # garbage (a peer of another protocol or private network) announces.
            self._reader.check_prefix(HEADER_BYTES)
        while self.result is None:
            message = self._reader.next_message()
            if message is None:
                return
            if not self._header_seen:
                if message != HEADER:
                    raise ProtocolError(f"multistream: expected header {HEADER!r}, got {message[:64]!r}")
                self._header_seen = True
                self._on_header()
                continue
            yield message

    def _on_header(self) -> None:
        pass


class Dialer(_Side):
    """The side that proposes. Sends its header and first proposal at once (one round trip when accepted)."""

    def __init__(self, protocols: Sequence[str]) -> None:
        if not protocols:
            raise ValueError("Dialer needs at least one protocol")
        super().__init__()
        self._protocols = list(protocols)
        self._index = 0

    def initiate(self) -> bytes:
        return encode(HEADER) + encode(self._protocols[0])

    def receive_data(self, data: bytes) -> Agreed | None:
        """Feed bytes; returns :class:`Agreed` once the listener accepted a proposal."""
        for message in self._messages(data):
            proposed = self._protocols[self._index]
            if message == proposed:
                self.result = Agreed(proposed, self._reader.rest())
            elif message == NA:
                self._index += 1
                if self._index >= len(self._protocols):
                    raise ProtocolNotSupported(f"peer supports none of {', '.join(self._protocols)}")
                self._out += encode(self._protocols[self._index])
            else:
                raise ProtocolError(f"multistream: unexpected answer {message[:64]!r} to {proposed!r}")
        return self.result


class Listener(_Side):
    """The side that accepts or refuses proposals.

    It greets only after the dialer's header: a listener that speaks first can
    lose its greeting on transports whose client attaches late (js-libp2p over
    WebSocket drops a message that arrives with the upgrade response).
    """

    def __init__(self, supported: Callable[[str], bool] | Collection[str]) -> None:
        super().__init__()
        self._supported = supported if callable(supported) else supported.__contains__
        self._list = None if callable(supported) else sorted(supported)

    def _on_header(self) -> None:
        self._out += encode(HEADER)

    def receive_data(self, data: bytes) -> Agreed | None:
        for message in self._messages(data):
            if message == LS and self._list is not None:
                body = b"".join(encode(p) for p in self._list)
                self._out += varint.encode(len(body)) + body
            elif message and message != NA and self._supported(message):
                self._out += encode(message)
                self.result = Agreed(message, self._reader.rest())
            else:
                self._out += encode(NA)
        return self.result
