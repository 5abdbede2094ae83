"""Nodes behind a relay: a private node reserves by itself, publishes /p2p-circuit, and is reached through it."""

from __future__ import annotations

import httpx
import trio

from ocf.node import open_node
from ocf.transport import MemoryNetwork


async def wait_for(host, predicate, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    with trio.fail_after(timeout):
        while not predicate():
            await host.wait_changed()


async def test_private_node_reserves_and_is_reached_through_the_relay(node_config):
    net = MemoryNetwork()
    async with open_node(node_config(relay=True), memory_network=net) as relay:
        boot = (str(relay.listen_addrs[0]),)
        priv_cfg = node_config(mode="node", bootstrap_addrs=boot, reachability="private")
        async with open_node(priv_cfg, memory_network=net) as priv:
            await wait_for(priv.host, lambda: priv.nat.client.reservations)
            [circuit] = priv.nat.client.circuit_addrs()
            assert circuit in priv.host.listen_addrs
            assert str(circuit) in priv.table.own_entry()["addrs"]  # published in the node table
            other_cfg = node_config(mode="node", bootstrap_addrs=boot, reachability="public")
            async with open_node(other_cfg, memory_network=net) as other:
                # other knows priv only by its circuit address
                other.host.add_addrs(priv.peer_id, [circuit])
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"{other.gateway_url}/v1/p2p/{priv.peer_id}/v1/health", timeout=10)
                    assert r.status_code == 200, r.text
                    assert r.json()["reachability"] == "private"
                [conn] = other.host.connections(priv.peer_id)
                assert conn.relayed
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"{priv.gateway_url}/v1/dnt/peers_status", timeout=10)
                nat = r.json()["nat"]
                assert nat["reachability"] == "private" and nat["relays"] == [str(relay.peer_id)]
                assert relay.nat.service.stats["circuits_opened"] >= 1
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"{relay.gateway_url}/metrics", timeout=10)).text
                assert 'ocf_relay_service_usage{resource="reservations"} 1.0' in text
                assert 'ocf_nat_events_total{event="circuits_opened",subsystem="relay"}' in text
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"{priv.gateway_url}/metrics", timeout=10)).text
                assert 'ocf_nat_reachability{value="private"} 1.0' in text
                assert "ocf_relay_reservations_held 1.0" in text


async def test_relay_refusal_is_a_503_with_the_reason(node_config):
    net = MemoryNetwork()
    async with open_node(node_config(relay=True), memory_network=net) as relay:
        boot = (str(relay.listen_addrs[0]),)
        node_cfg = node_config(mode="node", bootstrap_addrs=boot)
        async with (
            open_node(node_cfg, memory_network=net) as priv,
            open_node(node_config(mode="node", bootstrap_addrs=boot), memory_network=net) as other,
        ):
            # a circuit address, but priv holds no reservation on the relay
            circuit = f"{relay.listen_addrs[0]}/p2p-circuit/p2p/{priv.peer_id}"
            other.host.add_addrs(priv.peer_id, [circuit])
            async with httpx.AsyncClient() as client:
                r = await client.get(f"{other.gateway_url}/v1/p2p/{priv.peer_id}/v1/health", timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "relay_refused"
            assert "NO_RESERVATION" in r.json()["error"]["message"]


async def test_a_circuit_cut_at_the_relay_limit_is_a_503_with_the_reason(node_config):
    net = MemoryNetwork()
    async with open_node(node_config(relay=True, relay_circuit_data=64 << 10), memory_network=net) as relay:
        boot = (str(relay.listen_addrs[0]),)
        priv_cfg = node_config(mode="node", bootstrap_addrs=boot, reachability="private")
        async with open_node(priv_cfg, memory_network=net) as priv:
            await wait_for(priv.host, lambda: priv.nat.client.reservations)
            [circuit] = priv.nat.client.circuit_addrs()
            async with open_node(node_config(mode="node", bootstrap_addrs=boot), memory_network=net) as other:
                other.host.add_addrs(priv.peer_id, [circuit])
                async with httpx.AsyncClient() as client:
                    r = await client.post(
                        f"{other.gateway_url}/v1/p2p/{priv.peer_id}/v1/health", content=b"x" * (300 << 10), timeout=10
                    )
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "relay_limit"
                assert "65536 bytes each way" in r.json()["error"]["message"]
