"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): ask peers to dial us back; learn whether we are reachable.

v1, because that is what js-libp2p's ``@libp2p/autonat`` and go-libp2p's
default speak. The wire format is one varint-prefixed protobuf each way::

    message Message { optional MessageType type = 1; optional Dial dial = 2;
                      optional DialResponse dialResponse = 3; }
    message Dial { optional PeerInfo peer = 1; }
    message PeerInfo { optional bytes id = 1; repeated bytes addrs = 2; }
    message DialResponse { optional ResponseStatus status = 1; optional string statusText = 2;
                           optional bytes addr = 3; }

As a server we are a tool for whoever asks, so (the spec's rules and go-libp2p's limits):

- we dial back only the IP address the requester's connection comes from
  (its claimed addresses give the ports): a requester cannot aim us at a
  third party; requests over a relayed connection are refused (no IP to
  check);
- at most :data:`MAX_DIAL_ADDRS` addresses, each under :data:`DIAL_TIMEOUT`,
  from a throwaway identity on a fresh connection;
- :data:`GLOBAL_PER_MINUTE` requests a minute in all and
  :data:`PEER_PER_MINUTE` per peer, one at a time per peer;
- the request is size-bounded before parsing and has a deadline.

As a client (``--reachability auto``) we ask peers that speak the protocol;
one that dials us back makes us public; :data:`CONFIDENCE` failures (or
every server we could ask, if fewer) make us private.

AutoNAT v2 (:mod:`.autonat2`) is served alongside, and preferred as a client:
a server that lists ``/libp2p/autonat/2/dial-request`` in identify is asked
about our addresses by v2 (proved by a nonce); one that does not, by v1.
Both answers count the same way towards the verdict.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

import attrs
import trio

from ... import log as logfmt
from ...errors import MultiaddrError, ProtocolError, TransportError
from ...identity import Multiaddr, PeerId
from ..dialpolicy import classify
from ..identify import read_message, write_answer, write_message
from ..protobuf import field, int_field, iter_fields, varint_field
from ..tcp import is_tcp_addr

from .autonat2 import DIAL_BACK, DIAL_REQUEST, AutoNatV2

if TYPE_CHECKING:
    from ..host import Host
    from ..muxer import MuxedStream
    from .nat import Nat

log = logging.getLogger("ocf.transport.autonat")

PROTOCOL = "/libp2p/autonat/1.0.0"
MAX_MESSAGE = 4096
MAX_ADDRS = 32
MAX_DIAL_ADDRS = 4
DIAL_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0
ANSWER_TIMEOUT = DIAL_TIMEOUT * MAX_DIAL_ADDRS + REQUEST_TIMEOUT
GLOBAL_PER_MINUTE = 30
PEER_PER_MINUTE = 3
CONFIDENCE = 3
RECHECK_AFTER = 15 * 60.0


class MsgType(enum.IntEnum):
    DIAL = 0
    DIAL_RESPONSE = 1


class RespStatus(enum.IntEnum):
    OK = 0
    E_DIAL_ERROR = 100
    E_DIAL_REFUSED = 101
    E_BAD_REQUEST = 200
    E_INTERNAL_ERROR = 300


@attrs.frozen
class DialRequest:
    peer: bytes
    addrs: tuple[bytes, ...]

    def encode(self) -> bytes:
        info = bytearray()
        field(info, 1, self.peer)
        for a in self.addrs:
            field(info, 2, a)
        dial = bytearray()
        field(dial, 1, bytes(info))
        out = bytearray()
        varint_field(out, 1, MsgType.DIAL)
        field(out, 2, bytes(dial))
        return bytes(out)


@attrs.frozen
class DialResponse:
    status: int
    text: str = ""
    addr: bytes = b""

    def encode(self) -> bytes:
        resp = bytearray()
        varint_field(resp, 1, self.status)
        if self.text:
            field(resp, 2, self.text.encode())
        if self.addr:
            field(resp, 3, self.addr)
        out = bytearray()
        varint_field(out, 1, MsgType.DIAL_RESPONSE)
        field(out, 3, bytes(resp))
        return bytes(out)


def decode(data: bytes) -> DialRequest | DialResponse:
    """Parse a Message; :class:`ProtocolError` if malformed or neither a dial nor a response."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"autonat message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    kind: int | None = None
    dial = resp = None
    for number, value in iter_fields(data):
        if number == 1:
            kind = int_field(value, "autonat.type")
        elif number == 2 and isinstance(value, bytes):
            dial = value
        elif number == 3 and isinstance(value, bytes):
            resp = value
    if kind == MsgType.DIAL and dial is not None:
        peer, addrs = b"", list[bytes]()
        for number, value in iter_fields(dial):
            if number == 1 and isinstance(value, bytes):
                for n2, v2 in iter_fields(value):
                    if n2 == 1 and isinstance(v2, bytes):
                        peer = v2
                    elif n2 == 2 and isinstance(v2, bytes) and len(addrs) < MAX_ADDRS:
                        addrs.append(v2)
        return DialRequest(peer, tuple(addrs))
    if kind == MsgType.DIAL_RESPONSE and resp is not None:
        status, text, addr = RespStatus.E_INTERNAL_ERROR.value, "", b""
        for number, value in iter_fields(resp):
            if number == 1:
                status = int_field(value, "autonat.status")
            elif number == 2 and isinstance(value, bytes):
                text = value.decode("utf-8", "replace")[:256]
            elif number == 3 and isinstance(value, bytes):
                addr = value
        return DialResponse(status, text, addr)
    raise ProtocolError("autonat message is neither a dial request nor a dial response")


def dial_back_addrs(observed: Multiaddr | None, requested: list[bytes]) -> list[Multiaddr]:
    """The addresses we may dial back: the requester's observed IP with each TCP port it claims.

    On the in-memory transport (tests) the observed address itself, if claimed.
    """
    if observed is None or not observed.parts:
        return []
    kind, ip = observed.parts[0]
    out: list[Multiaddr] = []
    for raw in requested:
        try:
            ma = Multiaddr.from_bytes(raw).without_p2p()
        except MultiaddrError:
            continue
        if kind == "memory":
            candidate = ma if ma == observed else None
        elif kind in ("ip4", "ip6") and is_tcp_addr(ma) and not ma.has("ws") and ma.parts[0][0] == kind:
            candidate = Multiaddr(((kind, ip), ("tcp", ma.value_for("tcp"))))
        else:
            candidate = None
        if candidate is not None and candidate not in out:
            out.append(candidate)
        if len(out) >= MAX_DIAL_ADDRS:
            break
    return out


def _public_ip(text: str) -> bool:
    try:
        return classify(ipaddress.ip_address(text))[0] == "public"
    except ValueError:
        return False


class AutoNat:
    """AutoNAT server and client for one host (see the module doc)."""

    def __init__(self, host: Host, nat: Nat | None = None) -> None:
        self.host = host
        self.nat = nat
        self._global: list[float] = []
        self._per_peer: dict[PeerId, list[float]] = {}
        self._per_peer_v2: dict[PeerId, list[float]] = {}
        self._busy: set[PeerId] = set()
        self.results: dict[PeerId, tuple[str, float]] = {}  # server -> ("public" | "private", when)
        self.refused: dict[str, int] = {}
        self.stats = {"dial_backs": 0, "dial_back_ok": 0}
        self.v2: AutoNatV2 | None = None
        self._log = logfmt.RateLimitedLog(log, host.config.refusal_log_interval)

    def summary(self) -> dict[str, object]:
        values = [r for r, _ in self.results.values()]
        out: dict[str, object] = {"public": values.count("public"), "private": values.count("private")}
        if self.v2 is not None:
            out["v2"] = dict(self.v2.stats, addrs=dict(self.v2.addr_results))
        return out

    # --- server --------------------------------------------------------------------------

    def _admit(self, peer: PeerId, now: float, *, v2: bool = False) -> str | None:
        """Within the global rate and the peer's (v1 and v2 each have their own per-peer budget)."""
        self._global = [t for t in self._global if t > now - 60]
        if len(self._global) >= GLOBAL_PER_MINUTE:
            return "global_rate"
        per_peer = self._per_peer_v2 if v2 else self._per_peer
        mine = [t for t in per_peer.get(peer, ()) if t > now - 60]
        if len(mine) >= PEER_PER_MINUTE or (not v2 and peer in self._busy):
            return "peer_rate"
        self._global.append(now)
        mine.append(now)
        per_peer[peer] = mine
        if len(per_peer) > 4 * GLOBAL_PER_MINUTE:
            for stale in [p for p, ts in per_peer.items() if ts[-1] <= now - 60]:
                del per_peer[stale]
        return None

    async def _respond(self, stream: MuxedStream, status: RespStatus, text: str = "", addr: bytes = b"") -> None:
        await write_answer(stream, DialResponse(status, text, addr).encode(), REQUEST_TIMEOUT)

    def _refuse(self, reason: str, peer: PeerId) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._log.info(reason, "autonat request refused", reason=reason, peer=peer.short())

    async def handle(self, stream: MuxedStream) -> None:
        peer = stream.remote_peer
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = decode(await read_message(stream, MAX_MESSAGE))
            if not isinstance(request, DialRequest):
                raise ProtocolError("expected a dial request")
        except trio.TooSlowError:
            self._refuse("request_timeout", peer)
            return
        except (ProtocolError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._refuse("bad_request", peer)
            await self._respond(stream, RespStatus.E_BAD_REQUEST, "malformed request")
            return
        if request.peer and request.peer != peer.raw:
            self._refuse("bad_request", peer)
            await self._respond(stream, RespStatus.E_BAD_REQUEST, "peer id is not the requester's")
            return
        conn = self.host.connection_of(stream)
        if conn is None or conn.relayed:
            self._refuse("relayed", peer)
            await self._respond(stream, RespStatus.E_DIAL_REFUSED, "no dial-back over a relayed connection")
            return
        why = self._admit(peer, trio.current_time())
        if why is not None:
            self._refuse(why, peer)
            await self._respond(stream, RespStatus.E_DIAL_REFUSED, "too many requests")
            return
        addrs = dial_back_addrs(conn.remote_addr, list(request.addrs))
        if not addrs:
            self._refuse("no_addrs", peer)
            await self._respond(stream, RespStatus.E_DIAL_REFUSED, "no address at the IP we see you at")
            return
        self._busy.add(peer)
        try:
            for addr in addrs:
                self.stats["dial_backs"] += 1
                try:
                    await self.host.probe(addr, peer, DIAL_TIMEOUT)
                except TransportError as exc:
                    log.debug("dial-back failed %s", logfmt.kv(peer=peer.short(), addr=addr, reason=exc))
                    continue
                self.stats["dial_back_ok"] += 1
                await self._respond(stream, RespStatus.OK, addr=addr.to_bytes())
                return
            await self._respond(stream, RespStatus.E_DIAL_ERROR, "dial-back failed")
        finally:
            self._busy.discard(peer)

    # --- client ----------------------------------------------------------------------------

    def own_addrs(self) -> list[Multiaddr]:
        return [a.without_p2p() for a in self.host.listen_addrs if not a.has("p2p-circuit")]

    def worth_asking(self) -> bool:
        """Any address a dial-back would tell something about: not loopback, not in-process."""
        for a in self.own_addrs():
            if a.has("memory"):
                continue
            if a.parts and a.parts[0][0] in ("ip4", "ip6") and (a.parts[0][1] or "") in ("127.0.0.1", "::1"):
                continue
            return True
        return False

    def v2_addrs(self, server: PeerId | None = None) -> list[Multiaddr]:
        """Our addresses worth testing one by one with v2: public direct TCP listen addresses, then the IP
        ``server`` sees us at with each TCP listen port (a NAT that keeps ports maps us there).

        Not private ones (the spec's rule: a server on the internet must not dial into private networks).
        """
        listen = [a for a in self.own_addrs() if is_tcp_addr(a) and not a.has("ws") and a.parts[0][0] in ("ip4", "ip6")]
        out = [a for a in listen if _public_ip(a.parts[0][1] or "")]
        info = self.host.peer_info(server) if server is not None else None
        observed = info.observed_addr if info is not None else None
        if observed is not None and observed.parts and observed.parts[0][0] in ("ip4", "ip6"):
            kind, ip = observed.parts[0]
            if _public_ip(ip or ""):
                for a in listen:
                    candidate = Multiaddr(((kind, ip), ("tcp", a.value_for("tcp"))))
                    if a.parts[0][0] == kind and candidate not in out:
                        out.append(candidate)
        return out[:MAX_DIAL_ADDRS]

    async def ask(self, server: PeerId) -> str | None:
        """Are we reachable, by ``server`` (v2 if it speaks it, else v1): ``"public"``, ``"private"`` or None."""
        info = self.host.peer_info(server)
        addrs = self.v2_addrs(server)
        if self.v2 is not None and info is not None and DIAL_REQUEST in info.protocols and addrs:
            answer = await self.v2.ask(server, addrs)
            if answer is None:
                return None
            self.results[server] = (answer[1], time.monotonic())
            return answer[1]
        return await self.ask_v1(server)

    async def ask_v1(self, server: PeerId) -> str | None:
        """Ask ``server`` to dial us back (v1): ``"public"``, ``"private"``, or None if it would not say."""
        request = DialRequest(self.host.peer_id.raw, tuple(a.to_bytes() for a in self.own_addrs()))
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                stream = await self.host.new_stream(server, PROTOCOL)
                async with stream:
                    await write_message(stream, request.encode())
                    answer = decode(await read_message(stream, MAX_MESSAGE))
        except (trio.TooSlowError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("autonat ask failed %s", logfmt.kv(server=server.short(), reason=exc or type(exc).__name__))
            return None
        if not isinstance(answer, DialResponse):
            return None
        result = {RespStatus.OK: "public", RespStatus.E_DIAL_ERROR: "private"}.get(answer.status)  # type: ignore[call-overload]
        if result is not None:
            self.results[server] = (result, time.monotonic())
        log.info("autonat answer %s", logfmt.kv(server=server.short(), result=result or answer.status))
        return result

    def verdict(self, servers: int) -> str | None:
        """Reachability from the answers so far, or None while unsure."""
        values = [r for r, _ in self.results.values()]
        if "public" in values:
            return "public"
        failures = values.count("private")
        if failures and failures >= min(CONFIDENCE, max(servers, 1)):
            return "private"
        return None

    def _servers(self) -> list[PeerId]:
        now = time.monotonic()
        out = []
        for peer in self.host.connected_peers():
            info = self.host.peer_info(peer)
            if info is None or not ({PROTOCOL, DIAL_REQUEST} & set(info.protocols)):
                continue
            if not any(c.usable and not c.relayed for c in self.host.connections(peer)):
                continue
            done = self.results.get(peer)
            if done is None or done[1] + RECHECK_AFTER < now:
                out.append(peer)
        return out

    async def run_client(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask new servers as they appear (one at a time) and set the NAT manager's reachability."""
        task_status.started()
        asked: set[PeerId] = set()
        while True:
            # Nothing to ask about: no address at all is private; loopback or in-process addresses
            # only (one machine, tests) leave it unknown rather than have peers dial back for nothing.
            if not self.host.listen_addrs:
                self._set("private")
            pending = [p for p in self._servers() if p not in asked] if self.worth_asking() else []
            for server in pending[:CONFIDENCE]:
                asked.add(server)
                await self.ask(server)
                servers = len(asked)
                verdict = self.verdict(servers)
                if verdict is not None:
                    self._set(verdict)
            with trio.move_on_after(RECHECK_AFTER) as scope:
                await self.host.wait_changed()
            if scope.cancelled_caught:
                asked.clear()

    def _set(self, value: str) -> None:
        if self.nat is not None:
            self.nat.set_reachability(value)


@contextlib.asynccontextmanager
async def open_autonat(host: Host, nat: Nat | None = None) -> AsyncIterator[AutoNat]:
    """Serve AutoNAT on ``host``; with ``--reachability auto``, also ask peers (the answer goes to ``nat``)."""
    autonat = AutoNat(host, nat)
    autonat.v2 = AutoNatV2(host, autonat)
    host.set_stream_handler(PROTOCOL, autonat.handle)
    host.set_stream_handler(DIAL_REQUEST, autonat.v2.handle_request)
    host.set_stream_handler(DIAL_BACK, autonat.v2.handle_dial_back)
    try:
        async with trio.open_nursery() as nursery:
            if nat is not None and host.config.reachability == "auto":
                await nursery.start(autonat.run_client)
            try:
                yield autonat
            finally:
                nursery.cancel_scope.cancel()
    finally:
        host.remove_stream_handler(PROTOCOL)
        host.remove_stream_handler(DIAL_REQUEST)
        host.remove_stream_handler(DIAL_BACK)
