"""The transport resource manager on ``/metrics``: usage, limits and refusals.

Labels are the scope kind and the resource, never a peer ID or an address,
so an attacker with many identities or addresses cannot grow the number of
series. Per-peer and per-address usage is shown as the largest current
value over all peers (addresses), which is what an operator checks against
the per-peer (per-address) limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..node import Node


class TransportCollector(Collector):
    """Reads the host's :class:`~ocf.transport.resources.ResourceManager` at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        usage = GaugeMetricFamily(
            "ocf_transport_resource_usage",
            "Transport resources in use, by scope (system; peer_max and ip_max: the largest over live peers/addresses) and resource.",
            labels=["scope", "resource"],
        )
        limits = GaugeMetricFamily(
            "ocf_transport_resource_limit",
            "Configured transport budgets, by scope kind and resource.",
            labels=["scope", "resource"],
        )
        refusals = CounterMetricFamily(
            "ocf_transport_refusals",
            "Reservations the transport refused, by scope kind and resource or reason.",
            labels=["scope", "resource"],
        )
        scopes = GaugeMetricFamily(
            "ocf_transport_scopes", "Live resource-manager scopes, by kind (peer, ip).", labels=["kind"]
        )
        host = self.node.host
        rm = getattr(host, "resources", None)
        if rm is not None:
            system = rm.usage()
            for resource in (
                "handshakes",
                "conns_inbound",
                "conns_outbound",
                "streams_inbound",
                "streams_outbound",
                "memory",
            ):
                usage.add_metric(["system", resource], system[resource])
            for kind in ("peer", "ip"):
                for resource, value in rm.max_usage(kind).items():
                    usage.add_metric([f"{kind}_max", resource], value)
            scopes.add_metric(["peer"], system["peers"])
            scopes.add_metric(["ip"], system["ips"])
            for scope, resource, value in rm.limits_by_scope():
                limits.add_metric([scope, resource], value)
            for (scope, resource), value in list(rm.refusals.items()):
                refusals.add_metric([scope, resource], value)
        yield usage
        yield limits
        yield refusals
        yield scopes


class NatCollector(Collector):
    """Relay service, relay client, AutoNAT and hole punching counters (labels: fixed reasons only)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        nat = getattr(self.node, "nat", None)
        if nat is None:
            return
        reach = GaugeMetricFamily(
            "ocf_nat_reachability",
            "1 for this node's reachability as AutoNAT or --reachability says.",
            labels=["value"],
        )
        for value in ("public", "private", "unknown"):
            reach.add_metric([value], 1 if nat.reachability == value else 0)
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
        parts = [("relay_client", nat.client), ("autonat", nat.autonat), ("dcutr", nat.holepunch)]
        if nat.service is not None:
            parts.append(("relay", nat.service))
        for name, part in parts:
            if part is None:
                continue
            for event, value in list(part.stats.items()):
                events.add_metric([name, event], value)
            for reason, value in list(part.refused.items()):
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
