"""Prometheus view of the tracker: job counts per project, stage and state.

A custom collector reads the store's counters at scrape time (O(projects x
stages)), so nothing has to be updated on the hot path of claims and completions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .tracker import Tracker


class TrackerCollector(Collector):
    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "ocf_jobs", "Jobs of each project by stage and state.", labels=["project", "stage", "state"]
        )
        results = GaugeMetricFamily(
            "ocf_jobs_results", "Results (last-stage outputs) of each project.", labels=["project"]
        )
        store = self.tracker.store
        for project in store.projects():
            for stage, counts in zip(project.stages, store.counts(project.name), strict=True):
                for state, value in counts.items():
                    jobs.add_metric([project.name, stage.name, state], value)
            results.add_metric([project.name], store.result_count(project.name))
        yield jobs
        yield results
        yield GaugeMetricFamily(
            "ocf_jobs_waiting_claims",
            "Long-polling claims waiting for a job (idle workers).",
            value=self.tracker.waiting_claims,
        )
