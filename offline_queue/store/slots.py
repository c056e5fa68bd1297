"""The `gpu_seats` table: one row per shard holding or waiting for a node's GPU, kept alive by
a heartbeat. Who holds, who waits and who hands over is offline_queue/slots.py's business; this
module only writes and reads the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import GpuSeat


def now(db: str) -> float:
    """The store's time: every node's shards compare their heartbeats and waiting times, so
    they are stamped and judged on one clock."""
    with session(db, readonly=True) as s:
        return float(s.execute(select(clock.now())).scalar_one())


@dataclass(frozen=True)
class SeatRow:
    shard: str
    batch_id: str
    tier: int
    holding: bool
    since: float


def beat(
    db: str,
    limit: str,
    shard: str,
    batch_id: str,
    tier: int,
    holding: bool,
    since: float,
    stale_seconds: float,
) -> list[SeatRow]:
    """Write our row (state and heartbeat); return every live seat at these GPUs, ours too."""
    stamp = clock.now()  # the store's time, in the statement
    with session(db) as s:
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        values = {"batch_id": batch_id, "tier": tier, "holding": holding, "since": since}
        s.execute(
            dialect.insert(GpuSeat)
            .values(gpu_limit=limit, shard=shard, heartbeat=stamp, **values)
            .on_conflict_do_update(
                index_elements=["gpu_limit", "shard"], set_={"heartbeat": stamp, **values}
            )
        )
        rows = s.execute(
            select(GpuSeat.shard, GpuSeat.batch_id, GpuSeat.tier, GpuSeat.holding, GpuSeat.since)
            .where(GpuSeat.gpu_limit == limit, GpuSeat.heartbeat > stamp - stale_seconds)
            .order_by(GpuSeat.shard)
        ).all()
    return [SeatRow(*row) for row in rows]


def leave(db: str, limit: str, shard: str) -> None:
    """Delete our row: a waiter sees the seat free at its next look, not after the stale time."""
    with session(db) as s:
        s.execute(delete(GpuSeat).where(GpuSeat.gpu_limit == limit, GpuSeat.shard == shard))


@dataclass(frozen=True)
class BatchShards:
    """A batch's live shards: serving (holding a GPU) and waiting for one."""

    running: int = 0
    waiting: int = 0


def batch_shards(db: str, batch_id: str, stale_seconds: float = 30.0) -> BatchShards:
    with session(db, readonly=True) as s:
        rows = s.execute(
            select(GpuSeat.holding, func.count())
            .where(GpuSeat.batch_id == batch_id, GpuSeat.heartbeat > clock.now() - stale_seconds)
            .group_by(GpuSeat.holding)
        ).all()
    counts = {bool(holding): int(n) for holding, n in rows}
    return BatchShards(running=counts.get(True, 0), waiting=counts.get(False, 0))
