"""Hostile dial targets for the dial-policy and dial-failure tests: ports that answer badly, counting visitors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import attrs
import trio

from ocf.identity import Identity, Multiaddr

#: What a target answers once the dialer has spoken: the bytes, "close" (hang up), "silent" (never answer).
ANSWERS: dict[str, bytes | str] = {
    "ws-404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
    "garbage": b"\x00\x01garbage\r\n\r\n",
    "bad-upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: nope\r\n\r\n"
    ),
    "huge-header": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200_000 + b"\r\n\r\n",
    "multistream-only": b"\x13/multistream/1.0.0\n",
    "close": "close",
}

#: A peer ID nobody runs: learned addresses are filed under it.
STRANGER = Identity.from_seed("dial-stranger").peer_id


@attrs.define
class Target:
    port: int
    connections: int = 0

    def addr(self, *, ws: bool = False, host: str = "127.0.0.1") -> Multiaddr:
        proto = "ip6" if ":" in host else "ip4"
        return Multiaddr.parse(f"/{proto}/{host}/tcp/{self.port}" + ("/ws" if ws else ""))


@contextlib.asynccontextmanager
async def hostile_target(answer: bytes | str = "close", host: str = "127.0.0.1") -> AsyncIterator[Target]:
    """A TCP port on ``host`` that reads what the dialer sends, answers ``answer`` and hangs up."""
    target = Target(0)

    async def handler(stream: trio.SocketStream) -> None:
        target.connections += 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(5):
                await stream.receive_some(65536)
                if answer == "silent":
                    await trio.sleep_forever()
                if isinstance(answer, bytes):
                    await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
        target.port = listeners[0].socket.getsockname()[1]
        yield target
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def closed_port() -> AsyncIterator[int]:
    """A loopback port nothing listens on (bound, never listening, so nobody else takes it meanwhile)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
