"""NAT traversal on ``/metrics``: reachability, relay usage, and every subsystem's events and refusals.

Labels are fixed names (subsystem, event, reason), never a peer or an
address, so hostile peers cannot grow the number of series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .nat import Nat


class NatCollector(Collector):
    """Reads the relay service, relay client, AutoNAT and DCUtR counters at scrape time."""

    def __init__(self, nat: Nat) -> None:
        self.nat = nat

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        nat = self.nat
        reach = GaugeMetricFamily(
            "ocf_nat_reachability",
            "1 for this node's reachability as AutoNAT or --reachability says.",
            labels=["value"],
        )
        for state in ("public", "private", "unknown"):
            reach.add_metric([state], 1 if nat.reachability == state else 0)
        yield reach
        events = CounterMetricFamily(
            "ocf_nat_events",
            "Relay, AutoNAT and hole-punching events by subsystem and outcome.",
            labels=["subsystem", "event"],
        )
        refused = CounterMetricFamily(
            "ocf_nat_refusals",
            "Requests the relay, the relay client, AutoNAT or DCUtR refused, by subsystem and reason.",
            labels=["subsystem", "reason"],
        )
        parts: list[tuple[str, dict[str, int], dict[str, int]]] = [
            ("relay_client", nat.client.stats, nat.client.refused)
        ]
        if nat.autonat is not None:
            parts.append(("autonat", nat.autonat.stats, nat.autonat.refused))
            if nat.autonat.v2 is not None:
                parts.append(("autonat_v2", nat.autonat.v2.stats, {}))
        if nat.holepunch is not None:
            parts.append(("dcutr", nat.holepunch.stats, nat.holepunch.refused))
        if nat.service is not None:
            parts.append(("relay", nat.service.stats, nat.service.refused))
        for name, stats, refusals in parts:
            for event, value in list(stats.items()):
                events.add_metric([name, event], value)
            for reason, value in list(refusals.items()):
                refused.add_metric([name, reason], value)
        yield events
        yield refused
        held = GaugeMetricFamily("ocf_relay_reservations_held", "Relays this node holds a reservation on.")
        held.add_metric([], len(nat.client.reservations))
        yield held
        if nat.service is not None:
            served = GaugeMetricFamily(
                "ocf_relay_service_usage", "With --relay: reservations and circuits in use.", labels=["resource"]
            )
            served.add_metric(["reservations"], len(nat.service.reservations))
            served.add_metric(["circuits"], nat.service.circuits_total)
            yield served
