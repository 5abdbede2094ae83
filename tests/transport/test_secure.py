"""The Trio drivers: negotiation + Noise over memory streams and real loopback TCP."""

import contextlib

import pytest
import trio
import trio.testing

from ocf.errors import HandshakeError, PeerIdMismatch, ProtocolNotSupported
from ocf.identity import Identity
from ocf.directsocket import YIELD_AFTER
from ocf.transport import secure

ALICE, BOB, EVE = Identity.from_seed("alice"), Identity.from_seed("bob"), Identity.from_seed("eve")


async def upgrade_pair(a_stream, b_stream, expected=BOB.peer_id):
    results = {}

    async def dial():
        await secure.negotiate(a_stream, ["/noise"], initiator=True)
        results["a"] = await secure.secure_outbound(a_stream, ALICE, expected)

    async def listen():
        await secure.negotiate(b_stream, ["/noise"], initiator=False)
        results["b"] = await secure.secure_inbound(b_stream, BOB)

    async with trio.open_nursery() as n:
        n.start_soon(dial)
        n.start_soon(listen)
    return results["a"], results["b"]


async def test_memory_pair_roundtrip_and_pipelined_negotiation():
    a, b = trio.testing.memory_stream_pair()
    sa, sb = await upgrade_pair(a, b)
    assert sa.remote_peer == BOB.peer_id and sb.remote_peer == ALICE.peer_id

    async def dial():
        assert await secure.negotiate(sa, ["/x", "/yamux/1.0.0"], initiator=True) == "/yamux/1.0.0"
        await sa.send_all(b"right after negotiation")

    async def listen():
        assert await secure.negotiate(sb, ["/yamux/1.0.0"], initiator=False) == "/yamux/1.0.0"
        got = b""
        while len(got) < 23:
            got += await sb.receive_some()
        assert got == b"right after negotiation"

    async with trio.open_nursery() as n:
        n.start_soon(dial)
        n.start_soon(listen)


async def test_loopback_tcp_one_mebibyte_both_ways():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    payload = bytes(range(256)) * 4096
    async with trio.open_nursery() as n:
        accepted = trio.Event()
        box = {}

        async def serve():
            stream = await listeners[0].accept()
            await secure.negotiate(stream, ["/noise"], initiator=False)
            box["b"] = await secure.secure_inbound(stream, BOB)
            accepted.set()

        n.start_soon(serve)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await secure.negotiate(client, ["/noise"], initiator=True)
        sa = await secure.secure_outbound(client, ALICE, BOB.peer_id)
        await accepted.wait()
        sb = box["b"]

        async def echo():
            got = 0
            while got < len(payload):
                data = await sb.receive_some()
                got += len(data)
                await sb.send_all(data)

        n.start_soon(echo)
        n.start_soon(sa.send_all, payload)  # send while reading, or both sides' buffers fill up
        back = b""
        while len(back) < len(payload):
            back += await sa.receive_some()
        assert back == payload
        await sa.aclose()
        await sb.aclose()
        for listener in listeners:
            await listener.aclose()


async def tcp_secure_pair(listeners):
    port = listeners[0].socket.getsockname()[1]
    box = {}
    async with trio.open_nursery() as n:

        async def serve():
            stream = await listeners[0].accept()
            await secure.negotiate(stream, ["/noise"], initiator=False)
            box["b"] = await secure.secure_inbound(stream, BOB)

        n.start_soon(serve)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await secure.negotiate(client, ["/noise"], initiator=True)
        box["a"] = await secure.secure_outbound(client, ALICE, BOB.peer_id)
    return box["a"], box["b"]


async def test_tcp_writes_skip_trio_and_hand_back_what_the_kernel_did_not_take():
    """write_nowait never waits: with a peer that does not read, the rest comes back, already encrypted."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    sa, sb = await tcp_secure_pair(listeners)
    assert sa._direct is not None and sb._direct is not None  # the fast path is in use
    block = bytes(range(256)) * 256  # 64 KiB
    sent = []
    rest = b""
    while not rest:  # fill the socket buffers: nobody reads yet
        sent.append(block)
        rest = sa.write_nowait([block[:12], block[12:]])
    assert len(sent) > 1

    async def read_all(expected: int, box: bytearray):
        while len(box) < expected:
            data = await sb.receive_some()
            assert data
            box += data

    got = bytearray()
    async with trio.open_nursery() as n:
        n.start_soon(read_all, len(block) * len(sent), got)
        await sa.send_encrypted(rest)  # the leftover goes first, then the stream goes on
    assert bytes(got) == block * len(sent)
    await sa.send_all(b"after")
    assert await sb.receive_some() == b"after"
    await sa.aclose()
    with pytest.raises(trio.ClosedResourceError):
        sa.write_nowait([b"too late"])
    assert await sb.receive_some() == b""
    await sb.aclose()
    for listener in listeners:
        await listener.aclose()


async def test_tcp_reads_yield_only_after_a_budget_of_bytes():
    """A read that finds data does not yield, unless YIELD_AFTER bytes came in without a wait."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    sa, sb = await tcp_secure_pair(listeners)
    await sa.send_all(b"x" * 1000)
    await sa.send_all(b"y" * 1000)
    await trio.lowlevel.wait_readable(sb._direct.socket)
    sb._direct._short_read = False  # as if the last read had filled the buffer
    with trio.testing.assert_no_checkpoints():
        data = await sb._receive_ciphertext()  # both frames are already in the socket
    assert sb._session.decrypt_stream(data) == b"x" * 1000 + b"y" * 1000
    await sa.send_all(b"z")
    await trio.lowlevel.wait_readable(sb._direct.socket)
    sb._direct._read_budget = YIELD_AFTER
    with trio.testing.assert_checkpoints():
        data = await sb._receive_ciphertext()
    assert sb._session.decrypt_stream(data) == b"z"
    await sa.aclose()
    await sb.aclose()
    for listener in listeners:
        await listener.aclose()


async def test_wrong_peer_id_is_refused():
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(BaseExceptionGroup) as info:
        await upgrade_pair(a, b, expected=EVE.peer_id)
    assert info.group_contains(PeerIdMismatch)


async def test_unsupported_security_protocol():
    a, b = trio.testing.memory_stream_pair()

    async def listen():
        with contextlib.suppress(HandshakeError):
            await secure.negotiate(b, ["/tls/1.0.0"], initiator=False)

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as n:
            n.start_soon(listen)
            await secure.negotiate(a, ["/noise"], initiator=True)
    assert info.group_contains(ProtocolNotSupported)


async def test_peer_closing_mid_handshake_is_handshake_error():
    a, b = trio.testing.memory_stream_pair()

    async def half():
        await b.receive_some()
        await b.aclose()

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as n:
            n.start_soon(half)
            await secure.secure_outbound(a, ALICE, None)
    assert info.group_contains(HandshakeError)
