"""TCP transport, with WebSocket served on the same port.

A node listens on one TCP port (43905 by default) for both raw libp2p
(``/ip4/x/tcp/P``) and libp2p over WebSocket (``/ip4/x/tcp/P/ws``), as OCF
does. We tell them apart by the first bytes a client sends: a WebSocket client
starts with an HTTP ``GET `` request, a raw libp2p dialer with the
multistream-select header (``\\x13/multistream/1.0.0\\n``). Both kinds of
clients speak first, so peeking never deadlocks.

An accepted socket takes a pending-handshake slot from the resource manager
before we read a byte (refused at once when its address or the node has
none left), and that slot's single deadline bounds everything up to the
end of the upgrade: sniffing, the WebSocket upgrade, multistream, Noise.
We run our own accept loop rather than ``trio.serve_listeners`` so that
running out of file descriptors is counted and logged once per interval,
not once per retry.

Transports hand the host a :class:`RawConn`: a Trio byte stream plus the
addresses of both ends (for identify's observed address and logs).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import attrs
import trio

from ..errors import MultiaddrError, PeerUnreachable, TransportError
from ..identity import Multiaddr
from .layered import LayeredStream
from .resources import HandshakeSlot, ResourceManager, ip_key

log = logging.getLogger("ocf.transport.tcp")

SNIFF_BYTES = 4
HTTP_PREFIX = b"GET "
# accept() errors that mean "out of descriptors or memory for now": wait and retry
ACCEPT_CAPACITY_ERRNOS = frozenset(
    e for e in (getattr(errno, name, None) for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")) if e is not None
)
ACCEPT_RETRY_SLEEP = 0.1


@attrs.frozen
class RawConn:
    """An unsecured byte stream to a peer, as a transport delivers it."""

    stream: trio.abc.Stream
    remote_addr: Multiaddr | None = None  # without /p2p
    local_addr: Multiaddr | None = None
    transport: str = "tcp"
    #: the pending-handshake slot taken at accept (the host releases it once upgraded)
    slot: HandshakeSlot | None = None


RawHandler = Callable[[RawConn], Awaitable[None]]


class PrefixedStream(LayeredStream):
    """A stream that first replays bytes already read from it (after sniffing)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        super().__init__(stream)
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.transport.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)


def tcp_stream_of(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The TCP stream under ``stream`` when bytes go to and come from it unchanged, else None.

    Lets the secure channel use the socket directly (:mod:`ocf.directsocket`).
    """
    if isinstance(stream, PrefixedStream):
        if stream._prefix:
            return None  # sniffed bytes still to replay: reads must go through it
        stream = stream.transport
    if isinstance(stream, trio.SocketStream):
        return stream
    return None


def is_tcp_addr(addr: Multiaddr) -> bool:
    """``/ip4|ip6|dns*/…/tcp/P`` optionally followed by ``/ws`` and ``/p2p/<id>``."""
    names = [n for n, _ in addr.parts if n != "p2p"]
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp":
        return False
    return names[2:] in ([], ["ws"])


def is_ws_addr(addr: Multiaddr) -> bool:
    return is_tcp_addr(addr) and addr.has("ws")


def sockaddr_to_multiaddr(sockaddr: Any, ws: bool = False) -> Multiaddr | None:
    """``('1.2.3.4', 5)`` -> ``/ip4/1.2.3.4/tcp/5`` (``None`` for anything else)."""
    try:
        host, port = sockaddr[0], int(sockaddr[1])
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    proto = "ip4" if ip.version == 4 else "ip6"
    parts: tuple[tuple[str, str | None], ...] = ((proto, str(ip)), ("tcp", str(port)))
    if ws:
        parts += (("ws", None),)
    return Multiaddr(parts)


def _stream_addrs(stream: trio.SocketStream, ws: bool = False) -> tuple[Multiaddr | None, Multiaddr | None]:
    try:
        remote = sockaddr_to_multiaddr(stream.socket.getpeername(), ws)
        local = sockaddr_to_multiaddr(stream.socket.getsockname(), ws)
    except OSError:
        return None, None
    return remote, local


class TcpTransport:
    """Dials ``/tcp`` (and ``/tcp/…/ws``) addresses and serves both on one port."""

    def __init__(
        self,
        *,
        ws: bool = True,
        handshake_timeout: float = 10.0,
        ws_max_message: int = 1 << 20,
        resources: ResourceManager | None = None,
        message_timeout: float = 30.0,
    ) -> None:
        self.ws = ws
        self.handshake_timeout = handshake_timeout
        self.ws_max_message = ws_max_message
        self.resources = resources if resources is not None else ResourceManager()
        self.message_timeout = message_timeout

    def can_dial(self, addr: Multiaddr) -> bool:
        return is_tcp_addr(addr)

    @contextlib.asynccontextmanager
    async def connect(self, addr: Multiaddr, timeout: float) -> AsyncIterator[RawConn]:  # noqa: ASYNC109 - dial only
        """Open a raw connection; :class:`PeerUnreachable` if it cannot be made within ``timeout``."""
        try:
            host, port = addr.host_port()
        except MultiaddrError as exc:
            raise PeerUnreachable(str(exc)) from None
        if is_ws_addr(addr):
            from .websocket import connect_websocket

            async with connect_websocket(
                host, port, timeout, self.ws_max_message, resources=self.resources, message_timeout=self.message_timeout
            ) as raw:
                yield raw
            return
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise PeerUnreachable(f"dial {addr} timed out after {timeout:g}s") from None
        except OSError as exc:
            raise PeerUnreachable(f"dial {addr} failed: {exc.strerror or exc}") from None
        remote, local = _stream_addrs(stream)
        async with stream:
            yield RawConn(stream, remote, local, "tcp")

    async def serve(
        self,
        host: str,
        port: int,
        handler: RawHandler,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and run ``handler(raw)`` for each connection in ``handler_nursery``.

        Reports the bound listen addresses (ports resolved, ``/ws`` variants
        included) through ``task_status.started``.
        """
        try:
            listeners = await trio.open_tcp_listeners(port, host=host if host not in ("", "*") else None)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TransportError(f"cannot listen on {host}:{port} (--tcpport): address already in use") from None
            raise
        addrs: list[Multiaddr] = []
        for listener in listeners:
            sockname = listener.socket.getsockname()
            for expanded in _expand_wildcard(sockname):
                for ws in (False, True) if self.ws else (False,):
                    ma = sockaddr_to_multiaddr(expanded, ws)
                    if ma is not None and ma not in addrs:
                        addrs.append(ma)

        task_status.started(addrs)
        async with trio.open_nursery() as accept_nursery:
            for listener in listeners:
                accept_nursery.start_soon(self._accept_loop, listener, handler, handler_nursery)

    async def _accept_loop(
        self, listener: trio.SocketListener, handler: RawHandler, handler_nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self.resources.note_refusal(
                        "system",
                        "accept_error",
                        "accept failed; retrying",
                        error=errno.errorcode.get(exc.errno or 0, exc.errno),
                    )
                    await trio.sleep(ACCEPT_RETRY_SLEEP)
                    continue
                handler_nursery.start_soon(self._on_accept_guarded, stream, handler)

    async def _on_accept_guarded(self, stream: trio.SocketStream, handler: RawHandler) -> None:
        async with stream:
            try:
                await self._on_accept(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the listener
                log.error("accepted connection crashed exc=%r", exc, exc_info=True)

    async def _on_accept(self, stream: trio.SocketStream, handler: RawHandler) -> None:
        remote, local = _stream_addrs(stream)
        ip = ip_key(remote)
        slot = self.resources.handshake(ip, self.handshake_timeout)
        if slot is None:
            # no slot for this address or the node: hang up before reading a byte
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.CancelScope() as scope:
                slot.cancel_scope = scope  # eviction (see ResourceManager._evict_for) cancels it
                prefix = b""
                with trio.move_on_at(slot.deadline):
                    try:
                        while len(prefix) < SNIFF_BYTES:
                            chunk = await stream.receive_some()
                            if not chunk:
                                break
                            prefix += chunk
                    except trio.BrokenResourceError:
                        return
                if len(prefix) < SNIFF_BYTES:
                    if prefix:
                        self.resources.note_refusal(
                            "transient", "handshake_timeout", "inbound connection sent too little", remote=remote
                        )
                    return
                if prefix[: len(HTTP_PREFIX)] == HTTP_PREFIX:
                    if not self.ws:
                        log.debug("refusing WebSocket connection (disabled) remote=%s", remote)
                        return
                    from .websocket import serve_websocket_stream

                    await serve_websocket_stream(
                        PrefixedStream(stream, prefix),
                        handler,
                        remote=_with_ws(remote),
                        local=_with_ws(local),
                        slot=slot,
                        max_message=self.ws_max_message,
                        resources=self.resources,
                        message_timeout=self.message_timeout,
                    )
                    return
                await handler(RawConn(PrefixedStream(stream, prefix), remote, local, "tcp", slot))
        finally:
            slot.release()


def _with_ws(addr: Multiaddr | None) -> Multiaddr | None:
    return None if addr is None else Multiaddr(addr.parts + (("ws", None),))


def _expand_wildcard(sockname: Sequence[Any]) -> list[tuple[str, int]]:
    """A listener on 0.0.0.0 / :: is reachable at loopback and at the host's own addresses."""
    host, port = sockname[0], int(sockname[1])
    if host not in ("0.0.0.0", "::"):
        return [(host, port)]
    out = [("127.0.0.1", port)] if host == "0.0.0.0" else [("::1", port)]
    for ip in local_ips(ipv6=host == "::"):
        if (ip, port) not in out:
            out.append((ip, port))
    return out


def local_ips(ipv6: bool = False) -> list[str]:
    """The host's non-loopback addresses, best effort and without sending anything.

    A UDP ``connect`` only selects a route; no packet leaves the machine.
    """
    ips: list[str] = []
    family, probe = (socket.AF_INET6, "2001:db8::1") if ipv6 else (socket.AF_INET, "192.0.2.1")
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((probe, 9))
        ip = s.getsockname()[0]
        if not ipaddress.ip_address(ip).is_loopback:
            ips.append(ip)
    return ips
