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
            path = ("/v1/health", "/v1/service/llm/v1/models", f"/v1/no-such/{i}", "/v1/jobs/p/stats")[i % 4] + "/" * (i + 1)
            r = await client.get(path)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        after = len((await client.get("/metrics")).content)
        assert after - before < 2048, (before, after)
        assert statuses.get(400, 0) >= N - 4  # ever more trailing slashes: empty segments, refused
        labels = {route for route, _, _ in node.gateway.app.extensions["ocf.metrics"].requests}
        assert len(labels) <= 6, labels
