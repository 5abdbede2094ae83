"""Remote peers never reach a node's admin routes, whatever the spelling (2 nodes, one process).

The attack: ``DELETE /v1/p2p/<victim>//v1/dnt/_node`` sent to any gateway
withdrew the victim's services network-wide (the victim signs the change
itself, so owner signatures cannot help). Also here: a withdrawn service is
republished, and an entry update over the record cap is refused with 413
instead of poisoning the owner's later updates.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node
from ocf.transport import MemoryNetwork

from ..gateway.util import running_mock_llm
from ._router_raw import error_code, raw_request

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def network(node_config, mock):
    """A dispatcher and a victim offering ``llm``, both seeing the victim's service."""
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as dispatcher:
        config = node_config(
            mode="node",
            bootstrap_addrs=(str(dispatcher.listen_addrs[0]),),
            services=(ServiceSpec("llm", mock.port, "127.0.0.1"),),
        )
        async with open_node(config, memory_network=net) as victim:
            await victim.bootstrap.wait_connected()
            await victim.services.refresh()
            with trio.fail_after(20):
                while not _services(dispatcher.table.entries().get(str(victim.peer_id)) or {}):
                    await dispatcher.table.wait_changed()
            yield dispatcher, victim


def _services(entry: dict) -> list[str]:
    return [s["name"] for s in entry.get("service") or []]


def _spellings(victim: str) -> list[bytes]:
    p2p = f"/v1/p2p/{victim}"
    return [
        f"{p2p}//v1/dnt/_node".encode(),
        f"{p2p}/v1/dnt/_node".encode(),
        f"{p2p}/v1/dnt/_node/".encode(),
        f"{p2p}/v1//dnt/_node".encode(),
        f"{p2p}/v1/dnt//_node".encode(),
        f"{p2p}/./v1/dnt/_node".encode(),
        f"{p2p}/v1/x/../dnt/_node".encode(),
        f"{p2p}/v1/%64nt/_node".encode(),
        f"{p2p}/v1/dnt/%5Fnode".encode(),
        f"{p2p}/v1/dnt/_node%2F".encode(),
        f"{p2p}{p2p}/v1/dnt/_node".encode(),
        f"{p2p}/v1/p2p/{victim}//v1/dnt/_node".encode(),
        f"{p2p}/v1/_service/llm/../../v1/dnt/_node".encode(),
        f"/v1/p2p//{victim}/v1/dnt/_node".encode(),
    ]


async def test_no_spelling_lets_a_remote_peer_edit_the_victims_entry(node_config):
    async with running_mock_llm(["m1"]) as mock, network(node_config, mock) as (dispatcher, victim):
        peer = str(victim.peer_id)
        before = victim.table.own_entry()
        statuses: dict[int, int] = {}
        # At any gateway, holding that gateway's own admin token; at the victim's, a guessed one.
        for gateway, token in ((dispatcher, dispatcher.admin_token), (victim, "guessed")):
            for target in _spellings(peer):
                for method, body in (
                    ("DELETE", b""),
                    ("POST", b'{"status": "left", "service": []}'),
                    ("PUT", b"{}"),
                    ("PATCH", b"{}"),
                ):
                    # Even the entry gateway's own admin token does not travel to another node.
                    headers = {
                        "Content-Type": "application/json",
                        "X-OCF-Admin-Token": token,
                        "Authorization": f"Bearer {token}",
                    }
                    status, _, answer = await raw_request(gateway.gateway_url, method, target, headers, body)
                    statuses[status] = statuses.get(status, 0) + 1
                    assert status in (400, 401, 403, 405), (gateway, method, target, status, answer)
                    if status == 403:
                        assert error_code(answer) == "remote_forbidden"
        after = victim.table.own_entry()
        assert _services(after) == ["llm"] and after.get("status") == before.get("status")
        assert after["service"] == before["service"]
        assert _services(dispatcher.table.entries()[peer]) == ["llm"]  # nothing withdrawn network-wide
        assert statuses.get(200, 0) == 0 and statuses[400] > 0 and statuses[403] > 0


async def test_a_withdrawn_service_is_republished(node_config):
    async with running_mock_llm(["m1"]) as mock, network(node_config, mock) as (dispatcher, victim):
        async with httpx.AsyncClient(
            base_url=victim.gateway_url, headers={"X-OCF-Admin-Token": victim.admin_token}
        ) as operator:
            r = await operator.delete("/v1/dnt/_node")
            assert r.status_code == 200
        with trio.fail_after(10):  # the registrar notices its entry lost the service and writes it again
            while _services(victim.table.own_entry()) != ["llm"]:
                await victim.table.wait_changed()
        peer = str(victim.peer_id)
        with trio.fail_after(20):
            while _services(dispatcher.table.entries().get(peer) or {}) != ["llm"]:
                await dispatcher.table.wait_changed()


async def test_an_update_over_the_record_cap_is_413_and_later_updates_still_spread(node_config):
    async with running_mock_llm(["m1"]) as mock, network(node_config, mock) as (dispatcher, victim):
        async with httpx.AsyncClient(
            base_url=victim.gateway_url, headers={"X-OCF-Admin-Token": victim.admin_token}
        ) as operator:
            for size in (600 * 1024, 40 * 1024):
                r = await operator.post(
                    "/v1/dnt/_node",
                    content=json.dumps({"hardware": {"x": "a" * size}}),
                    headers={"Content-Type": "application/json"},
                )
                assert r.status_code == 413 and r.json()["error"]["code"] == "entry_too_large"
            assert len(victim.table.record(victim.peer_id).doc) < victim.config.nodetable_max_doc_bytes // 2
            r = await operator.post("/v1/dnt/_node", json={"role": ["legit"]})
            assert r.status_code == 200
        peer = str(victim.peer_id)
        with trio.fail_after(20):
            while (dispatcher.table.entries().get(peer) or {}).get("role") != ["legit"]:
                await dispatcher.table.wait_changed()
