"""Prometheus metrics for offline-queue: a custom collector that reads the store on each scrape
(offline_queue/store/metrics.py).

Why the store and not process-local metrics: the processes that do the work (a run, a shard
on a worker) live for one batch and are gone before the next scrape; a pushgateway would keep
their last value forever and double-count a retried run. The store already has every fact:
live request rows for the gauges, and result rows — one per line, never rewritten — whose
counts, token sums and latency buckets only grow, so they are exposed as counters (and the
latency as a histogram) and `rate()` works on them. Any number of API servers or
`offline-queue metrics serve` processes can expose the same numbers.

Every metric name is listed in README.md (Metrics).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from offline_queue.store.metrics import LATENCY_BUCKETS_MS, snapshot

PREFIX = "offline_queue"


class StoreCollector(Collector):
    def __init__(self, db: str):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.db)
        batches = GaugeMetricFamily(
            f"{PREFIX}_batches",
            "Batches by status, tier and tenant.",
            labels=["status", "tier", "tenant"],
        )
        for key, n in sorted(snap.batches.items()):
            batches.add_metric(list(key), n)
        yield batches
        requests = GaugeMetricFamily(
            f"{PREFIX}_requests",
            "Live requests by tier: pending (queued) and processing.",
            labels=["tier", "state"],
        )
        for req, n in sorted(snap.requests.items()):
            requests.add_metric(list(req), n)
        yield requests
        age = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the batch of the oldest pending request, per tier (store clock).",
            labels=["tier"],
        )
        for tier, seconds in sorted(snap.oldest_pending_age.items()):
            age.add_metric([tier], seconds)
        yield age
        results = CounterMetricFamily(
            f"{PREFIX}_results",
            "Result rows: completed and failed requests, by batch, tier and error code.",
            labels=["batch", "tier", "outcome", "code"],
        )
        for res, n in sorted(snap.results.items()):
            results.add_metric(list(res), n)
        yield results
        tokens = CounterMetricFamily(
            f"{PREFIX}_tokens",
            "Tokens of result rows by tier: prompt (in), completion (out).",
            labels=["tier", "direction"],
        )
        for tok, n in sorted(snap.tokens.items()):
            tokens.add_metric(list(tok), n)
        yield tokens
        latency = HistogramMetricFamily(
            f"{PREFIX}_request_latency_seconds",
            "Engine latency of answered requests, by model version.",
            labels=["model"],
        )
        for model, (buckets, count, total_ms) in sorted(snap.latency.items()):
            pairs = [
                (str(b / 1000), float(c)) for b, c in zip(LATENCY_BUCKETS_MS, buckets, strict=True)
            ]
            latency.add_metric([model], [*pairs, ("+Inf", float(count))], total_ms / 1000)
        yield latency
        seats = GaugeMetricFamily(
            f"{PREFIX}_gpu_seats",
            "Shards holding or waiting for a GPU, per gpu: limit.",
            labels=["gpu_limit", "state"],
        )
        for seat, n in sorted(snap.seats.items()):
            seats.add_metric(list(seat), n)
        yield seats


def registry(db: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(db))
    return reg
