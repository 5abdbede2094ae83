"""Whole nodes in a private network: members join over TCP, an outsider is refused and counted on /metrics."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from ocf.errors import PrivateNetworkRefused, TransportError
from ocf.node import open_node
from ocf.transport import pnet
from tests.waiting import wait_until


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "swarm.key"
    path.write_bytes(pnet.generate_swarm_key())
    path.chmod(0o600)
    return pnet.load_network_key(path)


async def test_private_cluster_bootstrap_and_outsider_refused(node_config, key, caplog):
    caplog.set_level(logging.INFO, logger="ocf")
    async with open_node(node_config(mode="standalone", network_key=key)) as seed:
        addr = str(next(a for a in seed.listen_addrs if not a.has("ws")))
        async with open_node(node_config(mode="node", bootstrap_addrs=(addr,), network_key=key)) as member:
            assert await member.bootstrap.wait_connected() == seed.peer_id
            assert await member.host.ping(seed.peer_id) >= 0
        # Counted from here, so that the outsider's figures do not depend on how the member's
        # connections came and went (a stopping member once redialed the seed that hung up on its
        # "left"; it dials no one now: tests/test_node.py::test_a_stopping_node_opens_no_connection).
        protector = seed.host.upgrader.protector
        before = dict(protector.stats)
        assert before["protected"] >= 1  # the member's connection
        async with open_node(node_config(mode="standalone")) as outsider:
            with pytest.raises(TransportError) as info:  # the open node sees only garbage
                await outsider.host.connect(addr)
            assert not isinstance(info.value, PrivateNetworkRefused)
            assert not seed.host.is_connected(outsider.peer_id)
        with trio.fail_after(10):  # it lands in the seed's connection task
            await wait_until(lambda: protector.stats["refused"] >= before["refused"] + 1)
        # The outsider's first 24 bytes pass for a nonce (counted protected); what follows decrypts to garbage.
        assert protector.stats["protected"] == before["protected"] + 1
        async with httpx.AsyncClient(base_url=seed.gateway_url) as client:
            text = (await client.get("/metrics")).text
        for outcome in ("refused", "protected"):
            assert f'ocf_pnet_connections_total{{outcome="{outcome}"}} {float(protector.stats[outcome])}' in text
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "private network" in logged and key.fingerprint in logged
    assert key.psk.hex() not in logged
