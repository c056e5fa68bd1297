"""Result rows added up for /metrics: a running batch at every scrape, an ended one once, into
`result_totals`, so a scrape costs the running batches' rows plus a few per ended batch, not the
whole history. A reopened batch's totals are forgotten in the transaction that reopens it, and
result rows are never deleted (the clean-up clears bodies), so the counters stay monotonic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson
from sqlalchemy import ColumnElement, case, delete, func, select, update
from sqlalchemy.orm import Session

from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import clock
from offline_queue.store.bulk import insert_ignoring_conflicts
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Result, ResultTotals

LATENCY_BUCKETS_MS: tuple[float, ...] = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
"""Upper bounds of the engine latency histogram, milliseconds (exposed in seconds)."""

ROLL_UP_PER_SCRAPE = 20
"""Ended batches added up by one scrape at most: a backlog of them (the first scrape after an
upgrade) is worked off over a few scrapes instead of making one of them slow."""


@dataclass(frozen=True)
class Totals:
    batch_id: str
    tier: str
    model_version: str
    ok: bool
    code: str
    results: int
    prompt_tokens: int
    completion_tokens: int
    timed: int
    latency_ms: float
    buckets: list[int]


_COLUMNS = tuple(Totals.__dataclass_fields__)
"""`result_totals`' columns, in the order of Totals' fields (the rows roll_up inserts)."""


def _added_up(s: Session, which: ColumnElement[bool]) -> Iterator[Totals]:
    """The result rows of the batches `which` selects, per batch, outcome and error code."""
    timed = Result.ok & Result.latency_ms.is_not(None)
    code = func.coalesce(Result.error_code, "")
    version = func.coalesce(Batch.model_version, "")
    buckets = [
        func.sum(case((timed & (Result.latency_ms <= bound), 1), else_=0))
        for bound in LATENCY_BUCKETS_MS
    ]
    rows = s.execute(
        select(
            Result.batch_id,
            Batch.tier,
            version,
            Result.ok,
            code,
            func.count(),
            func.coalesce(func.sum(Result.prompt_tokens), 0),
            func.coalesce(func.sum(Result.completion_tokens), 0),
            func.sum(case((timed, 1), else_=0)),
            func.coalesce(func.sum(case((timed, Result.latency_ms), else_=0.0)), 0.0),
            *buckets,
        )
        .join(Batch, Batch.id == Result.batch_id)
        .where(which)
        .group_by(Result.batch_id, Batch.tier, version, Result.ok, code)
    )
    for bid, tier, model, ok, err, n, prompt, completion, n_timed, latency, *counts in rows:
        yield Totals(
            bid,
            tier,
            model,
            bool(ok),
            "" if ok else err,
            int(n),
            int(prompt),
            int(completion),
            int(n_timed or 0),
            float(latency or 0.0),
            [int(c or 0) for c in counts],
        )


def roll_up(db: str, limit: int = ROLL_UP_PER_SCRAPE) -> int:
    """Add up the rows of up to `limit` ended batches not added up yet; how many it did. Two
    scrapers doing it at once write the same rows: the second's are ignored."""
    with session(db) as s:
        ids = list(
            s.scalars(
                select(Batch.id)
                .where(Batch.status.in_(list(TERMINAL_STATUSES)), Batch.totals_at.is_(None))
                .order_by(Batch.created_at)
                .limit(limit)
            )
        )
        if not ids:
            return 0
        rows = [
            tuple({**t.__dict__, "buckets": orjson.dumps(t.buckets).decode()}.values())
            for t in _added_up(s, Result.batch_id.in_(ids))
        ]
        insert_ignoring_conflicts(s.connection(), ResultTotals, _COLUMNS, rows)
        s.execute(
            update(Batch)
            .where(Batch.id.in_(ids), Batch.totals_at.is_(None))
            .values(totals_at=clock.now_seconds())
        )
    return len(ids)


def forget(s: Session, batch: Batch) -> None:
    """A reopened batch's totals go: it is added up live again (in the caller's transaction)."""
    if batch.totals_at is not None:
        s.execute(delete(ResultTotals).where(ResultTotals.batch_id == batch.id))
        batch.totals_at = None


def every_batch(s: Session) -> Iterator[Totals]:
    """The totals of every batch: ended ones from their rows, the others added up now."""
    for row in s.scalars(select(ResultTotals)):
        yield Totals(
            row.batch_id,
            row.tier,
            row.model_version,
            row.ok,
            row.code,
            row.results,
            row.prompt_tokens,
            row.completion_tokens,
            row.timed,
            row.latency_ms,
            list(orjson.loads(row.buckets)),
        )
    yield from _added_up(s, Batch.totals_at.is_(None))
