"""A hostile peer built on ocf's own transport code, for the transport budget tests.

Each helper reproduces one class of attack against a listening node on
loopback. Attacks come from a source address of their own (``127.0.0.2``
and up: all of 127/8 is loopback on Linux) so that per-address budgets can
be told apart from the legitimate peer's on ``127.0.0.1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage
from wsproto.utilities import LocalProtocolError

from ocf.identity import Identity, PeerId
from ocf.transport import multistream
from ocf.transport.upgrade import NOISE, Libp2pUpgrader
from ocf.transport.websocket import WebSocketStream

ATTACKER_IP = "127.0.0.2"
MS_HELLO = multistream.encode(multistream.HEADER) + multistream.encode(NOISE)


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def half_handshake(port: int, source_ip: str = ATTACKER_IP) -> trio.SocketStream | None:
    """A socket that says ``/multistream/1.0.0`` + ``/noise`` and then nothing; None if refused at once."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source_ip)
        await stream.send_all(MS_HELLO)
    except OSError:
        return None
    return stream


async def squat_handshakes(
    port: int, sockets: int, *, source_ip: str = ATTACKER_IP, stop: trio.Event, counts: dict[str, int]
) -> None:
    """Keep ``sockets`` half-open handshakes up, reopening each as soon as the node drops it, until ``stop``."""

    async def one() -> None:
        while not stop.is_set():
            stream = await half_handshake(port, source_ip)
            if stream is None:
                await trio.sleep(0.01)
                continue
            counts["opened"] = counts.get("opened", 0) + 1
            async with stream:
                with trio.move_on_after(60):
                    try:
                        while await stream.receive_some():
                            pass  # the node's multistream answer; we never go on
                    except trio.BrokenResourceError:
                        pass
            counts["dropped"] = counts.get("dropped", 0) + 1

    async with trio.open_nursery() as nursery:
        for _ in range(sockets):
            nursery.start_soon(one)
        await stop.wait()
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def upgraded_websocket(
    port: int, identity: Identity, *, source_ip: str = ATTACKER_IP
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, PeerId]]:
    """A WebSocket connection that completes the libp2p upgrade (so the node counts it as a peer) and no more.

    Yields the trio-websocket connection, so the caller can send WebSocket
    frames below the Noise layer (e.g. a message it never finishes).
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source_ip)
    async with trio.open_nursery() as nursery:
        ws = trio_websocket.WebSocketConnection(
            tcp, WSConnection(ConnectionType.CLIENT), host=f"127.0.0.1:{port}", path="/"
        )
        nursery.start_soon(ws._reader_task)
        with trio.fail_after(10):
            await _opened_or_closed(ws)
            if ws.closed is not None:
                raise trio.BrokenResourceError(f"refused: {ws.closed}")
            _, remote = await Libp2pUpgrader(identity).secure(WebSocketStream(ws), initiator=True, expected=None)
        try:
            yield ws, remote
        finally:
            await trio.aclose_forcefully(tcp)
            nursery.cancel_scope.cancel()


async def _opened_or_closed(ws: trio_websocket.WebSocketConnection) -> None:
    """Wait for the WebSocket upgrade to finish, or for the node to hang up instead."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, ws._open_handshake)
        nursery.start_soon(wait, ws._close_handshake)


async def send_unfinished_message(ws: trio_websocket.WebSocketConnection, total: int, fragment: int = 64 * 1024) -> int:
    """Send up to ``total`` bytes of one binary WebSocket message without its final frame; returns bytes sent."""
    chunk = os.urandom(fragment)
    sent = 0
    try:
        while sent + fragment <= total:
            async with ws._stream_lock:  # the reader task may be answering a close meanwhile
                await ws._stream.send_all(ws._wsproto.send(BytesMessage(data=chunk, message_finished=False)))
            sent += fragment
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, LocalProtocolError):
        pass  # the node hung up: what it did with the rest is the test's question
    return sent
