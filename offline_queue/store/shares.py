"""The `engine_shares` table: one row per batch and worker using a shared engine, kept alive
by a heartbeat. What a worker's share is, given the live rows, is offline_queue/shares.py's
business; this module only writes and reads the rows.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import EngineShare

LiveShare = tuple[str, str, int, int]
"""(batch_id, owner, tier, weight) of a live row."""


def beat(
    db: str,
    engine_key: str,
    batch_id: str,
    owner: str,
    tier: int,
    weight: int,
    stale_seconds: float,
) -> list[LiveShare]:
    """Refresh our row; return everyone live on this engine (us included).

    The beat is stamped and its staleness judged by the store's clock, so a worker whose own
    clock is off neither counts the others as gone nor keeps counting a dead one."""
    now = clock.now()
    with session(db) as s:
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        insert = dialect.insert(EngineShare).values(
            engine_key=engine_key,
            batch_id=batch_id,
            owner=owner,
            tier=tier,
            weight=weight,
            heartbeat=now,
        )
        s.execute(
            insert.on_conflict_do_update(
                index_elements=["engine_key", "batch_id", "owner"],
                set_={"heartbeat": now, "tier": tier, "weight": weight},
            )
        )
        rows = s.execute(
            select(EngineShare.batch_id, EngineShare.owner, EngineShare.tier, EngineShare.weight)
            .where(EngineShare.engine_key == engine_key)
            .where(EngineShare.heartbeat > now - stale_seconds)
        ).all()
    return [(b, o, t, w) for b, o, t, w in rows]


def leave(db: str, engine_key: str, batch_id: str, owner: str) -> None:
    """Delete our row: the others' shares grow at their next beat, not after the stale time."""
    with session(db) as s:
        s.execute(
            delete(EngineShare).where(
                EngineShare.engine_key == engine_key,
                EngineShare.batch_id == batch_id,
                EngineShare.owner == owner,
            )
        )
