#!/usr/bin/env python
"""The least an HTTP hop can cost: a relay with no gateway features, as a floor for ``gateway.py``.

    python benchmarks/floor_relay.py --port 9001 --upstream 8080 --engine trio

Listens on ``--port`` and relays each client connection to
``127.0.0.1:--upstream`` over a keep-alive connection of its own, in one of
two ways:

* ``--engine os``: the bytes as they come, blocking I/O on one thread
  (``selectors``). No HTTP at all: what the operating system charges for a
  process hop on this machine.
* ``--engine trio``: what any Trio-native HTTP proxy must do at the least,
  with the same pieces ocf's gateway uses (Trio, :mod:`ocf.directsocket`,
  the sans-IO codec of :mod:`ocf.httpstream.bridge`): parse the request,
  frame it again for the upstream, parse the response, frame it again for
  the client, one request at a time per connection. No encryption, routing,
  limits, timeouts, metrics, error answers or streaming: a request and its
  response are read whole.

``gateway.py`` puts two of each in front of the mock LLM, as its two
gateway hops are, and reports what they add next to what ocf's hops add.
Not a product: a measuring stick.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import selectors
import socket
import sys


def relay_os(port: int, upstream: int) -> None:
    """Copy bytes both ways between each client and its own upstream connection."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            sock, peer = key.fileobj, key.data
            if peer is None:
                client, _ = sock.accept()
                try:
                    up = socket.create_connection(("127.0.0.1", upstream))
                except OSError:  # upstream not there (yet): drop this client, keep serving
                    client.close()
                    continue
                for s in (client, up):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(client, selectors.EVENT_READ, up)
                sel.register(up, selectors.EVENT_READ, client)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (sock, peer):
                    sel.unregister(s)
                    s.close()
                continue
            peer.sendall(data)


async def serve_trio(upstream_port: int, stream) -> None:  # type: ignore[no-untyped-def]
    """Relay one client connection (a ``trio.SocketStream``) to ``upstream_port``, one message at a time."""
    import trio

    from ocf.directsocket import DirectSocketStream
    from ocf.httpstream.bridge import END, ClientBridge, Data, RequestHead, ResponseHead, ServerBridge, forwardable

    client = DirectSocketStream(stream)
    try:
        up = DirectSocketStream(await trio.open_tcp_stream("127.0.0.1", upstream_port))
    except OSError:  # upstream not there (yet): drop this client, keep serving
        await client.aclose()
        return
    server, upstream = ServerBridge(), ClientBridge()
    pending: list = []  # parsed events not handled yet (a pipelined request's)
    try:
        while True:
            head, body = None, []
            while True:
                if not pending:
                    data = await client.receive_some()
                    if not data:
                        return
                    pending = server.feed(data)
                event = pending.pop(0)
                if type(event) is RequestHead:
                    head = event
                elif type(event) is Data:
                    body.append(event.data)
                elif event is END:
                    break
            assert head is not None
            content = b"".join(body)
            request = upstream.request(
                head.method, head.target, forwardable(head.headers), content_length=len(content), host=b"upstream"
            )
            await up.send_all(request + upstream.data(content) + upstream.end())
            response, answer, done = None, [], False
            while not done:
                for event in upstream.feed(await up.receive_some()):
                    if type(event) is ResponseHead:
                        response = event
                    elif type(event) is Data:
                        answer.append(event.data)
                    elif event is END:
                        done = True
            upstream.next_cycle()
            assert response is not None
            content = b"".join(answer)
            await client.send_all(
                server.respond(response.status, forwardable(response.headers)) + server.data(content) + server.end()
            )
            if not server.next_cycle():
                return
            pending += server.events()
    finally:
        await up.aclose()


def relay_trio(port: int, upstream: int) -> None:
    import trio

    trio.run(functools.partial(trio.serve_tcp, functools.partial(serve_trio, upstream), port, host="127.0.0.1"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream", type=int, required=True, help="port of the HTTP server to relay to (127.0.0.1)")
    parser.add_argument(
        "--engine",
        choices=("os", "trio"),
        default="trio",
        help="os: bytes as they come, blocking I/O; trio: parse and re-frame HTTP/1.1 with ocf's codec (default)",
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        (relay_os if args.engine == "os" else relay_trio)(args.port, args.upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
