"""AutoNAT v2 (``/libp2p/autonat/2/dial-request`` and ``/dial-back``): is this one address reachable?

v1 asks "dial me back" and trusts the answer; v2 tests one address at a time
and proves the dial: the client sends its addresses in priority order and a
random 64-bit nonce; the server dials the first address it is willing to and,
on a fresh connection, sends the nonce on ``/libp2p/autonat/2/dial-back``; the
client answers only for a nonce it is waiting on, and counts the server's
``OK`` only if that nonce came back. Messages on the request stream::

    message Message { oneof msg { DialRequest dialRequest = 1; DialResponse dialResponse = 2;
                                  DialDataRequest dialDataRequest = 3; DialDataResponse dialDataResponse = 4; } }
    message DialRequest { repeated bytes addrs = 1; fixed64 nonce = 2; }
    message DialDataRequest { uint32 addrIdx = 1; uint64 numBytes = 2; }
    message DialResponse { ResponseStatus status = 1; uint32 addrIdx = 2; DialStatus dialStatus = 3; }
    message DialDataResponse { bytes data = 1; }
    message DialBack { fixed64 nonce = 1; }   message DialBackResponse { DialBackStatus status = 1; }

Amplification toll: a server asked to dial an IP other than the one the
request came from first asks for :data:`DIAL_DATA_MIN`–:data:`DIAL_DATA_MAX`
bytes (in chunks of at most :data:`DIAL_DATA_CHUNK`), so that pointing it at a
third party costs the requester more than the handshake it buys. A client
pays at most :data:`MAX_DIAL_DATA` and resets the stream above that.

Server limits are v1's (per-peer and global rates, one request at a time per
peer, nothing over a relayed connection, deadlines, size bounds before
parsing); it dials TCP addresses the dial policy allows, never a private one
that is not in our own networks (the policy's rule), and from a throwaway
identity on a fresh connection.
"""

from __future__ import annotations

import enum
import logging
import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from ... import log as logfmt
from ...errors import MultiaddrError, ProtocolError, TransportError
from ...identity import Multiaddr, PeerId
from ..identify import read_message, write_answer, write_message
from ..protobuf import field, fixed64_field, int_field, iter_fields, varint_field
from ..tcp import is_tcp_addr

if TYPE_CHECKING:
    from ..host import Host
    from ..muxer import MuxedStream
    from .autonat import AutoNat

log = logging.getLogger("ocf.transport.autonat")

DIAL_REQUEST = "/libp2p/autonat/2/dial-request"
DIAL_BACK = "/libp2p/autonat/2/dial-back"
MAX_MESSAGE = 8192
MAX_ADDRS = 32
DIAL_DATA_MIN = 30_000
DIAL_DATA_MAX = 100_000
DIAL_DATA_CHUNK = 4096
MAX_DIAL_DATA = 200 * 1024
DIAL_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0


class ResponseStatus(enum.IntEnum):
    E_INTERNAL_ERROR = 0
    E_REQUEST_REJECTED = 100
    E_DIAL_REFUSED = 101
    OK = 200


class DialStatus(enum.IntEnum):
    UNUSED = 0
    E_DIAL_ERROR = 100
    E_DIAL_BACK_ERROR = 101
    OK = 200


@attrs.frozen
class DialRequest:
    addrs: tuple[bytes, ...]
    nonce: int


@attrs.frozen
class DialResponse:
    status: int
    addr_idx: int = 0
    dial_status: int = DialStatus.UNUSED


@attrs.frozen
class DialDataRequest:
    addr_idx: int
    num_bytes: int


@attrs.frozen
class DialDataResponse:
    data: bytes


Message = DialRequest | DialResponse | DialDataRequest | DialDataResponse


def encode(message: Message) -> bytes:
    inner = bytearray()
    if isinstance(message, DialRequest):
        for a in message.addrs:
            field(inner, 1, a)
        fixed64_field(inner, 2, message.nonce)
        number = 1
    elif isinstance(message, DialResponse):
        varint_field(inner, 1, message.status)
        varint_field(inner, 2, message.addr_idx)
        varint_field(inner, 3, message.dial_status)
        number = 2
    elif isinstance(message, DialDataRequest):
        varint_field(inner, 1, message.addr_idx)
        varint_field(inner, 2, message.num_bytes)
        number = 3
    else:
        field(inner, 1, message.data)
        number = 4
    out = bytearray()
    field(out, number, bytes(inner))
    return bytes(out)


def decode(data: bytes) -> Message:
    """Parse a ``Message``; :class:`ProtocolError` if malformed or empty."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"autonat v2 message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    found: tuple[int, bytes] | None = None
    for number, value in iter_fields(data):
        if number in (1, 2, 3, 4) and isinstance(value, bytes):
            found = (number, value)  # a oneof: the last one wins
    if found is None:
        raise ProtocolError("autonat v2 message without a known body")
    number, body = found
    if number == 1:
        addrs: list[bytes] = []
        nonce = 0
        for n, v in iter_fields(body, fixed64=True):
            if n == 1 and isinstance(v, bytes) and len(addrs) < MAX_ADDRS:
                addrs.append(v)
            elif n == 2 and isinstance(v, int):
                nonce = v
        return DialRequest(tuple(addrs), nonce)
    ints = {n: int_field(v, "autonat v2 field") for n, v in iter_fields(body) if not isinstance(v, bytes)}
    if number == 2:
        return DialResponse(ints.get(1, 0), ints.get(2, 0), ints.get(3, 0))
    if number == 3:
        return DialDataRequest(ints.get(1, 0), ints.get(2, 0))
    payload = next((v for n, v in iter_fields(body) if n == 1 and isinstance(v, bytes)), b"")
    return DialDataResponse(payload)


def encode_dial_back(nonce: int) -> bytes:
    out = bytearray()
    fixed64_field(out, 1, nonce)
    return bytes(out)


def decode_dial_back(data: bytes) -> int:
    for n, v in iter_fields(data, fixed64=True):
        if n == 1 and isinstance(v, int):
            return v
    raise ProtocolError("dial-back without a nonce")


def _ip(addr: Multiaddr) -> str | None:
    return addr.parts[0][1] if addr.parts and addr.parts[0][0] in ("ip4", "ip6") else None


def _strip_p2p(raw: bytes) -> Multiaddr | None:
    try:
        return Multiaddr.from_bytes(raw).without_p2p()
    except MultiaddrError:
        return None


class AutoNatV2:
    """The v2 server and client for one host; v1's :class:`~.autonat.AutoNat` owns rates and results."""

    def __init__(self, host: Host, v1: AutoNat) -> None:
        self.host = host
        self.v1 = v1
        self._nonces: dict[int, trio.Event] = {}
        self.stats = {
            "requests": 0,
            "dial_backs": 0,
            "dial_back_ok": 0,
            "dial_data_asked": 0,
            "dial_data_paid": 0,
            "answers": 0,
        }
        self.addr_results: dict[str, str] = {}  # address -> "public" | "private" (latest answer)
        self._busy: set[PeerId] = set()  # one v2 request at a time per peer (v1 keeps its own)

    def _count(self, what: str) -> None:
        self.stats[what] += 1

    # --- server --------------------------------------------------------------------------

    def _choose(self, addrs: tuple[bytes, ...]) -> tuple[int, Multiaddr] | None:
        """The first address we are willing to dial: TCP (not WebSocket), with an IP, allowed by the dial policy."""
        for idx, raw in enumerate(addrs):
            ma = _strip_p2p(raw)
            if ma is None or _ip(ma) is None or not is_tcp_addr(ma) or ma.has("ws") or ma.has("p2p-circuit"):
                continue
            if self.host.dial_policy.refusal(ma) is None:
                return idx, ma
        return None

    async def _respond(self, stream: MuxedStream, status: ResponseStatus, idx: int = 0, dial: int = 0) -> None:
        await write_answer(stream, encode(DialResponse(status, idx, dial)), REQUEST_TIMEOUT)

    async def handle_request(self, stream: MuxedStream) -> None:
        peer = stream.remote_peer
        self._count("requests")
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = decode(await read_message(stream, MAX_MESSAGE))
            if not isinstance(request, DialRequest):
                raise ProtocolError("expected a dial request")
        except trio.TooSlowError:
            self.v1._refuse("v2_request_timeout", peer)
            return
        except (ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.v1._refuse("v2_bad_request", peer)
            await self._respond(stream, ResponseStatus.E_INTERNAL_ERROR)
            return
        conn = self.host.connection_of(stream)
        if conn is None or conn.relayed or conn.remote_addr is None or _ip(conn.remote_addr) is None:
            self.v1._refuse("relayed", peer)
            await self._respond(stream, ResponseStatus.E_REQUEST_REJECTED)
            return
        why = "peer_rate" if peer in self._busy else self.v1._admit(peer, trio.current_time(), v2=True)
        if why is not None:
            self.v1._refuse(why, peer)
            await self._respond(stream, ResponseStatus.E_REQUEST_REJECTED)
            return
        chosen = self._choose(request.addrs)
        if chosen is None:
            self.v1._refuse("no_addrs", peer)
            await self._respond(stream, ResponseStatus.E_DIAL_REFUSED)
            return
        idx, addr = chosen
        self._busy.add(peer)
        try:
            if _ip(addr) != _ip(conn.remote_addr) and not await self._collect_toll(stream, idx, peer):
                return
            status = await self._dial_back(addr, request.nonce, peer)
            await self._respond(stream, ResponseStatus.OK, idx, status)
        finally:
            self._busy.discard(peer)

    async def _collect_toll(self, stream: MuxedStream, idx: int, peer: PeerId) -> bool:
        """Ask for dial data and read it; False (stream given up) if the client would not pay in time."""
        wanted = DIAL_DATA_MIN + secrets.randbelow(DIAL_DATA_MAX - DIAL_DATA_MIN + 1)
        self._count("dial_data_asked")
        received = 0
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await write_message(stream, encode(DialDataRequest(idx, wanted)))
                while received < wanted:
                    message = decode(await read_message(stream, MAX_MESSAGE))
                    if not isinstance(message, DialDataResponse) or len(message.data) > DIAL_DATA_CHUNK:
                        raise ProtocolError("expected dial data of at most 4096 bytes")
                    received += len(message.data)
        except (trio.TooSlowError, ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.v1._refuse("v2_no_dial_data", peer)
            return False
        return True

    async def _dial_back(self, addr: Multiaddr, nonce: int, peer: PeerId) -> DialStatus:
        self._count("dial_backs")
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                async with self.host.probe_stream(addr, DIAL_BACK, DIAL_TIMEOUT) as stream:
                    try:
                        await write_message(stream, encode_dial_back(nonce))
                        answer = await read_message(stream, MAX_MESSAGE)
                        status = next((int_field(v, "status") for n, v in iter_fields(answer) if n == 1), 0)
                    except (ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
                        return DialStatus.E_DIAL_BACK_ERROR
        except (TransportError, trio.TooSlowError) as exc:
            log.debug("v2 dial-back failed %s", logfmt.kv(peer=peer.short(), addr=addr, reason=exc or "timeout"))
            return DialStatus.E_DIAL_ERROR
        if status != 0:
            return DialStatus.E_DIAL_BACK_ERROR
        self._count("dial_back_ok")
        return DialStatus.OK

    # --- client ----------------------------------------------------------------------------

    async def handle_dial_back(self, stream: MuxedStream) -> None:
        """A server's dial-back: answer OK only to a nonce we are waiting on."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                nonce = decode_dial_back(await read_message(stream, MAX_MESSAGE))
                waiting = self._nonces.get(nonce)
                if waiting is None:
                    raise ProtocolError("dial-back with an unknown nonce")
                waiting.set()
                out = bytearray()
                varint_field(out, 1, 0)
                await write_message(stream, bytes(out))
        except (trio.TooSlowError, ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.v1._refuse("v2_bad_dial_back", stream.remote_peer)

    async def ask(self, server: PeerId, addrs: list[Multiaddr]) -> tuple[Multiaddr, str] | None:
        """Ask ``server`` to test ``addrs`` (priority order): (address, "public" | "private"), or None."""
        nonce = secrets.randbits(64)
        came_back = self._nonces[nonce] = trio.Event()
        try:
            with trio.fail_after(REQUEST_TIMEOUT + DIAL_TIMEOUT), self.host.duplicates_allowed(server):
                stream = await self.host.new_stream(server, DIAL_REQUEST)
                async with stream:
                    request = DialRequest(tuple(a.to_bytes() for a in addrs), nonce)
                    await write_message(stream, encode(request))
                    answer = await self._answer(stream, server)
        except (
            trio.TooSlowError,
            ProtocolError,
            TransportError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            log.debug("autonat v2 ask failed %s", logfmt.kv(server=server.short(), reason=exc or type(exc).__name__))
            return None
        finally:
            del self._nonces[nonce]
        if answer is None or answer.status != ResponseStatus.OK or not 0 <= answer.addr_idx < len(addrs):
            return None
        addr = addrs[answer.addr_idx]
        if answer.dial_status == DialStatus.OK and came_back.is_set():
            result = "public"
        elif answer.dial_status == DialStatus.E_DIAL_ERROR:
            result = "private"
        else:  # a dial-back error, or an OK without our nonce: nothing learned
            return None
        self.addr_results[str(addr)] = result
        self._count("answers")
        log.info("autonat v2 answer %s", logfmt.kv(server=server.short(), addr=addr, result=result))
        return addr, result

    async def _answer(self, stream: MuxedStream, server: PeerId) -> DialResponse | None:
        """Read until a response, paying the toll if asked (up to :data:`MAX_DIAL_DATA`)."""
        while True:
            message = decode(await read_message(stream, MAX_MESSAGE))
            if isinstance(message, DialDataRequest):
                if message.num_bytes > MAX_DIAL_DATA:
                    log.info("autonat v2 toll refused %s", logfmt.kv(server=server.short(), asked=message.num_bytes))
                    stream.reset()
                    return None
                self._count("dial_data_paid")
                chunk = encode(DialDataResponse(bytes(DIAL_DATA_CHUNK)))
                for _ in range(0, message.num_bytes, DIAL_DATA_CHUNK):
                    await write_message(stream, chunk)
            elif isinstance(message, DialResponse):
                return message
            else:
                raise ProtocolError("unexpected autonat v2 message")
