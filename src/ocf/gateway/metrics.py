"""``GET /metrics``: Prometheus text from a registry owned by one gateway app.

Each app gets its own :class:`prometheus_client.CollectorRegistry`: many
nodes run in one process in tests, and a module-level (global) registry
would mix their numbers and refuse duplicate metric names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from quart import Blueprint, Response, current_app

if TYPE_CHECKING:
    from ..node import Node

blueprint = Blueprint("metrics", __name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """The gateway's metrics, all registered on :attr:`registry`."""

    def __init__(self, node: "Node") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ocf_http_requests", "HTTP requests answered by the gateway, by route template, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.forward_latency = Histogram(
            "ocf_forward_latency_seconds", "Time from choosing a provider to its response head, by hop kind (service, p2p, backend).",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.forwards = Counter(
            "ocf_forwards", "Forwarded exchanges by hop kind and outcome (ok, retry, failed).",
            ["kind", "outcome"], registry=self.registry,
        )
        self.in_flight = Gauge(
            "ocf_forward_in_flight", "Requests this gateway currently has in flight at each provider (peer ID).",
            ["provider"], registry=self.registry,
        )
        self.connected_peers = Gauge("ocf_connected_peers", "Peers with an open transport connection.", registry=self.registry)
        self.connected_peers.set_function(lambda: len(node.host.connected_peers()) if node.host is not None else 0)
        self._children: dict[tuple, object] = {}
        if node.jobs is not None:
            from ..jobs.metrics import TrackerCollector

            self.registry.register(TrackerCollector(node.jobs))

    # prometheus_client's .labels() takes a lock and builds a key on every call; the gateway
    # calls these on every request, so the children are looked up once and kept.
    def request_counter(self, route: str, method: str, status: str) -> Counter:
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route=route, method=method, status=status)
        return child

    def latency(self, kind: str) -> Histogram:
        key = ("latency", kind)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.forward_latency.labels(kind=kind)
        return child

    def forward_outcome(self, kind: str, outcome: str) -> Counter:
        key = ("forwards", kind, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.forwards.labels(kind=kind, outcome=outcome)
        return child

    def provider_in_flight(self, provider: str) -> Gauge:
        key = ("in_flight", provider)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 10_000:  # bounded: routes, kinds and providers are few
                self._children.clear()
            child = self._children[key] = self.in_flight.labels(provider=provider)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)


@blueprint.get("/metrics")
async def metrics():  # type: ignore[no-untyped-def]
    gateway_metrics: GatewayMetrics = current_app.extensions["ocf.metrics"]
    return Response(gateway_metrics.render(), content_type=CONTENT_TYPE_LATEST)
