"""The node table's numbers as Prometheus metric families, built at scrape time from ``table.stats``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .table import NodeTable

REFUSALS = ("rate", "full", "stale")


def families(table: NodeTable | None) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    if table is None:
        return
    stats = table.stats
    yield GaugeMetricFamily("ocf_nodetable_entries", "Owners in the node table.", value=len(table.records))
    yield GaugeMetricFamily(
        "ocf_nodetable_max_entries",
        "Configured maximum of node table entries.",
        value=table.config.nodetable_max_entries,
    )
    refused = CounterMetricFamily(
        "ocf_nodetable_refused", "Records of new owners refused, by reason (rate, full, stale).", labels=["reason"]
    )
    for reason in REFUSALS:
        refused.add_metric([reason], stats["refused_" + reason])
    yield refused
    yield CounterMetricFamily(
        "ocf_nodetable_records_rejected", "Records that failed verification.", value=stats["records_rejected"]
    )
    yield CounterMetricFamily(
        "ocf_nodetable_pruned", "Owners forgotten after --stale-after without a sighting.", value=stats["pruned"]
    )
    yield CounterMetricFamily(
        "ocf_nodetable_evicted", "Stale owners evicted to make room for a new one.", value=stats["evicted"]
    )
    beats = CounterMetricFamily(
        "ocf_nodetable_heartbeats", "Owner-signed heartbeats, by outcome (accepted, rejected).", labels=["outcome"]
    )
    beats.add_metric(["accepted"], stats["heartbeats_accepted"])
    beats.add_metric(["rejected"], stats["heartbeats_rejected"])
    yield beats
    yield CounterMetricFamily(
        "ocf_nodetable_verify_deferred",
        "Signature checks put off because the sending peer's or the node's verify budget was spent.",
        value=stats["deferred_verify"],
    )
    yield CounterMetricFamily(
        "ocf_nodetable_deferred_unknown_owner",
        "Relayed records of owners membership has not heard of yet, put off until it has (they come again).",
        value=stats["deferred_unknown_owner"],
    )
    streams = CounterMetricFamily(
        "ocf_nodetable_streams_reset", "Inbound sync streams reset, by reason (limit, timeout).", labels=["reason"]
    )
    streams.add_metric(["limit"], stats["streams_refused"])
    streams.add_metric(["timeout"], stats["streams_timed_out"])
    yield streams
    yield CounterMetricFamily(
        "ocf_nodetable_offers_sent",
        "Record versions offered to peers instead of pushed whole.",
        value=stats["offers_sent"],
    )
    yield CounterMetricFamily(
        "ocf_nodetable_sends_paced",
        "Times a peer's requests for records outran --nodetable.new-owner-burst and waited for its rate.",
        value=stats["sends_paced"],
    )
    wants = CounterMetricFamily(
        "ocf_nodetable_wants",
        "Wants for offered records, by outcome (sent; retried: the next offerer was asked after a timeout;"
        " refused: too many unanswered).",
        labels=["outcome"],
    )
    wants.add_metric(["sent"], stats["wants_sent"])
    wants.add_metric(["retried"], stats["wants_retried"])
    wants.add_metric(["refused"], stats["wants_refused"])
    yield wants


class NodeTableCollector(Collector):
    """The node table's families on ``/metrics`` (mounted on the gateway by the node)."""

    def __init__(self, table: NodeTable) -> None:
        self.table = table

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return families(self.table)
