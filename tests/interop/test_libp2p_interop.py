"""Interoperability with js-libp2p (a real, independent libp2p implementation).

Both directions over TCP and WebSocket: ping, identify, and 10 MiB through
an echo protocol. Everything ocf speaks here is its own code: multistream-
select, Noise XX, yamux, identify, ping.
"""

import hashlib

import pytest
import trio

from ocf import open_node
from ocf.identity import Multiaddr, PeerId
from tests.interop.jspeer import open_js_peer
from tests.waiting import wait_until

pytestmark = pytest.mark.interop

ECHO = "/ocf/echo/1.0.0"
TEN_MIB = 10 * 1024 * 1024


async def echo_handler(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(251)) * (n // 251) + bytes(i % 251 for i in range(n % 251))


@pytest.fixture
async def pair(node_config):
    async with open_js_peer() as js, open_node(node_config()) as node:
        node.host.set_stream_handler(ECHO, echo_handler)
        yield node, js


def our_addr(node, transport):
    for a in node.listen_addrs:
        if a.has("ws") == (transport == "ws") and a.has("tcp"):
            return str(a)
    raise LookupError(transport)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_js_dials_us_ping_identify_echo(pair, transport):
    node, js = pair
    addr = our_addr(node, transport)
    reply = await js.request("ping", addr=addr, count=3)
    assert len(reply["rtts"]) == 3
    ident = await js.request("identify", addr=addr)
    assert ident["peerId"] == str(node.peer_id)
    assert ident["agentVersion"].startswith("ocf/")
    assert "/ipfs/ping/1.0.0" in ident["protocols"] and ECHO in ident["protocols"]
    echo = await js.request("echo", addr=addr, bytes=TEN_MIB)
    assert echo["bytes"] == TEN_MIB
    assert echo["sha256"] == hashlib.sha256(pattern(TEN_MIB)).hexdigest()


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_we_dial_js_ping_identify_echo(pair, transport):
    node, js = pair
    peer = await node.host.connect(Multiaddr.parse(js.addr(transport)))
    assert peer == PeerId.from_string(js.peer_id)
    rtt = await node.host.ping(peer)
    assert 0 < rtt < 5
    with trio.fail_after(10):
        await wait_until(lambda: node.host.peer_info(peer) is not None)  # identify runs on its own stream
    info = node.host.peer_info(peer)
    assert "js-libp2p" in info.agent_version
    assert ECHO in info.protocols
    stream = await node.host.new_stream(peer, ECHO)
    data = pattern(TEN_MIB)
    got = bytearray()

    async def send():
        view = memoryview(data)
        for i in range(0, len(data), 65536):
            await stream.send_all(view[i : i + 65536])
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await stream.receive_some():
            got += chunk
    assert len(got) == TEN_MIB and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    await stream.aclose()
