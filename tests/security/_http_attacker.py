"""Helpers for the HTTP edge's security tests: a test server, raw sockets, and reading what comes back."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator

import trio

from ocf.httpstream.admission import ConnectionLimits
from ocf.httpstream.deadlines import Timeouts
from ocf.httpstream.listener import serve_http


class EdgeApp:
    """An ASGI app with a health route, a route that holds, one that reads its body, one that sends a lot."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.holding = 0
        self.cancelled = 0
        self.bodies: list[int] = []
        self.delay_body = 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        try:
            if path == "/hold":
                self.holding += 1
                await self.release.wait()
            elif path == "/upload":
                await trio.sleep(self.delay_body)
                size = 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    size += len(message.get("body", b""))
                    if not message.get("more_body"):
                        break
                self.bodies.append(size)
            elif path == "/flood":  # far more than socket buffers hold, for a client that never reads
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", str(64 << 20).encode())],
                    }
                )
                for _ in range(64):
                    await send({"type": "http.response.body", "body": b"x" * (1 << 20), "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
        except trio.Cancelled:
            self.cancelled += 1
            raise
        body = json.dumps({"status": "ok", "path": path}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def edge_server(
    app, *, timeouts: Timeouts | None = None, limits: ConnectionLimits | None = None, **kw
) -> AsyncIterator[tuple[str, int]]:
    """serve_http on 127.0.0.1 with ``app``; yields (host, port)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(
                serve_http,
                app,
                "127.0.0.1",
                0,
                shutdown_trigger=stop.wait,
                timeouts=timeouts,
                limits=limits,
                graceful_timeout=0.1,
                **kw,
            )
        )
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        try:
            yield host, int(port)
        finally:
            stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + 5


async def connect(addr: tuple[str, int], data: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*addr)
    if data:
        await stream.send_all(data)
    return stream


async def read_until_close(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close); fails after 10 s."""
    out = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the server
                return out
            if not chunk:
                return out
            out += chunk


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def get(path: str, host: bytes = b"t", *, close: bool = False) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: %b\r\n%b\r\n" % (path.encode(), host, b"Connection: close\r\n" if close else b"")
