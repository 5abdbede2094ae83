"""The kad-dht wire format: one protobuf ``Message`` per varint-length-prefixed frame.

libp2p's Kademlia RPC (``/ipfs/kad/1.0.0`` and any custom prefix) sends each
message as ``uvarint(len) || protobuf``; a stream may carry several requests
in a row, each answered in order. The message (libp2p specs, kad-dht)::

    message Message {
      MessageType type = 1;          // PUT_VALUE 0, GET_VALUE 1, ADD_PROVIDER 2,
                                     // GET_PROVIDERS 3, FIND_NODE 4, PING 5
      int32 clusterLevelRaw = 10;    // unused, echoed
      bytes key = 2;                 // FIND_NODE: the binary peer ID looked for
      bytes record = 3;              // kept opaque: we store no values
      repeated Peer closerPeers = 8;
      repeated Peer providerPeers = 9;
    }
    message Peer { bytes id = 1; repeated bytes addrs = 2; ConnectionType connection = 3; }

Everything here is sans-IO: :class:`FrameReader` is fed bytes and hands out
whole frames, refusing a declared length above its limit before a byte of
the body is buffered; :func:`decode` bounds the peers and addresses it
builds. Peer IDs and multiaddrs stay bytes at this layer; what they mean (and
whether to trust them) is decided by the caller.
"""

from __future__ import annotations

import enum

import attrs

from ..errors import ProtocolError
from ..identity import varint
from ..transport.protobuf import field, iter_fields

#: A request (FIND_NODE carries a 38-byte key) never needs more.
MAX_REQUEST = 4 * 1024
#: k = 20 closer peers with a handful of addresses each fit in a few KiB; go-libp2p allows 4 MiB.
MAX_RESPONSE = 64 * 1024
#: A reply lists at most k peers; go-libp2p may add the target itself on top.
MAX_CLOSER_PEERS = 32
#: A key is a binary peer ID (at most a few dozen bytes) or a CID; nothing honest is longer.
MAX_KEY = 256
#: Addresses kept per listed peer (identify keeps as many); the rest are dropped unparsed.
MAX_ADDRS_PER_PEER = 32


class MessageType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class Connectedness(enum.IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


class Refused(enum.Enum):
    """The answer to a request we will not serve: the stream is reset (the spec's error signal)."""

    REFUSED = "refused"


REFUSED = Refused.REFUSED


@attrs.frozen
class PeerEntry:
    """One listed peer: its binary peer ID and binary multiaddrs, as sent."""

    id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: int = Connectedness.NOT_CONNECTED

    def encode(self) -> bytes:
        out = bytearray()
        field(out, 1, self.id)
        for addr in self.addrs:
            field(out, 2, addr)
        if self.connection:
            _varint_field(out, 3, self.connection)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, *, max_addrs: int = MAX_ADDRS_PER_PEER) -> PeerEntry:
        peer_id = b""
        addrs: list[bytes] = []
        connection = 0
        for number, value in iter_fields(data):
            if number == 1 and isinstance(value, bytes):
                peer_id = value
            elif number == 2 and isinstance(value, bytes):
                if len(addrs) < max_addrs:
                    addrs.append(value)
            elif number == 3 and isinstance(value, int):
                connection = value
        if not peer_id:
            raise ProtocolError("kad peer entry without an id")
        return cls(peer_id, tuple(addrs), connection)


@attrs.frozen
class Message:
    """A kad-dht RPC message (request or response: the same shape)."""

    type: int
    key: bytes = b""
    closer: tuple[PeerEntry, ...] = ()
    providers: tuple[PeerEntry, ...] = ()
    record: bytes = b""
    cluster_level: int = 0

    def encode(self) -> bytes:
        out = bytearray()
        _varint_field(out, 1, self.type)
        if self.key:
            field(out, 2, self.key)
        if self.record:
            field(out, 3, self.record)
        for peer in self.closer:
            field(out, 8, peer.encode())
        for peer in self.providers:
            field(out, 9, peer.encode())
        if self.cluster_level:
            _varint_field(out, 10, self.cluster_level)
        return bytes(out)


def decode(data: bytes, *, max_peers: int = MAX_CLOSER_PEERS, max_addrs: int = MAX_ADDRS_PER_PEER) -> Message:
    """Parse one message body; :class:`ProtocolError` on malformed input or more than ``max_peers`` peers.

    A reply listing more peers than any honest implementation sends is
    refused whole rather than trimmed: it says the sender is not following
    the protocol, and the lookup should count it as a failed query.
    """
    mtype: int | None = None
    key = record = b""
    cluster = 0
    closer: list[PeerEntry] = []
    providers: list[PeerEntry] = []
    for number, value in iter_fields(data):
        if number == 1 and isinstance(value, int):
            mtype = value
        elif number == 2 and isinstance(value, bytes):
            key = value
        elif number == 3 and isinstance(value, bytes):
            record = value
        elif number in (8, 9) and isinstance(value, bytes):
            target = closer if number == 8 else providers
            if len(target) >= max_peers:
                raise ProtocolError(f"kad message lists more than {max_peers} peers")
            target.append(PeerEntry.decode(value, max_addrs=max_addrs))
        elif number == 10 and isinstance(value, int):
            cluster = value
    if mtype is None:
        mtype = MessageType.PUT_VALUE  # proto3: an absent enum is its zero value
    return Message(mtype, key, tuple(closer), tuple(providers), record, cluster)


def frame(message: Message) -> bytes:
    """``uvarint(len) || message``, as written on the stream."""
    body = message.encode()
    return varint.encode(len(body)) + body


class FrameReader:
    """Split a byte stream into length-prefixed frames of at most ``limit`` bytes.

    The declared length is checked as soon as its varint is complete, so a
    peer announcing a huge message is refused before it can make us buffer
    it; at most ``limit`` + 9 bytes are ever held.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._need: int | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; returns the frames completed by them (possibly none)."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                try:
                    parsed = varint.decode(self._buf)
                except varint.VarintError as exc:
                    raise ProtocolError(f"bad kad frame length: {exc}") from None
                if parsed is None:
                    return frames
                length, pos = parsed
                if length > self.limit:
                    self._buf.clear()
                    raise ProtocolError(f"kad message of {length} bytes exceeds the {self.limit}-byte limit")
                del self._buf[:pos]
                self._need = length
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None

    @property
    def pending(self) -> bool:
        """True when part of a frame has been received."""
        return bool(self._buf) or self._need is not None


def _varint_field(out: bytearray, number: int, value: int) -> None:
    out += varint.encode(number << 3)
    out += varint.encode(value)
