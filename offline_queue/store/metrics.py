"""What /metrics shows, read from the store on every scrape: a handful of GROUP BY queries, no
row of a batch loaded. Workers are short-lived processes, so nothing they hold in memory could
be scraped; the store already holds every fact an operator alerts on.

Request rows are live work (queued, processing); result rows are what is done, one per line,
never deleted and never rewritten: counts and sums over them only ever grow, which is what a
Prometheus counter is. An ended batch's rows are added up once (store/totals.py), so what a
scrape reads grows with the running batches, not with the history (bench/scrape.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from offline_queue.states import TERMINAL_STATUSES, RequestState
from offline_queue.store import clock, gpu_time, loops, totals
from offline_queue.store.db import session
from offline_queue.store.loops import LOOP_LOST_SECONDS, LOOP_STALE_SECONDS
from offline_queue.store.tables import Batch, Request, ServingLoop


@dataclass
class Snapshot:
    """One scrape's figures. Keys are label tuples."""

    batches: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(status, tier, tenant) → batches; tenant is "" for CLI batches."""
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(tier, state, served model) → live requests: pending (queued) and processing; the model is
    "" for a batch run on an engine given by name."""
    results: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(batch, tier, outcome, error code) → result rows; outcome completed | failed."""
    oldest_pending_age: dict[str, float] = field(default_factory=dict)
    """tier → seconds the oldest pending request's batch has waited (store clock)."""
    late: dict[tuple[str], int] = field(default_factory=dict)
    """(tier,) → unfinished batches whose run estimated they finish after their window
    (`late_at`, offline_queue/eta.py)."""
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tier, direction) → tokens; direction prompt | completion."""
    latency: dict[str, tuple[list[int], int, float]] = field(default_factory=dict)
    """model version → (cumulative counts per bucket, count, sum ms) of answered requests."""
    loops: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(route, node, serving | draining) → live serving loops."""
    lost_loops: dict[tuple[str, str], int] = field(default_factory=dict)
    """(route, node) → loops that stopped beating in the last LOOP_LOST_SECONDS without leaving."""
    loop_versions: set[str] = field(default_factory=set)
    """Model versions the live loops serve."""
    pending: dict[tuple[str, str], int] = field(default_factory=dict)
    """(route, tier) → requests of unfinished batches still to serve: what an autoscaler
    follows (a route with pending work and no loop needs a node)."""
    unserved: dict[tuple[str], int] = field(default_factory=dict)
    """(route,) → batches waiting because no live loop serves their route."""
    engine_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    """(tenant, tier) → engine-seconds used; tenant is "" for CLI batches."""
    engine_requests: dict[tuple[str], int] = field(default_factory=dict)
    """(engine,) → requests it answered; the engine is its key (a URL and model, or a folder)."""
    engine_errors: dict[tuple[str], int] = field(default_factory=dict)
    """(engine,) → requests it failed, any code."""
    engine_busy: dict[tuple[str], float] = field(default_factory=dict)
    """(engine,) → engine-seconds of every batch it served."""


def snapshot(db: str) -> Snapshot:
    """One scrape: ended batches not added up yet are first (store/totals.py), then every
    figure is read in one transaction."""
    totals.roll_up(db)
    out = Snapshot()
    tenant = func.coalesce(Batch.tenant, "")
    with session(db, readonly=True) as s:
        now = float(s.execute(select(clock.now())).scalar_one())
        for status, tier, who, n, late in s.execute(
            select(
                Batch.status, Batch.tier, tenant, func.count(), func.count(Batch.late_at)
            ).group_by(Batch.status, Batch.tier, tenant)
        ):
            out.batches[(status, tier, who)] = int(n)
            if late and status not in TERMINAL_STATUSES:
                out.late[(tier,)] = out.late.get((tier,), 0) + int(late)
        model = func.coalesce(Batch.served_model, "")
        live = (
            select(
                Batch.tier,
                Request.state,
                model,
                func.count(),
                func.min(Batch.created_at),
            )
            .join(Batch, Batch.id == Request.batch_id)
            .where(Request.state.in_([RequestState.QUEUED, RequestState.PROCESSING]))
            .group_by(Batch.tier, Request.state, model)
        )
        for tier, state, served, n, oldest in s.execute(live):
            name = "pending" if state == RequestState.QUEUED else "processing"
            out.requests[(tier, name, served)] = int(n)
            if name == "pending" and oldest is not None:
                age = max(0.0, now - float(oldest))
                out.oldest_pending_age[tier] = max(age, out.oldest_pending_age.get(tier, 0.0))
        for t in totals.every_batch(s):
            key = (t.batch_id, t.tier, "completed" if t.ok else "failed", t.code)
            out.results[key] = out.results.get(key, 0) + t.results
            for direction, value in (
                ("prompt", t.prompt_tokens),
                ("completion", t.completion_tokens),
            ):
                k = (t.tier, direction)
                out.tokens[k] = out.tokens.get(k, 0) + value
            if t.timed:
                buckets, count, total = out.latency.get(
                    t.model_version, ([0] * len(t.buckets), 0, 0.0)
                )
                summed = [a + b for a, b in zip(buckets, t.buckets, strict=True)]
                out.latency[t.model_version] = (summed, count + t.timed, total + t.latency_ms)
        for route, node, draining, version, n in s.execute(
            select(
                ServingLoop.route,
                ServingLoop.node,
                ServingLoop.draining,
                ServingLoop.model_version,
                func.count(),
            )
            .where(ServingLoop.heartbeat > now - LOOP_STALE_SECONDS)
            .group_by(
                ServingLoop.route, ServingLoop.node, ServingLoop.draining, ServingLoop.model_version
            )
        ):
            where = (route, node, "draining" if draining else "serving")
            out.loops[where] = out.loops.get(where, 0) + int(n)
            if version:
                out.loop_versions.add(version)
        for route, node, n in s.execute(
            select(ServingLoop.route, ServingLoop.node, func.count())
            .where(
                ServingLoop.heartbeat <= now - LOOP_STALE_SECONDS,
                ServingLoop.heartbeat > now - LOOP_LOST_SECONDS,
            )
            .group_by(ServingLoop.route, ServingLoop.node)
        ):
            out.lost_loops[(route, node)] = int(n)
        for route, tier, n in loops.pending_in(s):
            out.pending[(route, tier)] = n
        for route, n in s.execute(
            select(func.coalesce(Batch.route, ""), func.count())
            .where(Batch.waiting_reason.is_not(None), Batch.status.not_in(TERMINAL_STATUSES))
            .group_by(Batch.route)
        ):
            out.unserved[(route,)] = int(n)
        out.engine_seconds = gpu_time.seconds_by_tenant_tier(s)
        for engine, spent in gpu_time.by_engine(s).items():
            out.engine_requests[(engine,)] = spent.requests
            out.engine_errors[(engine,)] = spent.errors
            out.engine_busy[(engine,)] = spent.seconds
    return out
