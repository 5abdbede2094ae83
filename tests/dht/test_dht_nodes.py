"""Several hosts with a DHT on the in-memory transport: lookups, roles, the host's resolver."""

from __future__ import annotations

import random

import attrs

import pytest

from ocf.errors import PeerUnreachable
from ocf.transport.ping import PROTOCOL as PING

from ocf.transport import MemoryNetwork

from .dhtutil import QUIET, Identified, dht_nodes, link


async def test_peer_found_along_a_chain_of_servers():
    async with dht_nodes(["server"] * 6) as nodes:
        for a, b in zip(nodes, nodes[1:], strict=False):
            link(a, b)
        first, target = nodes[0], nodes[-1]
        assert not first.host.peer_addrs(target.host.peer_id)
        # The host's dial path asks the DHT for a peer with no known address.
        stream = await first.host.new_stream(target.host.peer_id, PING)
        await stream.aclose()
        assert first.host.is_connected(target.host.peer_id)
        assert first.stats["lookups"] == 1 and first.stats["peers_found"] == 1
        # Each server on the way was asked once: the chain is walked, not flooded.
        assert first.stats["rpcs"] == 4


async def test_client_behind_a_server_is_found_through_it():
    async with dht_nodes(["server", "client", "client"]) as (server, a, b):
        watch = Identified(server.host)
        for client in (a, b):
            await client.host.connect(server.host.listen_addrs[0])
            await watch.wait(client.host.peer_id)
        # Clients do not serve, so they stay out of tables; the server still lists a peer it can reach.
        assert len(server.table) == 0
        link(a, server)
        assert await a.find_peer(b.host.peer_id) == [b.host.listen_addrs[0].without_p2p()]
        assert a.host.is_connected(b.host.peer_id)


async def test_servers_join_tables_through_identify_and_clients_do_not():
    async with dht_nodes(["server", "server", "client"]) as (s1, s2, c):
        watch = Identified(s1.host)
        await s2.host.connect(s1.host.listen_addrs[0])
        await c.host.connect(s1.host.listen_addrs[0])
        await watch.wait(s2.host.peer_id)
        await watch.wait(c.host.peer_id)
        assert list(s1.table) == [s2.host.peer_id]
        assert c.protocol not in s1.host.peer_info(c.host.peer_id).protocols


async def test_unknown_peer_is_unreachable_and_not_looked_up_again_at_once():
    async with dht_nodes(["server", "server"]) as (a, b):
        link(a, b)
        async with dht_nodes(["server"], prefix="elsewhere") as (ghost,):
            missing = ghost.host.peer_id
        with pytest.raises(PeerUnreachable):
            await a.host.new_stream(missing, PING)
        with pytest.raises(PeerUnreachable):
            await a.host.new_stream(missing, PING)
        assert a.stats["lookups"] == 1
        assert a.stats["lookups_refused"] == 1


async def test_networks_with_different_protocol_ids_do_not_mix():
    async with dht_nodes(["server", "server"], protocols=["/ocf/kad/1.0.0", "/ipfs/kad/1.0.0"]) as (a, b):
        link(a, b)
        assert await a.find_closest(a.host.peer_id.raw) == []
        assert a.stats["rpc_failures"] == 1
        assert b.host.peer_id not in a.table


async def test_mode_switch_registers_and_withdraws_the_protocol():
    async with dht_nodes(["client", "server"]) as (a, b):
        assert a.protocol not in a.host.protocols
        a.set_mode("server")
        assert a.protocol in a.host.protocols
        link(b, a)
        assert await b.find_closest(b.host.peer_id.raw) == [a.host.peer_id]
        a.set_mode("client")
        assert a.protocol not in a.host.protocols
        assert await b.find_closest(b.host.peer_id.raw) == []
        assert a.host.peer_id not in b.table
        with pytest.raises(ValueError):
            a.set_mode("auto")


def test_auto_mode_serves_when_reachable():
    from ocf.config import Config
    from ocf.dht import choose_mode

    assert choose_mode(Config(mode="standalone")) == "server"
    assert choose_mode(Config(mode="node")) == "client"
    assert choose_mode(Config(mode="node", public_addr="203.0.113.7")) == "server"
    assert choose_mode(Config(mode="standalone", dht="client")) == "client"
    assert choose_mode(Config(mode="node", dht="server")) == "server"
    # Once reachability is measured, it decides.
    assert choose_mode(Config(mode="standalone"), reachable=False) == "client"
    assert choose_mode(Config(mode="node"), reachable=True) == "server"


async def test_network_joined_through_a_bootstrap_keeps_routing_after_it_leaves():
    """20 servers with k = 3 join through one bootstrap node (self-lookup, bucket refresh); then it leaves.

    A small k keeps tables partial (3 peers per bucket), so lookups take hops
    through peers met while joining, not the bootstrap's list of everyone.
    """
    limits = attrs.evolve(QUIET, k=3, alpha=2)
    net = MemoryNetwork()
    async with dht_nodes(["server"] * 20, net=net, limits=limits, prefix="joiner") as nodes:
        async with dht_nodes(["server"], net=net, limits=limits, prefix="boot") as (boot,):
            for node in nodes:
                link(node, boot)
                await node.refresh()
        for node in nodes:
            node.table.remove(boot.host.peer_id)
        assert all(len(node.table) >= limits.k for node in nodes)
        rng = random.Random(1)
        rpcs = []
        for _ in range(8):
            a, b = rng.sample(nodes, 2)
            await a.host.disconnect(b.host.peer_id)
            a.host.forget_addrs(b.host.peer_id)
            a.addr_book.drop(b.host.peer_id)
            before = a.stats["rpcs"]
            assert await a.find_peer(b.host.peer_id) == [b.host.listen_addrs[0].without_p2p()]
            rpcs.append(a.stats["rpcs"] - before)
        assert max(rpcs) <= limits.max_queries
