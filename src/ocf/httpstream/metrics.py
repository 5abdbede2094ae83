"""Prometheus families for one HTTP server's connections, read from its :class:`~.admission.ServerStats` when scraped.

Plain counters updated by the server, turned into metric families only on
a scrape (as the gateway's own metrics are): nothing on the request path
takes a lock or looks up a labelled child.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .admission import ServerStats


class HttpServerCollector(Collector):
    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        gate = self.stats.gate
        if gate is not None:
            open_ = GaugeMetricFamily(
                "ocf_http_connections",
                "Open connections on the gateway port, by how they were admitted.",
                labels=["admission"],
            )
            open_.add_metric(["normal"], gate.open)
            open_.add_metric(["reserve"], gate.reserve_open)
            yield open_
            yield GaugeMetricFamily(
                "ocf_http_connection_cap",
                "The connection cap in force (--http.max-connections, fitted to the descriptor limit).",
                value=gate.cap,
            )
            yield CounterMetricFamily(
                "ocf_http_connections_refused",
                "Connections closed on accept: every connection busy and the reserve full.",
                value=gate.refused,
            )
            yield CounterMetricFamily(
                "ocf_http_connections_evicted",
                "Idle connections closed to make room for a new one at the cap.",
                value=gate.evicted,
            )
            yield CounterMetricFamily(
                "ocf_http_accept_errors",
                "accept() failures for lack of descriptors or memory (EMFILE, ENFILE...).",
                value=gate.accept_errors,
            )
        refusals = CounterMetricFamily(
            "ocf_http_refusals",
            "Requests the HTTP engine answered itself (status and code) or connections it ended (write_timeout).",
            labels=["reason"],
        )
        for reason, count in sorted(self.stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
