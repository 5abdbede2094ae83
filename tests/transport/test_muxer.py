"""The Trio yamux driver over in-memory byte streams (no security layer needed)."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
import trio.testing

from ocf.errors import StreamReset, TransportError
from ocf.identity import Identity
from ocf.transport import yamux
from ocf.transport.muxer import MuxedConnection, MuxedStream

PEER_A = Identity.from_seed("a").peer_id
PEER_B = Identity.from_seed("b").peer_id


async def echo(stream: MuxedStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def echoed(stream, payload: bytes) -> bytes:
    """Send ``payload`` and end the stream while reading everything the echo sends back."""

    async def sender() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    got = bytearray()
    async with trio.open_nursery() as n:
        n.start_soon(sender)
        while chunk := await stream.receive_some():
            got += chunk
    return bytes(got)


@contextlib.asynccontextmanager
async def pair(server_handler=echo, client_handler=None, **kw):
    """A connected (client, server) pair of MuxedConnections over a memory stream pair."""
    a, b = trio.testing.memory_stream_pair()
    client = MuxedConnection(a, is_client=True, remote_peer=PEER_B, handler=client_handler, **kw)
    server = MuxedConnection(b, is_client=False, remote_peer=PEER_A, handler=server_handler, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        yield client, server
        nursery.cancel_scope.cancel()


async def recv_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


async def test_echo_and_eof():
    async with pair() as (client, _):
        s = await client.open_stream()
        await s.send_all(b"hello")
        assert await recv_exactly(s, 5) == b"hello"
        await s.send_eof()
        assert await s.receive_some() == b""
        await s.aclose()


async def test_many_concurrent_streams_carry_their_own_data():
    async with pair() as (client, _):
        results = {}

        async def one(i: int) -> None:
            s = await client.open_stream()
            payload = os.urandom(1000 + i * 37)
            results[i] = await echoed(s, payload) == payload
            await s.aclose()

        async with trio.open_nursery() as n:
            for i in range(100):
                n.start_soon(one, i)
        assert len(results) == 100 and all(results.values())
        assert client.num_streams == 0


async def test_large_transfer_beyond_window():
    size = 5 * yamux.INITIAL_WINDOW + 123
    payload = os.urandom(size)
    async with pair() as (client, _):
        s = await client.open_stream()
        assert await echoed(s, payload) == payload


async def test_slow_reader_blocks_sender_and_bounds_memory():
    accepted: list[MuxedStream] = []
    got_stream = trio.Event()

    async def hold(stream: MuxedStream) -> None:
        accepted.append(stream)
        got_stream.set()
        await trio.sleep_forever()

    async with pair(server_handler=hold) as (client, server):
        s = await client.open_stream()
        sent = 0
        chunk = b"x" * 65536

        async def sender():
            nonlocal sent
            while True:
                await s.send_all(chunk)
                sent += len(chunk)

        # The sender gets one window's worth through, then blocks until the reader reads.
        async with trio.open_nursery() as n:
            n.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            n.cancel_scope.cancel()
        await got_stream.wait()
        (remote,) = accepted
        buffered = sum(len(c) for c in remote._chunks or ())
        assert buffered <= yamux.INITIAL_WINDOW
        assert sent <= yamux.INITIAL_WINDOW + len(chunk)
        # Reading unblocks the sender.
        assert len(await remote.receive_some()) > 0
        assert client._session.pending_output == 0


async def test_reset_reaches_peer_and_frees_stream():
    accepted: list[MuxedStream] = []
    errors: list[BaseException] = []

    async def reader(stream: MuxedStream) -> None:
        accepted.append(stream)
        try:
            while await stream.receive_some():
                pass
        except StreamReset as exc:
            errors.append(exc)

    async with pair(server_handler=reader) as (client, server):
        s = await client.open_stream()
        await s.send_all(b"data")
        while not accepted:
            await trio.testing.wait_all_tasks_blocked()
        s.reset()
        with pytest.raises(StreamReset):
            await s.send_all(b"more")
        with pytest.raises(StreamReset):
            await s.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 1
        assert client.num_streams == 0 and server.num_streams == 0


async def test_handler_exception_resets_only_that_stream():
    async def picky(stream: MuxedStream) -> None:
        if await stream.receive_some() == b"boom":
            raise RuntimeError("handler bug")
        await echo_rest(stream)

    async def echo_rest(stream):
        await stream.send_all(b"ok")
        await stream.send_eof()

    async with pair(server_handler=picky) as (client, _):
        bad = await client.open_stream()
        await bad.send_all(b"boom")
        with pytest.raises(StreamReset):
            await bad.receive_some()
        good = await client.open_stream()
        await good.send_all(b"hi")
        assert await recv_exactly(good, 2) == b"ok"


async def test_connection_loss_resets_streams():
    async with pair() as (client, server):
        s = await client.open_stream()
        await s.send_all(b"x")
        assert await recv_exactly(s, 1) == b"x"
        server.close_soon("test")
        with pytest.raises(StreamReset):
            while True:
                await s.receive_some()
        await client.closed.wait()
        with pytest.raises(TransportError):
            await client.open_stream()


async def test_ping_measures_rtt():
    async with pair() as (client, server):
        rtt = await client.ping()
        assert rtt >= 0
        assert client.rtt is not None


async def test_keepalive_timeout_closes_dead_peer(autojump_clock):
    # The server never reads: the client's keepalive pings go unanswered.
    a, b = trio.testing.memory_stream_pair()
    client = MuxedConnection(a, is_client=True, remote_peer=PEER_B, keepalive_interval=5, keepalive_timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.closed.wait()
    assert "keepalive" in client.close_reason


async def test_stream_limit_refuses_extra_streams():
    async with pair(max_streams=2) as (client, server):
        s1 = await client.open_stream()
        s2 = await client.open_stream()
        with pytest.raises(TransportError, match="limit"):
            await client.open_stream()
        await s1.send_all(b"a")
        assert await recv_exactly(s1, 1) == b"a"
        await s2.aclose()


async def test_inbound_over_limit_is_reset():
    # client allows many streams, server only 1: the 2nd SYN is refused with RST
    a, b = trio.testing.memory_stream_pair()
    client = MuxedConnection(a, is_client=True, remote_peer=PEER_B)

    async def hold(stream):
        await trio.sleep_forever()

    server = MuxedConnection(b, is_client=False, remote_peer=PEER_A, handler=hold, max_streams=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        s1 = await client.open_stream()
        await s1.send_all(b"x")
        s2 = await client.open_stream()
        with pytest.raises(StreamReset):
            await s2.receive_some()
        assert server.num_streams == 1
        nursery.cancel_scope.cancel()


async def test_garbage_from_peer_closes_connection_with_reason():
    a, b = trio.testing.memory_stream_pair()
    client = MuxedConnection(a, is_client=True, remote_peer=PEER_B)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await b.send_all(b"\x07" * 12)  # version 7
        await client.closed.wait()
    assert "protocol error" in client.close_reason


async def test_aclose_with_unread_data_resets_peer_writer():
    async def flood(stream: MuxedStream) -> None:
        with contextlib.suppress(StreamReset):
            while True:
                await stream.send_all(b"y" * 1000)

    async with pair(server_handler=flood) as (client, server):
        s = await client.open_stream()
        await s.send_all(b"go")
        assert await s.receive_some(10)
        await s.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await s.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert server.num_streams == 0


async def test_graceful_close_sends_go_away():
    async with pair() as (client, server):
        s = await client.open_stream()
        await s.send_all(b"x")
        await recv_exactly(s, 1)
        await client.aclose()
        await server.closed.wait()
        assert client.closed.is_set()


async def test_blocked_senders_are_not_stranded_when_one_is_cancelled(monkeypatch):
    """Many senders wait for the write queue; cancelling some never leaves the others parked forever."""
    from ocf.transport import muxer

    monkeypatch.setattr(muxer, "WRITE_HIGH_WATER", 1000)
    monkeypatch.setattr(muxer, "SEND_CHUNK", 600)
    got = {}

    async def sink(stream):
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
        got[stream.stream_id] = len(data)

    async with pair(server_handler=sink) as (client, _):
        streams = [await client.open_stream() for _ in range(8)]

        async def send(s, cancel_scope=None):
            await s.send_all(b"z" * 5000)
            await s.send_eof()

        async with trio.open_nursery() as n:
            doomed = trio.CancelScope()

            async def doomed_sender(s):
                with doomed:
                    await s.send_all(b"z" * 50000)

            n.start_soon(doomed_sender, streams[0])
            for s in streams[1:]:
                n.start_soon(send, s)
            await trio.testing.wait_all_tasks_blocked()
            doomed.cancel()
        while len(got) < 7:
            await trio.testing.wait_all_tasks_blocked()
        assert sorted(got.values()) == [5000] * 7


async def test_unread_does_not_credit_twice():
    async with pair() as (client, _):
        s = await client.open_stream()
        await s.send_all(b"abcdef")
        got = await recv_exactly(s, 6)
        s.unread(got[3:])
        assert await s.receive_some() == b"def"
        # window accounting stayed consistent (no negative buffered bytes)
        await s.send_all(b"x" * 1000)
        assert await recv_exactly(s, 1000) == b"x" * 1000
