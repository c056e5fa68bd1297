"""What a batch's finish-time estimate reads (offline_queue/eta.py): the live work that will be
served ahead of the batch's own, and its tier's recent throughput by the store's clock. The work
ahead is a count over the live request rows of the other unfinished batches (the claimable partial
index holds exactly those), which the flow spaces out (offline_queue/flows/waiting.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, false, func, select

from offline_queue.states import BatchStatus, Tier
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import LIVE, Batch, EngineTime, Request

RECENT_SECONDS = 300.0
"""How far back a tier's throughput is measured: long enough to span many chunks, short
enough to follow a change (a node added, a critical batch taking the GPUs)."""

_RUNNABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)


@dataclass(frozen=True)
class Outlook:
    now: float
    """The store's time, in epoch seconds: what `expires_at` is compared with."""
    urgent: int
    """Live requests of unfinished batches of more urgent tiers: served first, by preemption."""
    earlier: int
    """Live requests of unfinished batches of the same tier created before this one."""
    served: int
    """Requests of this batch its engines answered so far."""
    tier_requests: int
    """Requests the tier's engines answered in the last RECENT_SECONDS."""
    tier_seconds: float
    """From the first of those chunks to now."""


def outlook(db: str, batch_id: str, tier: str, created_at: int) -> Outlook:
    rank = Tier(tier).rank
    urgent_tiers = [t.value for t in Tier if t.rank < rank]
    with session(db, readonly=True) as s:
        now = float(s.execute(select(clock.now())).scalar_one())
        is_urgent = Batch.tier.in_(urgent_tiers) if urgent_tiers else false()
        row = s.execute(
            select(
                func.coalesce(func.sum(case((is_urgent, 1), else_=0)), 0),
                func.coalesce(
                    func.sum(case(((Batch.tier == tier) & (Batch.created_at < created_at), 1))),
                    0,
                ),
            )
            .select_from(Request)
            .join(Batch, Batch.id == Request.batch_id)
            .where(LIVE, Request.batch_id != batch_id, Batch.status.in_(_RUNNABLE))
        ).one()
        recent, first = s.execute(
            select(func.coalesce(func.sum(EngineTime.requests), 0), func.min(EngineTime.at))
            .join(Batch, Batch.id == EngineTime.batch_id)
            .where(Batch.tier == tier, EngineTime.at >= now - RECENT_SECONDS)
        ).one()
        served = s.scalar(
            select(func.coalesce(func.sum(EngineTime.requests), 0)).where(
                EngineTime.batch_id == batch_id
            )
        )
    return Outlook(
        now=now,
        urgent=int(row[0]),
        earlier=int(row[1]),
        served=int(served or 0),
        tier_requests=int(recent),
        tier_seconds=now - float(first) if first is not None else 0.0,
    )
