"""Circuit relay v2, AutoNAT and DCUtR against js-libp2p (@libp2p/circuit-relay-v2, /autonat, /dcutr).

- ocf as the client of a js relay: it reserves there, another ocf node reaches it through the js relay;
- js as the client of an ocf relay: it reserves on ours (at start, by listening on a /p2p-circuit
  address), ocf reaches it through our relay, and it reaches an ocf node through our relay;
- AutoNAT: our request to a js server gets a well-formed answer.
"""

from __future__ import annotations

import pytest
import trio

from ocf import open_node
from ocf.identity import Multiaddr, PeerId
from ocf.transport.identify import read_message, write_message
from ocf.transport.relay.autonat import PROTOCOL as AUTONAT, DialRequest, DialResponse, RespStatus, decode
from tests.interop.jspeer import open_js_peer

pytestmark = pytest.mark.interop

ECHO = "/ocf/echo/1.0.0"


async def echo_handler(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def roundtrip(host, peer, payload: bytes) -> bytes:
    stream = await host.new_stream(peer, ECHO)
    got = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        while chunk := await stream.receive_some():
            got += chunk
    return bytes(got)


def tcp_addr(node) -> str:
    return next(str(a) for a in node.listen_addrs if a.has("tcp") and not a.has("ws") and not a.has("p2p-circuit"))


async def test_ocf_reserves_on_a_js_relay_and_is_reached_through_it(node_config):
    async with open_js_peer(relay=True) as js:
        relay = PeerId.from_string(js.peer_id)
        async with open_node(node_config(reachability="public")) as a, open_node(node_config()) as b:
            a.host.set_stream_handler(ECHO, echo_handler)
            await a.host.connect(js.addr("tcp"))
            held = await a.nat.client.reserve(relay)
            # js-libp2p's default data limit is go-libp2p's; its duration goes out in milliseconds (the spec
            # says seconds), so only that it is there is checked
            assert held.limit is not None and held.limit.data == 1 << 17 and held.limit.duration > 0
            circuit = held.addrs[0]
            assert f"/p2p/{relay}/p2p-circuit/p2p/{a.peer_id}" in str(circuit)
            assert await b.host.connect(circuit) == a.peer_id
            assert any(c.relayed for c in b.host.connections(a.peer_id))
            assert await roundtrip(b.host, a.peer_id, b"through js" * 100) == b"through js" * 100


async def test_js_reserves_on_an_ocf_relay_and_both_ways_through_it(node_config):
    async with open_node(node_config(relay=True, reachability="public")) as r:
        listen = f"{tcp_addr(r)}/p2p-circuit"
        async with open_js_peer(relay_listen=listen) as js:
            peer = PeerId.from_string(js.peer_id)
            assert r.nat.service.has_reservation(peer)
            js_circuit = next(a for a in (await js.request("addrs"))["addrs"] if "/p2p-circuit" in a)
            assert str(r.peer_id) in js_circuit
            async with open_node(node_config(reachability="public")) as b:
                # ocf -> js through the ocf relay
                await b.host.connect(Multiaddr.parse(f"{listen}/p2p/{js.peer_id}"))
                assert any(c.relayed for c in b.host.connections(peer))
                assert await roundtrip(b.host, peer, b"to js" * 200) == b"to js" * 200
                assert r.nat.service.stats["circuits_opened"] >= 1
            # js -> ocf through the ocf relay: an ocf node reserves there, js dials its circuit address
            async with open_node(node_config(reachability="public")) as a:
                a.host.set_stream_handler(ECHO, echo_handler)
                await a.host.connect(tcp_addr(r))
                held = await a.nat.client.reserve(r.peer_id)
                echo = await js.request("echo", addr=str(held.addrs[0]), bytes=4096)
                assert echo["bytes"] == 4096
                assert a.nat.client.stats["relayed_inbound"] >= 1


async def test_autonat_request_to_a_js_server_gets_a_well_formed_answer(node_config):
    async with open_js_peer() as js, open_node(node_config(reachability="public")) as a:
        peer = PeerId.from_string(js.peer_id)
        await a.host.connect(js.addr("tcp"))
        stream = await a.host.new_stream(peer, AUTONAT)
        async with stream:
            request = DialRequest(a.peer_id.raw, tuple(x.without_p2p().to_bytes() for x in a.host.listen_addrs))
            await write_message(stream, request.encode())
            answer = decode(await read_message(stream, 4096))
        assert isinstance(answer, DialResponse)
        # js refuses to dial back loopback addresses; what matters here is that both sides parse each other
        assert answer.status in {s.value for s in RespStatus}
