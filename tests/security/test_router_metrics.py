"""Metrics are labelled by route template, so odd paths cannot grow /metrics."""

from __future__ import annotations

import httpx
import pytest

from ocf.node import open_node

pytestmark = pytest.mark.timeout(120)

N = 3000


async def test_3000_odd_paths_do_not_grow_metrics(node_config):
    async with open_node(node_config(jobs=True)) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
        for path in ("/v1/health", "/v1/nothing", "/v1/service/llm/v1/models", "/v1/health//"):
            await client.get(path)  # every label these requests can produce exists before the baseline
        before = len((await client.get("/metrics")).content)
        statuses: dict[int, int] = {}
        for i in range(N):
            path = ("/v1/health", "/v1/service/llm/v1/models", f"/v1/no-such/{i}", "/v1/jobs/p/stats")[i % 4] + "/" * (
                i + 1
            )
            r = await client.get(path)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        after = len((await client.get("/metrics")).content)
        assert after - before < 2048, (before, after)
        assert statuses.get(400, 0) >= N - 4  # ever more trailing slashes: empty segments, refused
        labels = {route for route, _, _ in node.gateway.app.extensions["ocf.metrics"].requests}
        assert len(labels) <= 6, labels


async def test_made_up_peer_ids_do_not_grow_metrics(node_config):
    from ocf.identity import Identity

    peers = [str(Identity.from_seed(f"nobody-{i}").peer_id) for i in range(1000)]
    async with open_node(node_config()) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
        await client.get(f"/v1/p2p/{peers[0]}/v1/health")
        before = len((await client.get("/metrics")).content)
        for peer in peers:
            r = await client.get(f"/v1/p2p/{peer}/v1/health")
            assert r.status_code == 404 and r.json()["error"]["code"] == "peer_not_found"
        after = len((await client.get("/metrics")).content)
        assert after - before < 512, (before, after)
        assert len(node.gateway.app.extensions["ocf.metrics"].in_flight) == 0
