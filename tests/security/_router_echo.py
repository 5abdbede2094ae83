"""A backend that answers every request with the headers it received (to see what a provider is sent)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator

import h11
import trio


async def _serve_connection(stream: trio.SocketStream, seen: list[dict]) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            record = {
                "target": request.target.decode(),
                "headers": {k.decode().lower(): v.decode() for k, v in request.headers},
            }
            seen.append(record)
            payload = json.dumps(record).encode()
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
                    )
                )
                + conn.send(h11.Data(data=payload))
                + conn.send(h11.EndOfMessage())
            )
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[tuple[int, list[dict]]]:
    """``(port, seen)``: every request the backend got, with its headers, in order."""
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, lambda s: _serve_connection(s, seen), 0, host="127.0.0.1")
        )
        try:
            yield listeners[0].socket.getsockname()[1], seen
        finally:
            nursery.cancel_scope.cancel()
