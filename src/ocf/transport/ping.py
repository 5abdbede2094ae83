"""``/ipfs/ping/1.0.0``: 32 random bytes, echoed back, as many times as the dialer likes.

The libp2p ping protocol: the dialer writes 32 bytes, the listener writes the
same 32 bytes back, repeat on the same stream until the dialer closes it. The
RTT covers one exchange only (stream opening and negotiation excluded), so
repeated pings over one stream measure the connection, not the setup.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError, StreamReset
from ..identity import PeerId

if TYPE_CHECKING:
    from .host import Host
    from .muxer import MuxedStream

PROTOCOL = "/ipfs/ping/1.0.0"
PING_SIZE = 32


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Read exactly ``n`` bytes; ``EOFError`` if the stream ends first."""
    first = await stream.receive_some(n)
    if len(first) == n:
        return bytes(first)  # the usual case: all of it in one piece (bytes(b) is b, no copy)
    buf = bytearray(first)
    if not first:
        raise EOFError(f"stream ended after 0 of {n} bytes")
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def handle_ping(stream: MuxedStream) -> None:
    """Echo 32-byte pings until the dialer closes the stream."""
    while True:
        try:
            payload = await receive_exactly(stream, PING_SIZE)
        except EOFError:
            return
        await stream.send_all(payload)


async def ping_once(stream: trio.abc.Stream) -> float:
    """One ping over an open ping stream; returns the RTT in seconds."""
    payload = os.urandom(PING_SIZE)
    t0 = trio.current_time()
    await stream.send_all(payload)
    try:
        echoed = await receive_exactly(stream, PING_SIZE)
    except EOFError:
        raise StreamReset("peer closed the ping stream") from None
    rtt = trio.current_time() - t0
    if echoed != payload:
        raise ProtocolError("ping answer does not match what we sent")
    return rtt


async def ping_peer(host: Host, peer: PeerId) -> float:
    """RTT of one ping to ``peer`` (dialing it if needed)."""
    stream = await host.new_stream(peer, PROTOCOL)
    async with stream:
        return await ping_once(stream)


async def open_ping_stream(host: Host, peer: PeerId) -> MuxedStream:
    """A ping stream for repeated :func:`ping_once` calls (close it when done)."""
    return await host.new_stream(peer, PROTOCOL)


def register(host: Host) -> None:
    host.set_stream_handler(PROTOCOL, handle_ping)
