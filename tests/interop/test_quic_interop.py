"""QUIC interoperability with js-libp2p's ``@chainsafe/libp2p-quic`` (quinn and rustls in a native binary).

Both directions: connect, ping, identify, 10 MiB through an echo protocol
and 64 concurrent echo streams on one connection. On our side it is aioquic
driven by ocf's QUIC transport, with ocf's libp2p TLS certificate code and
its own multistream-select, ping and identify on native QUIC streams.
"""

import hashlib

import pytest
import trio

from ocf import open_node
from ocf.identity import Multiaddr, PeerId
from tests.interop.jspeer import open_js_peer
from tests.waiting import wait_until
from tests.interop.test_libp2p_interop import ECHO, TEN_MIB, echo_handler, pattern

pytestmark = pytest.mark.interop

STREAMS = 64


@pytest.fixture
async def pair(node_config):
    async with open_js_peer() as js, open_node(node_config()) as node:
        node.host.set_stream_handler(ECHO, echo_handler)
        yield node, js


def our_quic_addr(node) -> str:
    return str(next(a for a in node.listen_addrs if a.has("quic-v1")))


async def test_js_dials_us_over_quic(pair):
    node, js = pair
    addr = our_quic_addr(node)
    reply = await js.request("ping", addr=addr, count=3)
    assert len(reply["rtts"]) == 3
    ident = await js.request("identify", addr=addr)
    assert ident["peerId"] == str(node.peer_id)
    assert ident["agentVersion"].startswith("ocf/")
    assert ECHO in ident["protocols"]
    assert any("/quic-v1" in a for a in ident["listenAddrs"])
    assert ident["observedAddr"] and "/quic-v1" in ident["observedAddr"]
    echo = await js.request("echo", addr=addr, bytes=TEN_MIB)
    assert echo["sha256"] == hashlib.sha256(pattern(TEN_MIB)).hexdigest()
    many = await js.request("streams", addr=addr, streams=STREAMS, bytes=64 * 1024)
    assert many["streams"] == STREAMS and "/quic-v1" in many["transport"]
    (conn,) = node.host.connections(PeerId.from_string(js.peer_id))
    assert conn.transport == "quic"


async def test_we_dial_js_over_quic(pair):
    node, js = pair
    peer = await node.host.connect(Multiaddr.parse(js.addr("quic")))
    assert peer == PeerId.from_string(js.peer_id)
    assert node.host.connections(peer)[0].transport == "quic"
    rtt = await node.host.ping(peer)
    assert 0 < rtt < 5
    with trio.fail_after(10):  # identify runs on its own stream after connect
        await wait_until(lambda: node.host.peer_info(peer) is not None)
    info = node.host.peer_info(peer)
    assert "js-libp2p" in info.agent_version and ECHO in info.protocols

    async def echo(size: int, seed: int) -> None:
        data = bytes((b + seed) % 256 for b in pattern(size)) if seed else pattern(size)
        stream = await node.host.new_stream(peer, ECHO)
        got = bytearray()

        async def send() -> None:
            view = memoryview(data)
            for i in range(0, len(data), 65536):
                await stream.send_all(view[i : i + 65536])
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some():
                got += chunk
        assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        await stream.aclose()

    with trio.fail_after(60):
        await echo(TEN_MIB, 0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(STREAMS):
                nursery.start_soon(echo, 64 * 1024, i + 1)
    assert len(node.host.connections(peer)) == 1
