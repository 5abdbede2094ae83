"""The gateway built on its own, from the few parts it uses: no node, no node table, no tracker.

The composition root (``ocf.node``) normally hands the gateway its parts; here
a test does, which is the point: the gateway serves what it is given and
imports none of the subsystems that usually mount routes on it.
"""

from __future__ import annotations

import httpx

from ocf.gateway.app import GatewayParts
from ocf.gateway.server import open_gateway
from ocf.identity import Identity
from ocf.ports import HttpMount, InternalService, LocalService


class _Services:
    """A registrar stand-in: one internal service, nothing healthy."""

    def lookup(self, name: str) -> LocalService | InternalService | None:
        return InternalService("jobs", "/v1/jobs") if name == "jobs" else None

    def names(self) -> list[str]:
        return ["jobs"]

    def status(self, name: str) -> str | None:
        return None

    def records(self) -> list[dict]:
        return []


async def test_a_gateway_without_mounts_serves_health_metrics_and_its_own_errors(node_config):
    config = node_config()
    identity = Identity.from_seed("parts")
    parts = GatewayParts(config, identity.peer_id, lambda: {"peer_id": str(identity.peer_id)}, services=_Services())
    async with open_gateway(parts) as gateway, httpx.AsyncClient(base_url=gateway.url) as client:
        health = await client.get("/v1/health")
        assert health.json() == {"status": "ok", "peer_id": str(identity.peer_id)}
        metrics = (await client.get("/metrics")).text
        assert "ocf_http_requests" in metrics and "ocf_nodetable_entries" not in metrics  # nothing mounted it
        # The router still knows the tracker's routes; with nothing mounted, Quart has no view: 404.
        jobs = await client.get("/v1/jobs")
        assert jobs.status_code == 404 and jobs.json()["error"]["code"] == "not_found"
        hot = await client.post("/v1/jobs/p/claim", json={})
        assert hot.status_code == 404
        missing = await client.get("/v1/_service/nope/x")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "service_not_found"
        assert missing.headers["x-ocf-error-code"] == "service_not_found"


async def test_a_mounted_collector_and_extension_reach_the_app(node_config):
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class One(Collector):
        def collect(self):
            yield GaugeMetricFamily("ocf_test_mounted", "A collector a mount brought.", value=1)

    config = node_config()
    identity = Identity.from_seed("parts2")
    mount = HttpMount(extensions={"ocf.test": 42}, collectors=(One(),))
    parts = GatewayParts(config, identity.peer_id, dict, mounts=(mount,))
    async with open_gateway(parts) as gateway, httpx.AsyncClient(base_url=gateway.url) as client:
        assert gateway.app.extensions["ocf.test"] == 42
        assert "ocf_test_mounted 1.0" in (await client.get("/metrics")).text
        assert gateway.admin_token  # created in the data directory on first start
