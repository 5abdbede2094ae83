"""Trio drivers of the bridge: an ASGI app served over one stream, exchanges, the TCP pool."""

from __future__ import annotations

import functools
import json

import pytest
import trio
import trio.testing

from ocf.errors import UpstreamError
from ocf.httpstream.bridge import ClientBridge
from ocf.httpstream.client import exchange
from ocf.httpstream.pool import ConnectionPool
from ocf.httpstream.server import serve_stream
import trio.lowlevel


async def echo_app(scope, receive, send):
    """Streams the request body back chunk by chunk, as it arrives (full duplex)."""
    assert scope["type"] == "http"
    if scope["path"] == "/early":
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})
        return
    if scope["path"] == "/crash":
        raise RuntimeError("app bug")
    if scope["path"] == "/silent":
        return
    if scope["path"] == "/wait-disconnect":
        while (await receive())["type"] != "http.disconnect":
            pass
        scope["extensions"]["seen"].set()
        return
    headers = [
        (b"x-path", scope["path"].encode()),
        (b"x-client", scope["client"][0].encode() if scope["client"] else b"-"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if message.get("body"):
            await send({"type": "http.response.body", "body": message["body"], "more_body": True})
        if not message.get("more_body"):
            break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_full_duplex_echo_streams_each_chunk_before_the_next_is_sent():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, echo_app, client=("peerA", 0)))
        send_next, next_chunk = trio.open_memory_channel(0)

        async def body():
            async for chunk in next_chunk:
                yield chunk

        async with exchange(client_stream, b"POST", b"/echo/%C3%A9", [], body()) as response:
            assert response.status == 200
            assert response.header(b"x-path") == "/echo/é".encode()
            assert response.header(b"x-client") == b"peerA"
            chunks = response.__aiter__()
            for piece in [b"first", "ünïcode ✓".encode(), b"x" * 70_000]:
                await send_next.send(piece)
                got = b""
                while len(got) < len(piece):
                    got += await chunks.__anext__()
                assert got == piece  # echoed before we sent the next one: nothing waits for the whole body
            await send_next.aclose()
            with pytest.raises(StopAsyncIteration):
                await chunks.__anext__()
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_on_one_stream():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, echo_app))
        bridge = ClientBridge()
        for i in range(3):
            async with exchange(
                client_stream, b"POST", f"/r{i}".encode(), [], f"body{i}".encode(), bridge=bridge
            ) as response:
                assert await response.read() == f"body{i}".encode()
            assert bridge.reusable
            bridge.next_cycle()
        await client_stream.aclose()  # the server returns when the client closes between requests


async def test_idle_timeout_counts_from_the_end_of_the_last_request(autojump_clock):
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ended = trio.Event()

    async def serve():
        await serve_stream(server_stream, echo_app, idle_timeout=10)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await trio.sleep(8)  # idle, but not for long enough
        async with exchange(client_stream, b"POST", b"/r", [], b"x") as response:
            assert await response.read() == b"x"
        finished = trio.current_time()
        await ended.wait()
        assert 10 <= trio.current_time() - finished < 11  # the request restarted the idle timer


async def test_server_answering_early_does_not_wait_for_the_body():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, echo_app))

        async def endless():
            while True:
                yield b"x" * 1024
                await trio.lowlevel.checkpoint()

        async with exchange(client_stream, b"POST", b"/early", [], endless()) as response:
            assert response.status == 413
            assert await response.read() == b"no"
        nursery.cancel_scope.cancel()


async def _serve_then_close(stream, app):
    await serve_stream(stream, app)
    await stream.aclose()  # as the transport host does when a stream handler returns


async def _raw_roundtrip(raw: bytes, app=echo_app) -> bytes:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_then_close, server_stream, app)
        await client_stream.send_all(raw)
        out = b""
        with trio.fail_after(5):
            while True:
                data = await client_stream.receive_some()
                if not data:
                    break
                out += data
        nursery.cancel_scope.cancel()
    return out


async def test_malformed_request_gets_a_json_400_and_the_stream_ends():
    out = await _raw_roundtrip(b"NONSENSE\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "bad_request"


async def test_app_crash_is_a_500_and_silence_is_a_500():
    for path in (b"/crash", b"/silent"):
        out = await _raw_roundtrip(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500"), out
        assert json.loads(out.partition(b"\r\n\r\n")[2])["error"]["type"] == "server_error"


async def test_client_that_goes_away_is_a_disconnect_for_the_app():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    seen = trio.Event()

    async def app(scope, receive, send):
        scope["extensions"]["seen"] = seen
        await echo_app(scope, receive, send)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, app))
        await client_stream.send_all(b"GET /wait-disconnect HTTP/1.1\r\nHost: x\r\n\r\n")
        await client_stream.aclose()
        with trio.fail_after(5):
            await seen.wait()
        nursery.cancel_scope.cancel()


async def test_exchange_reports_upstream_failure_before_and_after_the_head():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server():
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_stream.receive_some()
        await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with pytest.raises(UpstreamError) as info:
            async with exchange(client_stream, b"GET", b"/", [], b""):
                pass
        assert not info.value.response_started

    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def half_server():
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_stream.receive_some()
        await server_stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(half_server)
        with pytest.raises(UpstreamError) as info:
            async with exchange(client_stream, b"GET", b"/", [], b"") as response:
                await response.read()
        assert info.value.response_started


async def test_body_source_errors_propagate_plainly():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    class Boom(Exception):
        pass

    async def body():
        yield b"abc"
        raise Boom()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_stream(server_stream, echo_app))
        with pytest.raises(Boom):
            async with exchange(client_stream, b"POST", b"/", [], body()) as response:
                await response.read()
        nursery.cancel_scope.cancel()


async def _tcp_echo_server(nursery, *, close_after_response=False):
    """A tiny keep-alive HTTP server over real TCP, serving echo_app via serve_stream."""
    connections = []

    async def handler(stream):
        connections.append(stream)
        await serve_stream(stream, echo_app)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], connections


async def test_pool_reuses_keep_alive_connections_and_drops_closed_ones():
    async with trio.open_nursery() as nursery:
        port, connections = await _tcp_echo_server(nursery)
        pool = ConnectionPool()
        for _ in range(3):
            async with (
                pool.connection("127.0.0.1", port) as conn,
                exchange(conn.stream, b"POST", b"/", [], b"hi", bridge=conn.bridge, host=b"x") as response,
            ):
                assert await response.read() == b"hi"
        assert len(connections) == 1  # one TCP connection carried all three
        # the server closes its side: the idle connection must not be reused
        await connections[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        async with pool.connection("127.0.0.1", port) as conn:
            assert not conn.reused
            async with exchange(conn.stream, b"GET", b"/", [], b"", bridge=conn.bridge) as response:
                await response.read()
        assert len(connections) == 2
        pool.close()
        nursery.cancel_scope.cancel()


async def test_pool_connect_refused_is_an_oserror():
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        await ConnectionPool().connect("127.0.0.1", port)
