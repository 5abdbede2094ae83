"""Kademlia interop with js-libp2p's @libp2p/kad-dht, both directions, over TCP on loopback.

- js finds a peer through our DHT server (on OCF's own prefix, configured on both);
- we find a peer through a js DHT server (on the standard /ipfs/kad/1.0.0).

In both, the peer being found is one of ours in client mode, connected only
to the server: the lookup's answer comes from what the server knows, and
the finder then dials the address it was given.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from ocf.config import Config
from ocf.dht import Dht, open_dht
from ocf.identity import Identity, Multiaddr, PeerId
from ocf.transport import open_host
from ocf.transport.ping import PROTOCOL as PING
from tests.dht.dhtutil import QUIET, Identified
from tests.interop.jspeer import JsPeer, open_js_peer

pytestmark = pytest.mark.interop


@contextlib.asynccontextmanager
async def our_dht(name: str, mode: str, protocol: str) -> AsyncIterator[Dht]:
    cfg = Config(host="127.0.0.1", tcpport=0, ws=False, dht_protocol=protocol)
    async with (
        open_host(Identity.from_seed(f"dht-interop-{name}"), cfg) as host,
        open_dht(host, cfg, mode=mode, limits=QUIET) as dht,
    ):
        yield dht


async def js_table_size(js: JsPeer, at_least: int) -> int:
    """js adds peers to its table in the background after identify; ask until it has (bounded)."""
    with trio.fail_after(15):
        while (size := (await js.request("dhtTable"))["size"]) < at_least:  # noqa: ASYNC110 - the state is in the js process: poll its interface
            await trio.sleep(0.05)
    return size


async def js_knows_addrs(js: JsPeer, peer: PeerId) -> list[str]:
    """js records a peer's addresses when its identify of that peer completes, in the background."""
    with trio.fail_after(15):
        while not (addrs := (await js.request("peerStoreAddrs", peerId=str(peer)))["addrs"]):  # noqa: ASYNC110 - the state is in the js process: poll its interface
            await trio.sleep(0.05)
    return addrs


async def test_js_finds_our_client_through_our_server():
    protocol = "/ocf/kad/1.0.0"
    async with (
        our_dht("server", "server", protocol) as server,
        our_dht("target", "client", protocol) as target,
        open_js_peer(dht="client", dht_protocol=protocol) as js,
    ):
        watch = Identified(server.host)
        await target.host.connect(server.host.listen_addrs[0])
        await watch.wait(target.host.peer_id)
        await js.request("dial", addr=str(server.host.listen_addrs[0]))
        await js_table_size(js, 1)
        found = await js.request("dhtFindPeer", peerId=str(target.host.peer_id))
        assert found["peerId"] == str(target.host.peer_id)
        assert str(target.host.listen_addrs[0].without_p2p()) in found["addrs"]
        assert server.stats["inbound_requests"] >= 1
        # The address works: js reaches the target with it.
        await js.request("ping", addr=str(target.host.listen_addrs[0]))


async def test_we_find_a_peer_through_a_js_server():
    protocol = "/ipfs/kad/1.0.0"
    async with open_js_peer(dht="server", dht_protocol=protocol) as js:
        js_addr = Multiaddr.parse(js.addr("tcp"))
        js_id = PeerId.from_string(js.peer_id)
        async with our_dht("finder", "client", protocol) as finder, our_dht("found", "client", protocol) as found:
            await found.host.connect(js_addr)
            await js_knows_addrs(js, found.host.peer_id)
            watch = Identified(finder.host)
            await finder.host.connect(js_addr)
            await watch.wait(js_id)
            assert js_id in finder.table  # identify showed the js peer serves /ipfs/kad/1.0.0
            assert not finder.host.peer_addrs(found.host.peer_id)
            # js knows `found` only from its connection: its answer must carry the address.
            stream = await finder.host.new_stream(found.host.peer_id, PING)
            await stream.aclose()
            assert finder.host.is_connected(found.host.peer_id)
            assert finder.stats["peers_found"] == 1
            assert finder.stats["rpcs"] >= 1
