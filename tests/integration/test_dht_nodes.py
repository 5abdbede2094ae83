"""Whole nodes run the DHT: a standalone node serves, workers ask, and workers find each other through it."""

from __future__ import annotations

import trio
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from ocf.dht.metrics import DhtCollector
from ocf.node import open_node
from ocf.transport import MemoryNetwork


async def test_workers_find_each_other_through_the_bootstrap_node(node_config):
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as seed:
        addr = str(seed.listen_addrs[0])
        worker = node_config(mode="node", bootstrap_addrs=(addr,))
        async with (
            open_node(worker, memory_network=net) as w1,
            open_node(worker.replace(data_dir=worker.data_dir.with_name("w2")), memory_network=net) as w2,
        ):
            assert (seed.dht.mode, w1.dht.mode, w2.dht.mode) == ("server", "client", "client")
            assert seed.dht.protocol in seed.host.protocols and w1.dht.protocol not in w1.host.protocols
            with trio.fail_after(10):
                await w1.dht.wait_ready()  # identify told w1 that the seed serves the DHT
                await w2.bootstrap.wait_connected()
            assert list(w1.dht.table) == [seed.peer_id]
            assert not w1.host.is_connected(w2.peer_id)  # workers connect only to the seed
            w1.host.forget_addrs(w2.peer_id)  # whatever the node table may have told it already
            assert await w1.dht.find_peer(w2.peer_id) == [w2.listen_addrs[0].without_p2p()]
            assert w1.dht.stats["rpcs"] >= 1 and seed.dht.stats["inbound_requests"] >= 1
            assert w1.host.is_connected(w2.peer_id)
            registry = CollectorRegistry()
            registry.register(DhtCollector(seed.dht))
            text = generate_latest(registry).decode()
            assert 'ocf_dht_routing_table_peers{mode="server"} 0.0' in text
            assert 'ocf_dht_events_total{event="inbound_requests"}' in text
