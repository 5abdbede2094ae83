"""``GET /metrics``: Prometheus text from a registry owned by one gateway app.

Each app gets its own :class:`prometheus_client.CollectorRegistry`: many
nodes run in one process in tests, and a module-level (global) registry
would mix their numbers and refuse duplicate metric names.

The gateway's own numbers are plain dictionaries turned into metric
families only when ``/metrics`` is scraped (:class:`_GatewayCollector`).
``prometheus_client``'s metric objects take a lock and look up a labelled
child on every update; the gateway updates several per forwarded request,
on the path every request through the network pays for twice, while a
scrape comes every few seconds at most.
"""

from __future__ import annotations

import bisect
import collections

from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from quart import Blueprint, Response, current_app


blueprint = Blueprint("metrics", __name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: Providers remembered with an in-flight count of 0 (so the series stays at 0 rather than vanishing).
MAX_PROVIDERS = 10_000


class _Histogram:
    """Counts per bucket (not cumulative) and the sum, as a Prometheus histogram needs."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value


class GatewayMetrics:
    """The gateway's metrics: plain counters here, exposed through :attr:`registry`.

    Other subsystems' collectors (the transport, the node table, the tracker)
    join :attr:`registry` when the node mounts them (:meth:`add_collectors`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: (route, method, status) -> requests answered.
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: (kind, outcome) -> forwarded exchanges.
        self.forwards: collections.Counter[tuple[str, str]] = collections.Counter()
        #: kind -> time from choosing a provider to its response head.
        self.latencies: dict[str, _Histogram] = {}
        #: provider peer ID -> requests this gateway has in flight there (the forwarder counts here).
        self.in_flight: dict[str, int] = {}
        self.registry.register(_GatewayCollector(self))

    def add_collectors(self, collectors: Iterable[Collector]) -> None:
        for collector in collectors:
            self.registry.register(collector)

    def count_request(self, route: str, method: str, status: str) -> None:
        self.requests[route, method, status] += 1

    def count_forward(self, kind: str, outcome: str) -> None:
        self.forwards[kind, outcome] += 1

    def observe_latency(self, kind: str, seconds: float) -> None:
        histogram = self.latencies.get(kind)
        if histogram is None:
            histogram = self.latencies[kind] = _Histogram()
        histogram.observe(seconds)

    def enter(self, provider: str) -> None:
        """One more request in flight at ``provider``."""
        in_flight = self.in_flight
        if len(in_flight) >= MAX_PROVIDERS and provider not in in_flight:
            for peer in [p for p, n in in_flight.items() if n == 0]:
                del in_flight[peer]
        in_flight[provider] = in_flight.get(provider, 0) + 1

    def leave(self, provider: str) -> None:
        """That request is done (the provider stays listed, at 0 if nothing else is in flight)."""
        self.in_flight[provider] = max(0, self.in_flight.get(provider, 1) - 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GatewayCollector(Collector):
    """Turns :class:`GatewayMetrics`' counters into metric families at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        m = self.metrics
        requests = CounterMetricFamily(
            "ocf_http_requests",
            "HTTP requests answered by the gateway, by route template, method and status.",
            labels=["route", "method", "status"],
        )
        for labels, value in list(m.requests.items()):
            requests.add_metric(list(labels), value)
        yield requests
        latency = HistogramMetricFamily(
            "ocf_forward_latency_seconds",
            "Time from choosing a provider to its response head, by hop kind (service, p2p, backend).",
            labels=["kind"],
        )
        for kind, histogram in list(m.latencies.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), histogram.counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([kind], buckets, histogram.total)
        yield latency
        forwards = CounterMetricFamily(
            "ocf_forwards",
            "Forwarded exchanges by hop kind and outcome (ok, retry, failed).",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), value in list(m.forwards.items()):
            forwards.add_metric([kind, outcome], value)
        yield forwards
        in_flight = GaugeMetricFamily(
            "ocf_forward_in_flight",
            "Requests this gateway currently has in flight at each provider (peer ID).",
            labels=["provider"],
        )
        for provider, value in list(m.in_flight.items()):
            in_flight.add_metric([provider], value)
        yield in_flight


@blueprint.get("/metrics")
async def metrics() -> Response:
    gateway_metrics: GatewayMetrics = current_app.extensions["ocf.metrics"]
    return Response(gateway_metrics.render(), content_type=CONTENT_TYPE_LATEST)
