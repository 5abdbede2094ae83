"""The Trio drivers: negotiation + Noise over memory streams and real loopback TCP."""

import pytest
import trio
import trio.testing

from ocf.errors import HandshakeError, PeerIdMismatch, ProtocolNotSupported
from ocf.identity import Identity
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


async def test_wrong_peer_id_is_refused():
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(BaseExceptionGroup) as info:
        await upgrade_pair(a, b, expected=EVE.peer_id)
    assert info.group_contains(PeerIdMismatch)


async def test_unsupported_security_protocol():
    a, b = trio.testing.memory_stream_pair()

    async def listen():
        try:
            await secure.negotiate(b, ["/tls/1.0.0"], initiator=False)
        except HandshakeError:
            pass

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
