"""The DHT on ``/metrics``: routing-table size and what the DHT did and refused.

Labels are event names from a fixed set (:attr:`Dht.stats` keys), never a
peer ID, so hostile peers cannot grow the number of series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import Dht


class DhtCollector(Collector):
    """Reads a :class:`~ocf.dht.service.Dht`'s counters at scrape time."""

    def __init__(self, dht: Dht) -> None:
        self.dht = dht

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        peers = GaugeMetricFamily(
            "ocf_dht_routing_table_peers", "DHT servers in the routing table, by our role.", labels=["mode"]
        )
        peers.add_metric([self.dht.mode], len(self.dht.table))
        yield peers
        events = CounterMetricFamily(
            "ocf_dht_events",
            "DHT requests served and sent, lookups, and refusals (rate, size, streams, deadlines, bad replies).",
            labels=["event"],
        )
        for event, count in sorted(self.dht.stats.items()):
            events.add_metric([event], count)
        yield events
