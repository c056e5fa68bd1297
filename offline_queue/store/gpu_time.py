"""The `engine_time` rows: the engine-seconds each served chunk used (offline_queue/gpu_time.py),
summed per batch (the batch object, `status`), per tenant over a window (`offline-queue gpu-time`)
and per tenant and tier for /metrics. Rows are written in the chunk's settle
(store/claims.py), in the same transaction as its results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from offline_queue.gpu_time import EngineUse
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, EngineTime


def record(s: Session, batch_id: str, used: EngineUse, loop: str | None = None) -> None:
    """One chunk's engine use by `loop`, in the caller's transaction, stamped by the store's
    clock (a `gpu-time` window compares stamps written on many nodes)."""
    s.execute(
        insert(EngineTime).values(
            batch_id=batch_id,
            engine_key=used.engine_key,
            seconds=used.seconds,
            requests=used.requests,
            errors=used.errors,
            at=clock.now(),
            loop=loop,
        )
    )


def batch_seconds(db: str, batch_id: str) -> float:
    return batches_seconds(db, [batch_id])


def batches_seconds(db: str, batch_ids: Sequence[str]) -> float:
    """The engine-seconds of some batches together (a release track's)."""
    with session(db, readonly=True) as s:
        return float(
            s.scalar(
                select(func.coalesce(func.sum(EngineTime.seconds), 0.0)).where(
                    EngineTime.batch_id.in_(list(batch_ids))
                )
            )
            or 0.0
        )


@dataclass(frozen=True)
class BatchGpuTime:
    tenant: str
    """"" for batches run from the CLI (they have no tenant)."""
    batch_id: str
    tier: str
    model_version: str
    status: str
    engine_seconds: float
    chunks: int


def per_batch(
    db: str, tenant: str | None = None, within: float | None = None
) -> list[BatchGpuTime]:
    """Engine-seconds per batch used in the last `within` seconds (by the store's clock), of
    one tenant or of all; the batches that used the most first."""
    who = func.coalesce(Batch.tenant, "")
    total = func.sum(EngineTime.seconds)
    query = (
        select(
            who,
            Batch.id,
            Batch.tier,
            func.coalesce(Batch.model_version, ""),
            Batch.status,
            total,
            func.count(),
        )
        .join(Batch, Batch.id == EngineTime.batch_id)
        .group_by(who, Batch.id, Batch.tier, Batch.model_version, Batch.status)
        .order_by(total.desc(), Batch.id)
    )
    if tenant is not None:
        query = query.where(who == tenant)
    if within is not None:
        query = query.where(EngineTime.at >= clock.now() - within)
    with session(db, readonly=True) as s:
        return [
            BatchGpuTime(t, b, tier, m, st, float(sec), int(n))
            for t, b, tier, m, st, sec, n in s.execute(query)
        ]


@dataclass(frozen=True)
class EngineTotals:
    chunks: int
    requests: int
    errors: int
    seconds: float


def by_engine(s: Session) -> dict[str, EngineTotals]:
    """engine key → what every chunk it served adds up to: counters for /metrics."""
    rows = s.execute(
        select(
            EngineTime.engine_key,
            func.count(),
            func.sum(EngineTime.requests),
            func.sum(EngineTime.errors),
            func.sum(EngineTime.seconds),
        ).group_by(EngineTime.engine_key)
    )
    return {
        key: EngineTotals(int(n), int(req or 0), int(err or 0), float(sec or 0.0))
        for key, n, req, err, sec in rows
    }


def seconds_by_tenant_tier(s: Session) -> dict[tuple[str, str], float]:
    """(tenant, tier) → engine-seconds ever used: a counter for /metrics (rows only grow)."""
    who = func.coalesce(Batch.tenant, "")
    rows = s.execute(
        select(who, Batch.tier, func.sum(EngineTime.seconds))
        .join(Batch, Batch.id == EngineTime.batch_id)
        .group_by(who, Batch.tier)
    )
    return {(t, tier): float(sec or 0.0) for t, tier, sec in rows}


class ChunkRow(NamedTuple):
    id: int
    seconds: float
    requests: int
    errors: int
    at: float
    loop: str | None


def last_chunk(db: str, batch_id: str) -> int:
    """The id of the batch's last served chunk row (0: none yet)."""
    with session(db, readonly=True) as s:
        return int(
            s.scalar(select(func.max(EngineTime.id)).where(EngineTime.batch_id == batch_id)) or 0
        )


def chunks_after(db: str, batch_id: str, after_id: int) -> list[ChunkRow]:
    """The batch's served chunks recorded after row `after_id`, in order: what its run shows as
    infer-chunk task runs."""
    with session(db, readonly=True) as s:
        rows = s.execute(
            select(
                EngineTime.id,
                EngineTime.seconds,
                EngineTime.requests,
                EngineTime.errors,
                EngineTime.at,
                EngineTime.loop,
            )
            .where(EngineTime.batch_id == batch_id, EngineTime.id > after_id)
            .order_by(EngineTime.id)
        ).all()
    return [ChunkRow(*row) for row in rows]
