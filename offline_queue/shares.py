"""Fair sharing of one engine between batches, across processes: strict by tier, proportional
by weight within a tier.

Every worker running a batch on a shared engine keeps a row alive in `engine_shares`
(heartbeat) and derives its own in-flight share from the live rows each beat. Nothing is
killed when a critical batch arrives: the bulk batches' shares shrink to their floor, and their
requests already in flight finish. A worker that dies stops beating and stops counting.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

from offline_queue.store import shares as share_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Participant:
    batch_id: str
    owner: str
    tier: int
    """The batch's Tier.rank: 1 is the most urgent."""
    weight: int


def slots_for(me: Participant, active: list[Participant], capacity: int, floor: int = 1) -> int:
    """This worker's in-flight slots out of `capacity`.

    Only the best tier present shares the engine, in proportion to weight (a batch's weight is
    split between its workers); every batch below it keeps `floor` slots so it still moves and
    resumes at once when the tier above is done.
    """
    everyone = [p for p in active if (p.batch_id, p.owner) != (me.batch_id, me.owner)] + [me]
    best = min(p.tier for p in everyone)
    if me.tier > best:
        return floor
    top = [p for p in everyone if p.tier == best]
    workers = Counter(p.batch_id for p in top)
    total = sum(p.weight / workers[p.batch_id] for p in top)
    below = sum(1 for p in everyone if p.tier > best)
    room = max(capacity - below * floor, floor)
    return max(floor, round(room * (me.weight / workers[me.batch_id]) / total))


class ShareKeeper:
    """Beats every `interval` seconds and keeps `slots` current for the engine's limiter."""

    def __init__(
        self,
        db: str,
        engine_key: str,
        me: Participant,
        capacity: int,
        interval: float = 1.0,
        stale_seconds: float = 10.0,
    ):
        self.db, self.engine_key, self.me = db, engine_key, me
        self.capacity, self.interval, self.stale_seconds = capacity, interval, stale_seconds
        self.slots = capacity
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="share-keeper", daemon=True)

    def refresh(self) -> int:
        me = self.me
        rows = share_rows.beat(
            self.db, self.engine_key, me.batch_id, me.owner, me.tier, me.weight, self.stale_seconds
        )
        self.slots = slots_for(me, [Participant(*row) for row in rows], self.capacity)
        return self.slots

    def start(self) -> ShareKeeper:
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            share_rows.leave(self.db, self.engine_key, self.me.batch_id, self.me.owner)
        except Exception as exc:  # a stale row stops counting by itself
            log.warning("could not leave the engine share table: %s", exc)

    def __call__(self) -> int:
        return self.slots

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception as exc:
                log.warning("share refresh failed (keeping %d slots): %s", self.slots, exc)
