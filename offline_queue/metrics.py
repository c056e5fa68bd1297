"""Prometheus metrics for offline-queue: a custom collector that reads the store on each scrape
(offline_queue/store/metrics.py).

Why the store and not process-local metrics: the processes that do the work (a batch's run,
a node's serving loops) come and go and are gone before the next scrape; a pushgateway would keep
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

from offline_queue.store.metrics import snapshot
from offline_queue.store.totals import LATENCY_BUCKETS_MS

PREFIX = "offline_queue"


# name, kind, help, labels, the snapshot's field: one row per labelled family of counts.
Family = tuple[str, type[GaugeMetricFamily | CounterMetricFamily], str, list[str], str]
FAMILIES: tuple[Family, ...] = (
    (
        "batches",
        GaugeMetricFamily,
        "Batches by status, tier and tenant.",
        ["status", "tier", "tenant"],
        "batches",
    ),
    (
        "requests",
        GaugeMetricFamily,
        "Live requests by tier: pending (queued) and processing.",
        ["tier", "state"],
        "requests",
    ),
    (
        "results",
        CounterMetricFamily,
        "Result rows: completed and failed requests, by batch, tier and error code.",
        ["batch", "tier", "outcome", "code"],
        "results",
    ),
    (
        "tokens",
        CounterMetricFamily,
        "Tokens of result rows by tier: prompt (in), completion (out).",
        ["tier", "direction"],
        "tokens",
    ),
    (
        "engine_seconds",
        CounterMetricFamily,
        "GPU time used, in engine-seconds (offline_queue/gpu_time.py), by tenant and tier.",
        ["tenant", "tier"],
        "engine_seconds",
    ),
    (
        "engine_requests",
        CounterMetricFamily,
        "Requests each engine answered (from the chunks it served).",
        ["engine"],
        "engine_requests",
    ),
    (
        "engine_errors",
        CounterMetricFamily,
        "Requests each engine failed, any code (by code per tier: offline_queue_results_total).",
        ["engine"],
        "engine_errors",
    ),
    (
        "engine_busy_seconds",
        CounterMetricFamily,
        "Engine-seconds each engine served, all batches together.",
        ["engine"],
        "engine_busy",
    ),
    (
        "serving_loops",
        GaugeMetricFamily,
        "Live serving loops (one engine each) by route, node and state (serving, draining).",
        ["route", "node", "state"],
        "loops",
    ),
    (
        "pending_requests",
        GaugeMetricFamily,
        "Requests of unfinished batches still to serve, by route and tier: what to scale on.",
        ["route", "tier"],
        "pending",
    ),
    (
        "batches_unserved",
        GaugeMetricFamily,
        "Batches waiting because no live serving loop serves their route.",
        ["route"],
        "unserved",
    ),
)


class StoreCollector(Collector):
    def __init__(self, db: str):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.db)
        for name, kind, doc, labels, field in FAMILIES:
            family = kind(f"{PREFIX}_{name}", doc, labels=labels)
            counts: dict[tuple[str, ...], float] = getattr(snap, field)
            for key, n in sorted(counts.items()):
                family.add_metric(list(key), n)
            yield family
        age = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the batch of the oldest pending request, per tier (store clock).",
            labels=["tier"],
        )
        for tier, seconds in sorted(snap.oldest_pending_age.items()):
            age.add_metric([tier], seconds)
        yield age
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


def registry(db: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(db))
    return reg
