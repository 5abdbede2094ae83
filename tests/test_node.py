"""The node supervisor: several nodes in one nursery, restart, locking, shutdown."""

import httpx
import pytest
import trio

from ocf import open_node
from ocf.errors import DataDirLocked


async def get_json(url: str) -> dict:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()


async def test_two_nodes_in_one_nursery_on_ephemeral_ports(node_config):
    async with open_node(node_config()) as a, open_node(node_config()) as b:
        assert a.peer_id != b.peer_id
        assert a.gateway_url != b.gateway_url
        assert not a.gateway_url.endswith(":0")
        for node in (a, b):
            health = await get_json(node.gateway_url + "/v1/health")
            assert health["status"] == "ok"
            assert health["peer_id"] == str(node.peer_id)
            assert health["version"] == node.version
            assert health["uptime"] >= 0


async def test_identity_persists_across_restart(node_config):
    cfg = node_config()
    async with open_node(cfg) as node:
        first = node.peer_id
    async with open_node(cfg) as node:
        assert node.peer_id == first


async def test_seed_gives_deterministic_identity(node_config):
    async with open_node(node_config(seed="x")) as a:
        pid = a.peer_id
    async with open_node(node_config(seed="x")) as b:
        assert b.peer_id == pid


async def test_data_dir_is_exclusive(node_config):
    cfg = node_config()
    async with open_node(cfg):
        with pytest.raises(DataDirLocked):
            async with open_node(cfg):
                pass  # pragma: no cover


async def test_leaving_the_block_stops_everything(node_config):
    cfg = node_config()
    async with open_node(cfg) as node:
        url = node.gateway_url
        store = node.store
    assert store.closed
    with pytest.raises(httpx.HTTPError):
        await get_json(url + "/v1/health")
    # and the data dir is free again
    async with open_node(cfg):
        pass


async def test_a_stopping_node_opens_no_connection(node_config):
    """A node says goodbye on the connections it has and dials no one once its gateway has drained.

    Before, a member's membership sender redialed the seed that had just hung up on its "left"
    (about 1 stop in 3 here), and a private network's seed counted that connection.
    """
    async with open_node(node_config(mode="standalone")) as seed:
        addr = str(next(a for a in seed.listen_addrs if not a.has("ws")))
        for _ in range(8):
            async with open_node(node_config(mode="node", bootstrap_addrs=(addr,))) as member:
                assert await member.bootstrap.wait_connected() == seed.peer_id
                assert await member.host.ping(seed.peer_id) >= 0
                dials, sent = member.host.stats["dials"], member.table.stats["records_sent"]
            assert member.host.stats["dials"] == dials
            assert member.table.stats["records_sent"] > sent  # its "left" went out, on the connection it had


async def test_cancellation_from_outside_stops_cleanly(node_config):
    cfg = node_config()
    started = trio.Event()
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:

            async def run():
                async with open_node(cfg):
                    started.set()
                    await trio.sleep_forever()

            nursery.start_soon(run)
            await started.wait()
            nursery.cancel_scope.cancel()
    async with open_node(cfg):  # lock released, store closed cleanly
        pass


async def test_gateway_port_in_use_is_a_clear_error(node_config):
    from ocf.gateway.server import GatewayError

    async with open_node(node_config()) as a:
        port = int(a.gateway_url.rsplit(":", 1)[1])
        with pytest.raises(GatewayError, match=f"{port}"):
            async with open_node(node_config(port=port)):
                pass  # pragma: no cover


async def test_unknown_route_is_json_404(node_config):
    async with open_node(node_config()) as node:
        async with httpx.AsyncClient() as client:
            r = await client.get(node.gateway_url + "/v1/nope")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
