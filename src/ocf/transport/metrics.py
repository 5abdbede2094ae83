"""The transport on ``/metrics``: connected peers, the resource manager's usage, limits and refusals.

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
    from .host import Host


class TransportCollector(Collector):
    """Reads the host (its :class:`~ocf.transport.resources.ResourceManager` too) at scrape time.

    The node mounts it on the gateway's ``/metrics``; the gateway itself
    knows nothing of the transport's internals.
    """

    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        usage = GaugeMetricFamily(
            "ocf_transport_resource_usage",
            "Transport resources in use, by scope (system; peer_max and ip_max: the largest over live peers/addresses) "
            "and resource.",
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
        host = self.host
        yield GaugeMetricFamily(
            "ocf_connected_peers", "Peers with an open transport connection.", value=len(host.connected_peers())
        )
        stats = host.pnet_stats()
        if stats is not None:  # a private network (--network-key)
            pnet = CounterMetricFamily(
                "ocf_pnet_connections",
                "Connections under the private network key: protected (nonce sent), refused (peer without the key).",
                labels=["outcome"],
            )
            for outcome, value in stats.items():
                pnet.add_metric([outcome], value)
            yield pnet
        refused = CounterMetricFamily(
            "ocf_dial_refused",
            "Peer-published addresses the dial policy did not dial, by address category.",
            labels=["category"],
        )
        for category, value in sorted(host.dial_policy.refused.items()):
            refused.add_metric([category], value)
        yield refused
        rm = host.resources
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
        quic = host.quic_stats()
        if quic is not None:
            datagrams = CounterMetricFamily(
                "ocf_quic_datagrams",
                "UDP datagrams of the QUIC endpoints, by what became of them (in, out, routed to a connection, "
                "dropped_* and refused_* for hostile or stray input, retries_sent, accepted connections...).",
                labels=["outcome"],
            )
            for name, value in sorted(quic.items()):
                if not name.startswith("bytes_"):
                    datagrams.add_metric([name.removeprefix("datagrams_")], value)
            yield datagrams
