"""Client credentials stay at the entry gateway; API keys guard the service routes; providers use their own key."""

from __future__ import annotations

import contextlib

import httpx
import pytest
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node
from ocf.transport import MemoryNetwork

from ._router_echo import echo_backend

pytestmark = pytest.mark.timeout(60)

SECRETS = {
    "Authorization": "Bearer sk-client-secret",
    "Cookie": "session=client-cookie",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "X-OCF-Admin-Token": "client-admin-token",
}


@contextlib.asynccontextmanager
async def two_nodes(node_config, port: int, **entry_overrides):
    """An entry gateway and a provider whose ``echo`` service (with its own backend key) is the echo backend."""
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone", **entry_overrides), memory_network=net) as entry:
        service = ServiceSpec("echo", port, "127.0.0.1", api_key="provider-backend-key")
        config = node_config(mode="node", bootstrap_addrs=(str(entry.listen_addrs[0]),), services=(service,))
        async with open_node(config, memory_network=net) as provider:
            await provider.bootstrap.wait_connected()
            await provider.services.refresh()
            with trio.fail_after(20):
                while not any(
                    s.get("name") == "echo"
                    for s in (entry.table.entries().get(str(provider.peer_id)) or {}).get("service") or []
                ):
                    await entry.table.wait_changed()
            yield entry, provider


async def test_credentials_never_reach_a_provider_and_the_backend_gets_its_own_key(node_config):
    async with echo_backend() as (port, seen), two_nodes(node_config, port) as (entry, provider):
        async with httpx.AsyncClient(base_url=entry.gateway_url, timeout=30) as client:
            paths = ["/v1/service/echo/v1/x", f"/v1/p2p/{provider.peer_id}/v1/_service/echo/v1/y"]
            for path in paths:
                r = await client.post(path, json={"a": 1}, headers=SECRETS)
                assert r.status_code == 200, r.text
                assert "p2p" in path or r.headers["x-computing-node"] == str(provider.peer_id)
        assert len(seen) >= 2
        for request in seen:
            headers = request["headers"]
            assert (
                "cookie" not in headers and "proxy-authorization" not in headers and "x-ocf-admin-token" not in headers
            )
            assert headers.get("authorization") == "Bearer provider-backend-key"  # the provider's key, not the client's
        leaked = [
            h
            for request in seen
            for h in request["headers"].values()
            if any(s.split()[-1] in h for s in SECRETS.values())
        ]
        assert leaked == []


async def test_api_keys_guard_service_routes_with_openai_shaped_401(node_config, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nsk-from-file\n")
    async with (
        echo_backend() as (port, seen),
        two_nodes(node_config, port, api_keys=("sk-flag",), api_key_file=keys) as (entry, provider),
        httpx.AsyncClient(base_url=entry.gateway_url, timeout=30) as client,
    ):
        for path in ("/v1/service/echo/v1/x", f"/v1/p2p/{provider.peer_id}/v1/health", "/v1/_service/echo/v1/x"):
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-flag"}):
                r = await client.post(path, json={}, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
                error = r.json()["error"]
                assert error["type"] == "invalid_request_error" and error["code"] in (
                    "missing_api_key",
                    "invalid_api_key",
                )
        before = len(seen)
        for key in ("sk-flag", "sk-from-file"):
            r = await client.post("/v1/service/echo/v1/x", json={}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
            assert r.json()["headers"]["authorization"] == "Bearer provider-backend-key"
        assert len(seen) == before + 2  # refused requests reached no backend
        assert (await client.get("/v1/health")).status_code == 200  # the node's own reads need no key
