"""Prometheus metrics for offline-queue: a collector that reads the store on each scrape
(store/metrics.py), so any API server or `metrics serve` shows the same figures, every known
tier, state and served model at 0 when idle. Names: docs/operator-guide.md (Metrics); why the
store: docs/ARCHITECTURE.md (`offline_queue/metrics.py`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import product

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from offline_queue.catalog import DEFAULT_CATALOG, Catalog
from offline_queue.states import Tier
from offline_queue.store.metrics import Snapshot, snapshot
from offline_queue.store.totals import LATENCY_BUCKETS_MS

log = logging.getLogger(__name__)

PREFIX = "offline_queue"
TIERS = tuple(t.value for t in Tier)


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
        "Live requests by tier and served model: pending (queued) and processing.",
        ["tier", "state", "model"],
        "requests",
    ),
    (
        "batches_late",
        GaugeMetricFamily,
        "Unfinished batches whose run estimated they finish after their completion window.",
        ["tier"],
        "late",
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
        "serving_loops_lost",
        GaugeMetricFamily,
        "Serving loops that stopped beating in the last hour without leaving (a crash, a killed "
        "process or node; a loop stopped on purpose leaves).",
        ["route", "node"],
        "lost_loops",
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


def zeros(snap: Snapshot, models: Iterable[str]) -> dict[str, set[tuple[str, ...]]]:
    """The label values each family shows at 0 when the store has nothing to count: every tier,
    state and direction, every served model (the catalog's and the live batches'), and every
    route and node a loop or a waiting batch names. Not per tenant or batch: those come and go."""
    models = {*models, *(model for _, _, model in snap.requests)}
    nodes: set[tuple[str, ...]] = {(route, node) for route, node, _ in snap.loops}
    nodes |= set(snap.lost_loops)
    routes = {route for route, _ in nodes} | {route for route, _ in snap.pending}
    routes |= {route for (route,) in snap.unserved}
    return {
        "requests": set(product(TIERS, ("pending", "processing"), models)),
        "late": set(product(TIERS)),
        "tokens": set(product(TIERS, ("prompt", "completion"))),
        "loops": {(*where, state) for where, state in product(nodes, ("serving", "draining"))},
        "lost_loops": nodes,
        "pending": set(product(routes, TIERS)),
        "unserved": set(product(routes)),
    }


def served_names(catalog: Callable[[], Catalog]) -> list[str]:
    """The served models' names; the bundled ones when the catalog cannot be read (a Prefect
    server down must not take every figure off /metrics with it)."""
    try:
        return [model.name for model in catalog().models]
    except Exception:
        log.warning(
            "the catalog could not be read: /metrics shows the bundled models", exc_info=True
        )
        return [model.name for model in DEFAULT_CATALOG.models]


NAMES_SECONDS = 60.0
"""How long the served models' names are reused between scrapes: the catalog is read through
the Prefect API, whose retries must not hold up every scrape."""


class StoreCollector(Collector):
    def __init__(self, db: str, catalog: Callable[[], Catalog]):
        self.db, self.catalog = db, catalog
        self._names: list[str] = []
        self._names_at = -NAMES_SECONDS

    def served(self) -> list[str]:
        if time.monotonic() - self._names_at >= NAMES_SECONDS:
            self._names, self._names_at = served_names(self.catalog), time.monotonic()
        return self._names

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.db)
        known = zeros(snap, self.served())
        for name, kind, doc, labels, field in FAMILIES:
            family = kind(f"{PREFIX}_{name}", doc, labels=labels)
            counts: dict[tuple[str, ...], float] = dict.fromkeys(known.get(field, ()), 0)
            counts.update(getattr(snap, field))
            for key, n in sorted(counts.items()):
                family.add_metric(list(key), n)
            yield family
        age = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the batch of the oldest pending request, per tier (store clock).",
            labels=["tier"],
        )
        ages = dict.fromkeys(TIERS, 0.0) | snap.oldest_pending_age
        for tier, seconds in sorted(ages.items()):
            age.add_metric([tier], seconds)
        yield age
        latency = HistogramMetricFamily(
            f"{PREFIX}_request_latency_seconds",
            "Engine latency of answered requests, by model version.",
            labels=["model"],
        )
        unseen = {v: ([0] * len(LATENCY_BUCKETS_MS), 0, 0.0) for v in snap.loop_versions}
        for model, (buckets, count, total_ms) in sorted((unseen | snap.latency).items()):
            pairs = [
                (str(b / 1000), float(c)) for b, c in zip(LATENCY_BUCKETS_MS, buckets, strict=True)
            ]
            latency.add_metric([model], [*pairs, ("+Inf", float(count))], total_ms / 1000)
        yield latency


def registry(
    db: str, catalog: Callable[[], Catalog] = lambda: DEFAULT_CATALOG
) -> CollectorRegistry:
    """The store's figures for one scrape each; `catalog` names the served models shown at 0
    (blocks/catalog.py `catalog_here` where blocks may add some)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(db, catalog))
    return reg


@contextlib.contextmanager
def listener(
    db: str, host: str, port: int, catalog: Callable[[], Catalog] = lambda: DEFAULT_CATALOG
) -> Iterator[int]:
    """GET /metrics on HOST:PORT (prometheus_client's own server, on a thread of its own) until
    the block ends, then closed and its thread joined; yields the port (0 asks for a free one)."""
    server, thread = start_http_server(port, addr=host, registry=registry(db, catalog))
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
