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
        quic = getattr(host, "_quic", None)
        if quic is not None:
            datagrams = CounterMetricFamily(
                "ocf_quic_datagrams",
                "UDP datagrams of the QUIC endpoints, by what became of them (in, out, routed to a connection, "
                "dropped_* and refused_* for hostile or stray input, retries_sent, accepted connections...).",
                labels=["outcome"],
            )
            for name, value in sorted(quic.stats().items()):
                if not name.startswith("bytes_"):
                    datagrams.add_metric([name.removeprefix("datagrams_")], value)
            yield datagrams
