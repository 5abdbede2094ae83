"""DirectSocketStream: system calls straight on the descriptor, waits only when the kernel says so."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ocf.directsocket import YIELD_AFTER, DirectSocketStream


async def tcp_pair() -> tuple[DirectSocketStream, trio.SocketStream, trio.SocketListener]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    return DirectSocketStream(client), server, listeners[0]


async def test_round_trip_eof_and_closed():
    ours, theirs, listener = await tcp_pair()
    await ours.send_all(b"hello")
    assert await theirs.receive_some() == b"hello"
    await theirs.send_all(b"back")
    assert await ours.receive_some(100) == b"back"
    await theirs.send_eof()
    assert await ours.receive_some() == b""
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"late")
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some()
    await theirs.aclose()
    await listener.aclose()


async def test_a_full_socket_makes_send_all_wait_and_nothing_is_lost():
    ours, theirs, listener = await tcp_pair()
    block = bytes(range(256)) * 1024  # 256 KiB
    rest = ours.write_nowait(block)
    sent = [block]
    while not rest:  # nobody reads: the kernel buffers fill up
        rest = ours.write_nowait(block)
        sent.append(block)
    got = bytearray()

    async def read_all(n: int) -> None:
        while len(got) < n:
            got.extend(await theirs.receive_some(1 << 20))

    total = len(block) * (len(sent) + 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, total)
        await ours.send_all(rest)  # waits for room, then finishes the leftover
        await ours.send_all(block)
    assert bytes(got) == block * (len(sent) + 1)
    await ours.aclose()
    await theirs.aclose()
    await listener.aclose()


async def test_reads_yield_only_after_the_budget_and_wait_after_draining_reads():
    ours, theirs, listener = await tcp_pair()
    await theirs.send_all(b"a" * 10)
    await trio.lowlevel.wait_readable(ours.socket)
    with trio.testing.assert_no_checkpoints():
        assert await ours.receive_some() == b"a" * 10  # data was there: no scheduler pass
    await theirs.send_all(b"b")
    await trio.lowlevel.wait_readable(ours.socket)
    with trio.testing.assert_checkpoints():
        # the last read drained the socket, so this one waits for readability first
        assert await ours.receive_some() == b"b"
    ours._short_read = False
    ours._read_budget = YIELD_AFTER
    await theirs.send_all(b"c")
    await trio.lowlevel.wait_readable(ours.socket)
    with trio.testing.assert_checkpoints():
        assert await ours.receive_some() == b"c"  # over budget: yields once
    await ours.aclose()
    await theirs.aclose()
    await listener.aclose()
