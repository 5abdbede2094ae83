"""``/ipfs/id/1.0.0`` (identify): peers tell each other who they are and where they listen.

When a connection is up, each side opens an identify stream to the other; the
listener answers with one varint-length-prefixed protobuf ``Identify``
message and closes the stream::

    message Identify {
      optional string protocolVersion = 5;   // "ipfs/0.1.0"
      optional string agentVersion = 6;      // "ocf/<version>"
      optional bytes publicKey = 1;          // libp2p PublicKey protobuf
      repeated bytes listenAddrs = 2;        // binary multiaddrs
      optional bytes observedAddr = 4;       // how the asker's connection looks from here
      repeated string protocols = 3;
      optional bytes signedPeerRecord = 8;   // not sent; ignored
    }

What we learn is stored on the host: listen addresses (so a peer can be
redialed later, :meth:`Host.peer_addrs`), protocols, agent and the address
the peer observed for us.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import attrs
import trio

from .. import log as logfmt
from ..errors import MultiaddrError, ProtocolError, TransportError
from ..identity import Multiaddr, varint
from ..version import AGENT
from .protobuf import field as _field, iter_fields as _iter_fields

if TYPE_CHECKING:
    from .host import Connection, Host
    from .muxer import MuxedStream

log = logging.getLogger("ocf.transport.identify")

PROTOCOL = "/ipfs/id/1.0.0"
PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_MESSAGE = 64 * 1024  # js-libp2p caps identify at 8 KiB, go-libp2p at 4 KiB of addrs; be generous
MAX_LISTEN_ADDRS = 32
IDENTIFY_TIMEOUT = 10.0


@attrs.frozen
class IdentifyMessage:
    protocol_version: str = ""
    agent_version: str = ""
    public_key: bytes = b""
    listen_addrs: tuple[bytes, ...] = ()
    observed_addr: bytes = b""
    protocols: tuple[str, ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        if self.public_key:
            _field(out, 1, self.public_key)
        for addr in self.listen_addrs:
            _field(out, 2, addr)
        for proto in self.protocols:
            _field(out, 3, proto.encode())
        if self.observed_addr:
            _field(out, 4, self.observed_addr)
        if self.protocol_version:
            _field(out, 5, self.protocol_version.encode())
        if self.agent_version:
            _field(out, 6, self.agent_version.encode())
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> IdentifyMessage:
        """Parse; unknown fields are skipped, malformed input raises :class:`ProtocolError`."""
        fields: dict[int, list[bytes]] = {}
        for number, value in _iter_fields(data):
            if number in (1, 2, 3, 4, 5, 6) and isinstance(value, bytes):
                fields.setdefault(number, []).append(value)
        try:
            return cls(
                protocol_version=_last(fields, 5).decode(),
                agent_version=_last(fields, 6).decode(),
                public_key=_last(fields, 1),
                listen_addrs=tuple(fields.get(2, ())),
                observed_addr=_last(fields, 4),
                protocols=tuple(p.decode() for p in fields.get(3, ())),
            )
        except UnicodeDecodeError:
            raise ProtocolError("identify message has a string that is not UTF-8") from None


def _last(fields: dict[int, list[bytes]], number: int) -> bytes:
    values = fields.get(number)
    return values[-1] if values else b""


async def write_message(stream: trio.abc.SendStream, payload: bytes) -> None:
    await stream.send_all(varint.encode(len(payload)) + payload)


async def write_answer(stream: trio.abc.SendStream, payload: bytes, timeout: float) -> None:  # noqa: ASYNC109
    """A server's last message, written within ``timeout``: a requester that stalls or left gets nothing more."""
    with contextlib.suppress(TransportError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.fail_after(timeout):
            await write_message(stream, payload)


async def read_message(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """Read one varint-length-prefixed message of at most ``limit`` bytes."""
    buf = bytearray()
    while True:
        parsed = varint.decode(buf)
        if parsed is not None:
            break
        chunk = await stream.receive_some(10 - len(buf) if len(buf) < 10 else 1)
        if not chunk:
            raise ProtocolError("stream ended before the message length")
        buf += chunk
    length, pos = parsed
    if length > limit:
        raise ProtocolError(f"message of {length} bytes exceeds the {limit}-byte limit")
    body = bytearray(buf[pos:])
    while len(body) < length:
        chunk = await stream.receive_some(length - len(body))
        if not chunk:
            raise ProtocolError(f"stream ended after {len(body)} of {length} message bytes")
        body += chunk
    if len(body) > length:
        raise ProtocolError("extra bytes after the identify message")
    return bytes(body)


def _connection_of(host: Host, stream: MuxedStream) -> Connection | None:
    for conn in host.connections(stream.remote_peer):
        if conn.muxed is stream.connection:
            return conn
    return None


def build_message(host: Host, conn: Connection | None) -> IdentifyMessage:
    observed = conn.remote_addr.to_bytes() if conn is not None and conn.remote_addr is not None else b""
    return IdentifyMessage(
        protocol_version=PROTOCOL_VERSION,
        agent_version=AGENT,
        public_key=host.identity.public_key_proto,
        listen_addrs=tuple(a.without_p2p().to_bytes() for a in host.listen_addrs),
        observed_addr=observed,
        protocols=tuple(host.protocols),
    )


async def handle_identify(host: Host, stream: MuxedStream) -> None:
    message = build_message(host, _connection_of(host, stream))
    await write_message(stream, message.encode())


def register(host: Host) -> None:
    async def handler(stream: MuxedStream) -> None:
        await handle_identify(host, stream)

    host.set_stream_handler(PROTOCOL, handler)


async def identify_peer(host: Host, conn: Connection) -> IdentifyMessage | None:
    """Ask the peer of ``conn`` to identify itself and record the answer on the host.

    Runs in the background after every new connection; failures are logged,
    never raised (identify is informative, the connection is fine without it).
    """
    peer = conn.peer
    limit = min(MAX_MESSAGE, host.config.max_message_size)
    try:
        with trio.fail_after(IDENTIFY_TIMEOUT):
            stream = await conn.muxed.open_stream()
            async with stream:
                stream.protocol = await host.upgrader.select(stream, [PROTOCOL])
                raw = await read_message(stream, limit)
        message = IdentifyMessage.decode(raw)
    except (TransportError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("identify failed %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__))
        return None
    if message.public_key and not peer.matches_key_proto(message.public_key):
        host.resources.note_refusal(
            "peer", "identify_bad_key", "identify: public key does not match the peer ID; ignored", peer=peer.short()
        )
        return None
    record(host, peer, message)
    return message


def record(host: Host, peer, message: IdentifyMessage) -> None:  # type: ignore[no-untyped-def]
    from .host import PeerInfo

    if not host.is_connected(peer) and peer not in host._kept:
        return  # the connection ended while it identified, and no layer above keeps the peer (Host._remove)
    addrs = []
    for raw in message.listen_addrs[:MAX_LISTEN_ADDRS]:
        try:
            addrs.append(Multiaddr.from_bytes(raw))
        except MultiaddrError:
            continue  # a transport we do not know (quic, webrtc…): not dialable by us anyway
    host.add_addrs(peer, addrs, keep=False)
    observed = None
    if message.observed_addr:
        try:
            observed = Multiaddr.from_bytes(message.observed_addr)
        except MultiaddrError:
            observed = None
    host._info[peer] = PeerInfo(
        protocols=list(message.protocols),
        agent_version=message.agent_version,
        protocol_version=message.protocol_version,
        observed_addr=observed,
    )
    host._notify_changed()  # e.g. the circuit relay client waits to learn which peers are relays
    for listener in list(host.identify_listeners):
        listener(peer, host._info[peer])
    log.debug(
        "identified %s",
        logfmt.kv(
            peer=peer.short(), agent=message.agent_version or "-", addrs=len(addrs), protocols=len(message.protocols)
        ),
    )
