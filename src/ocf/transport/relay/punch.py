"""The pieces of DCUtR below the exchange (see :mod:`.dcutr`): its message, the TCP punch socket, UDP punch datagrams.

:class:`HolePunch` is sans-IO (bounded before parsing). :class:`PunchTransport`
dials TCP from one local port, with ``SO_REUSEPORT`` so that every candidate
address gets its own socket on that port: the port the peer was told to dial.
"""

from __future__ import annotations

import contextlib
import enum
import secrets
import socket
from collections.abc import AsyncIterator

import attrs
import trio

from ...errors import PeerUnreachable, ProtocolError
from ...identity import Multiaddr
from ..protobuf import field, int_field, iter_fields, varint_field
from ..tcp import RawConn

MAX_MESSAGE = 4096
PUNCH_DATAGRAM = 64


class MsgType(enum.IntEnum):
    CONNECT = 100
    SYNC = 300


@attrs.frozen
class HolePunch:
    type: MsgType
    addrs: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        varint_field(out, 1, int(self.type))
        for a in self.addrs:
            field(out, 2, a)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> HolePunch:
        if len(data) > MAX_MESSAGE:
            raise ProtocolError(f"dcutr message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        kind: int | None = None
        addrs: list[bytes] = []
        for number, value in iter_fields(data):
            if number == 1:
                kind = int_field(value, "dcutr.type")
            elif number == 2 and isinstance(value, bytes) and len(addrs) < 32:
                addrs.append(value)
        try:
            return cls(MsgType(kind if kind is not None else -1), tuple(addrs))
        except ValueError:
            raise ProtocolError(f"dcutr message of unknown type {kind}") from None


class Dials:
    """How many of a punch's dials are still pending; ``all_failed`` once none is (never if none was counted)."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.all_failed = trio.Event()

    def failed(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.all_failed.set()


class PunchTransport:
    """Dials from one local port, so the NAT maps it where the peer was told to dial."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.port: int = sock.getsockname()[1]
        self.family = sock.family
        self._first: trio.socket.SocketType | None = sock

    @classmethod
    async def bind(cls, family: socket.AddressFamily = socket.AF_INET) -> PunchTransport:
        return cls(await _reuse_socket(family, 0))

    def close(self) -> None:
        if self._first is not None:
            self._first.close()
            self._first = None

    @contextlib.asynccontextmanager
    async def connect(self, addr: Multiaddr, timeout: float) -> AsyncIterator[RawConn]:  # noqa: ASYNC109 - dial only
        host, port = addr.host_port()
        sock = self._first if self._first is not None else await _reuse_socket(self.family, self.port)
        self._first = None
        try:
            with trio.fail_after(timeout):
                await sock.connect((host, port))
        except trio.TooSlowError:
            sock.close()
            raise PeerUnreachable(f"hole punch to {addr} timed out") from None
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"hole punch to {addr} failed: {exc.strerror or exc}") from None
        stream = trio.SocketStream(sock)
        local = Multiaddr(
            (("ip4" if self.family == socket.AF_INET else "ip6", sock.getsockname()[0]), ("tcp", str(self.port)))
        )
        async with stream:
            yield RawConn(stream, addr.without_p2p(), local, "tcp")


async def _reuse_socket(family: socket.AddressFamily, port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        await sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    except OSError:
        sock.close()
        raise
    return sock


def punch_datagram() -> bytes:
    """Random bytes behind a QUIC short-header first byte: the peer's endpoint drops it as an unknown connection."""
    return bytes([0x40 | secrets.randbelow(0x40)]) + secrets.token_bytes(PUNCH_DATAGRAM - 1)
