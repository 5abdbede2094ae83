"""Circuit relay v2 messages (``hop`` and ``stop``) and reservation vouchers, sans-IO.

The wire format is libp2p's ``circuit.proto`` (proto2), each message
varint-length-prefixed on its stream::

    message HopMessage  { required Type type = 1; optional Peer peer = 2; optional Reservation reservation = 3;
                          optional Limit limit = 4; optional Status status = 5; }   // RESERVE=0 CONNECT=1 STATUS=2
    message StopMessage { required Type type = 1; optional Peer peer = 2; optional Limit limit = 3;
                          optional Status status = 4; }                             // CONNECT=0 STATUS=1
    message Peer        { required bytes id = 1; repeated bytes addrs = 2; }
    message Reservation { required uint64 expire = 1; repeated bytes addrs = 2; optional bytes voucher = 3; }
    message Limit       { optional uint32 duration = 1; optional uint64 data = 2; }

Messages are at most :data:`MAX_MESSAGE` bytes (go-libp2p's figure) and the
repeated fields are capped while decoding, so a hostile peer's message costs
a bounded amount to parse. Unknown fields are skipped, as protobuf requires;
an unknown message type is a malformed message, an unknown status is kept as
a number (a newer peer may add codes).
"""

from __future__ import annotations

import enum

import attrs

from ...errors import ProtocolError
from ...identity import Identity, PeerId, varint
from ...identity.keys import KEY_TYPE_ED25519, decode_public_key, verify_ed25519
from ..protobuf import field, int_field, iter_fields, varint_field

HOP = "/libp2p/circuit/relay/0.2.0/hop"
STOP = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE = 4096
MAX_ADDRS = 32  # addresses kept from one Peer or Reservation
VOUCHER_DOMAIN = b"libp2p-relay-rsvp"
VOUCHER_PAYLOAD_TYPE = b"\x03\x02"  # the multicodec 0x0302 as two raw bytes, as go-libp2p and js-libp2p write it


class Status(enum.IntEnum):
    UNUSED = 0
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


def status_name(code: int | None) -> str:
    """``RESOURCE_LIMIT_EXCEEDED`` for 201; ``STATUS_<n>`` for a code this build does not know."""
    if code is None:
        return "NO_STATUS"
    try:
        return Status(code).name
    except ValueError:
        return f"STATUS_{code}"


class HopType(enum.IntEnum):
    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(enum.IntEnum):
    CONNECT = 0
    STATUS = 1


@attrs.frozen
class Limit:
    """Per relayed connection: seconds it may stay open and bytes per direction; 0 is no limit."""

    duration: int = 0
    data: int = 0

    def encode(self) -> bytes:
        out = bytearray()
        if self.duration:
            varint_field(out, 1, self.duration)
        if self.data:
            varint_field(out, 2, self.data)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Limit:
        duration = amount = 0
        for number, value in iter_fields(data):
            if number == 1:
                duration = int_field(value, "limit.duration")
            elif number == 2:
                amount = int_field(value, "limit.data")
        return cls(duration, amount)


@attrs.frozen
class Peer:
    id: bytes
    addrs: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        field(out, 1, self.id)
        for addr in self.addrs:
            field(out, 2, addr)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Peer:
        peer_id: bytes | None = None
        addrs: list[bytes] = []
        for number, value in iter_fields(data):
            if number == 1 and isinstance(value, bytes):
                peer_id = value
            elif number == 2 and isinstance(value, bytes) and len(addrs) < MAX_ADDRS:
                addrs.append(value)
        if peer_id is None:
            raise ProtocolError("relay Peer without an id")
        return cls(peer_id, tuple(addrs))

    def peer_id(self) -> PeerId:
        """The id as a :class:`PeerId`; :class:`ProtocolError` if it is not one."""
        try:
            return PeerId(self.id)
        except Exception as exc:  # noqa: BLE001 - whatever the ID parser refuses is the peer's malformed message
            raise ProtocolError(f"relay Peer id is not a peer ID ({type(exc).__name__})") from None


@attrs.frozen
class Reservation:
    expire: int
    addrs: tuple[bytes, ...] = ()
    voucher: bytes = b""

    def encode(self) -> bytes:
        out = bytearray()
        varint_field(out, 1, self.expire)
        for addr in self.addrs:
            field(out, 2, addr)
        if self.voucher:
            field(out, 3, self.voucher)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Reservation:
        expire: int | None = None
        addrs: list[bytes] = []
        voucher = b""
        for number, value in iter_fields(data):
            if number == 1:
                expire = int_field(value, "reservation.expire")
            elif number == 2 and isinstance(value, bytes) and len(addrs) < MAX_ADDRS:
                addrs.append(value)
            elif number == 3 and isinstance(value, bytes):
                voucher = value
        if expire is None:
            raise ProtocolError("relay Reservation without expire")
        return cls(expire, tuple(addrs), voucher)


@attrs.frozen
class HopMessage:
    type: HopType
    peer: Peer | None = None
    reservation: Reservation | None = None
    limit: Limit | None = None
    status: int | None = None

    def encode(self) -> bytes:
        out = bytearray()
        varint_field(out, 1, int(self.type))
        if self.peer is not None:
            field(out, 2, self.peer.encode())
        if self.reservation is not None:
            field(out, 3, self.reservation.encode())
        if self.limit is not None:
            field(out, 4, self.limit.encode())
        if self.status is not None:
            varint_field(out, 5, int(self.status))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> HopMessage:
        if len(data) > MAX_MESSAGE:
            raise ProtocolError(f"hop message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        kind: int | None = None
        peer = reservation = limit = status = None
        for number, value in iter_fields(data):
            if number == 1:
                kind = int_field(value, "hop.type")
            elif number == 2 and isinstance(value, bytes):
                peer = Peer.decode(value)
            elif number == 3 and isinstance(value, bytes):
                reservation = Reservation.decode(value)
            elif number == 4 and isinstance(value, bytes):
                limit = Limit.decode(value)
            elif number == 5:
                status = int_field(value, "hop.status")
        try:
            hop_type = HopType(kind if kind is not None else -1)
        except ValueError:
            raise ProtocolError(f"hop message of unknown type {kind}") from None
        return cls(hop_type, peer, reservation, limit, status)


@attrs.frozen
class StopMessage:
    type: StopType
    peer: Peer | None = None
    limit: Limit | None = None
    status: int | None = None

    def encode(self) -> bytes:
        out = bytearray()
        varint_field(out, 1, int(self.type))
        if self.peer is not None:
            field(out, 2, self.peer.encode())
        if self.limit is not None:
            field(out, 3, self.limit.encode())
        if self.status is not None:
            varint_field(out, 4, int(self.status))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> StopMessage:
        if len(data) > MAX_MESSAGE:
            raise ProtocolError(f"stop message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        kind: int | None = None
        peer = limit = status = None
        for number, value in iter_fields(data):
            if number == 1:
                kind = int_field(value, "stop.type")
            elif number == 2 and isinstance(value, bytes):
                peer = Peer.decode(value)
            elif number == 3 and isinstance(value, bytes):
                limit = Limit.decode(value)
            elif number == 4:
                status = int_field(value, "stop.status")
        try:
            stop_type = StopType(kind if kind is not None else -1)
        except ValueError:
            raise ProtocolError(f"stop message of unknown type {kind}") from None
        return cls(stop_type, peer, limit, status)


# --- reservation vouchers: a signed envelope (libp2p RFC 0002) -------------------------------


def _envelope_signing_bytes(payload: bytes) -> bytes:
    parts = (VOUCHER_DOMAIN, VOUCHER_PAYLOAD_TYPE, payload)
    return b"".join(varint.encode(len(p)) + p for p in parts)


def make_voucher(relay: Identity, peer: PeerId, expiration: int) -> bytes:
    """The relay's signed promise to serve ``peer`` until ``expiration`` (canonical: fields in order)."""
    payload = bytearray()
    field(payload, 1, relay.peer_id.raw)
    field(payload, 2, peer.raw)
    varint_field(payload, 3, expiration)
    out = bytearray()
    field(out, 1, relay.public_key_proto)
    field(out, 2, VOUCHER_PAYLOAD_TYPE)
    field(out, 3, bytes(payload))
    field(out, 5, relay.sign(_envelope_signing_bytes(bytes(payload))))
    return bytes(out)


@attrs.frozen
class Voucher:
    relay: PeerId
    peer: PeerId
    expiration: int


def open_voucher(data: bytes) -> Voucher:
    """Check a voucher's signature and that its signer is the relay it names; :class:`ProtocolError` if not."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("voucher too large")
    env: dict[int, bytes] = {}
    for number, value in iter_fields(data):
        if isinstance(value, bytes):
            env[number] = value
    key, ptype, payload, sig = env.get(1), env.get(2), env.get(3), env.get(5)
    if key is None or payload is None or sig is None or ptype != VOUCHER_PAYLOAD_TYPE:
        raise ProtocolError("voucher is not a relay reservation envelope")
    try:
        key_type, raw = decode_public_key(key)
    except Exception:  # noqa: BLE001 - a malformed key is a malformed voucher
        raise ProtocolError("voucher has a malformed public key") from None
    if key_type != KEY_TYPE_ED25519 or not verify_ed25519(raw, _envelope_signing_bytes(payload), sig):
        raise ProtocolError("voucher signature does not verify")
    fields: dict[int, bytes | int] = dict(iter_fields(payload))
    relay_raw, peer_raw, exp = fields.get(1), fields.get(2), fields.get(3)
    if not isinstance(relay_raw, bytes) or not isinstance(peer_raw, bytes) or not isinstance(exp, int):
        raise ProtocolError("voucher payload lacks relay, peer or expiration")
    voucher = Voucher(Peer(relay_raw).peer_id(), Peer(peer_raw).peer_id(), exp)
    if not voucher.relay.matches_key_proto(key):
        raise ProtocolError("voucher is signed by another key than the relay it names")
    return voucher
