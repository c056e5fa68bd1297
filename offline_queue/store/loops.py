"""The serving loops' rows: who serves which route, alive by their heartbeat, and asked to drain;
and what waits for them — the queue's pending work per route and tier."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import LIVE, Batch, Request, ServingLoop

LOOP_STALE_SECONDS = 10.0
"""A loop silent this long no longer serves its route (it beats every LOOP_BEAT_SECONDS)."""
LOOP_BEAT_SECONDS = 2.0
LOOP_LOST_SECONDS = 3600.0
"""A loop that stopped beating without leaving (a crash, a killed node: one that stops on purpose
deletes its row) is counted lost on /metrics for this long after its last beat, then forgotten."""


def join(
    db: str, loop_id: str, node: str, route: str, devices: str | None, model_version: str
) -> None:
    """The loop's row, new (a loop started again after a failure may find its old one)."""
    with session(db) as s:
        s.execute(delete(ServingLoop).where(ServingLoop.id == loop_id))
        s.execute(
            insert(ServingLoop).values(
                id=loop_id,
                node=node,
                route=route,
                devices=devices,
                model_version=model_version,
                started_at=clock.now(),
                heartbeat=clock.now(),
                draining=False,
                chunks=0,
                requests=0,
            )
        )


def beat(db: str, loop_id: str, chunks: int, requests: int) -> bool:
    """The loop is alive and has served so much; True when it is asked to drain (or its row
    is gone: a loop taken for dead by the others claims nothing more)."""
    with session(db) as s:
        draining = s.execute(
            update(ServingLoop)
            .where(ServingLoop.id == loop_id)
            .values(heartbeat=clock.now(), chunks=chunks, requests=requests)
            .returning(ServingLoop.draining)
        ).scalar()
    return draining is None or bool(draining)


def leave(db: str, loop_id: str) -> None:
    with session(db) as s:
        s.execute(delete(ServingLoop).where(ServingLoop.id == loop_id))


def drain(db: str, node: str | None = None) -> int:
    """Ask the live loops of `node` (None: every node) to finish what they hold and stop."""
    with session(db) as s:
        q = update(ServingLoop).where(ServingLoop.heartbeat > clock.now() - LOOP_STALE_SECONDS)
        if node is not None:
            q = q.where(ServingLoop.node == node)
        return int(s.execute(q.values(draining=True)).rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LoopRow:
    id: str
    node: str
    route: str
    devices: str | None
    model_version: str | None
    draining: bool
    chunks: int
    requests: int
    age: float
    """Seconds since its last beat."""


def live_loops(db: str) -> list[LoopRow]:
    """Every loop whose heartbeat is fresh, by route and node."""
    with session(db, readonly=True) as s:
        rows = s.execute(
            select(
                ServingLoop.id,
                ServingLoop.node,
                ServingLoop.route,
                ServingLoop.devices,
                ServingLoop.model_version,
                ServingLoop.draining,
                ServingLoop.chunks,
                ServingLoop.requests,
                clock.now() - ServingLoop.heartbeat,
            )
            .where(ServingLoop.heartbeat > clock.now() - LOOP_STALE_SECONDS)
            .order_by(ServingLoop.route, ServingLoop.node, ServingLoop.id)
        ).all()
    return [LoopRow(*row) for row in rows]


def serves(db: str, route: str) -> bool:
    """Whether a live loop that is not draining serves `route`."""
    with session(db, readonly=True) as s:
        return bool(
            s.scalar(
                select(func.count()).where(
                    ServingLoop.route == route,
                    ServingLoop.heartbeat > clock.now() - LOOP_STALE_SECONDS,
                    ServingLoop.draining.is_(False),
                )
            )
        )


def pending_in(s: Session) -> list[tuple[str, str, int]]:
    """(route, tier, requests still to serve) over the unfinished batches, in the caller's
    session: what an autoscaler follows (`worker loops`, /metrics)."""
    rows = s.execute(
        select(func.coalesce(Batch.route, ""), Batch.tier, func.count())
        .join(Request, Request.batch_id == Batch.id)
        .where(Batch.status.not_in(TERMINAL_STATUSES), LIVE)
        .group_by(Batch.route, Batch.tier)
    ).all()
    return [(route, tier, int(n)) for route, tier, n in rows]


def pending(db: str) -> list[tuple[str, str, int]]:
    with session(db, readonly=True) as s:
        return pending_in(s)
