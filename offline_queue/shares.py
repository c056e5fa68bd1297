"""Fair sharing of one engine between batches, across processes: strict by tier, proportional
by weight within a tier.

Every worker running a batch on a shared engine keeps a row alive in `engine_shares`
(heartbeat) and derives its own in-flight share from the live rows each beat. Nothing is
killed when a critical batch arrives: the bulk batches' shares shrink to their floor, and their
requests already in flight finish. A worker that dies stops beating and stops counting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from offline_queue.heartbeat import Heartbeat
from offline_queue.store import shares as share_rows

MAX_WEIGHT = 1000
"""The largest weight a batch can carry (the API refuses more, and a larger stored one counts as
this much): a weight is a share between a handful of batches, not a count."""


def _weight(p: Participant) -> int:
    """A weight in 1..MAX_WEIGHT whatever the store holds: 0 or less would divide by zero or
    take more than the engine has (another tenant's batch included)."""
    return min(max(int(p.weight), 1), MAX_WEIGHT)


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
    resumes at once when the tier above is done. Weights are clamped to 1..MAX_WEIGHT.
    """
    everyone = [p for p in active if (p.batch_id, p.owner) != (me.batch_id, me.owner)] + [me]
    best = min(p.tier for p in everyone)
    if me.tier > best:
        return floor
    top = [p for p in everyone if p.tier == best]
    workers = Counter(p.batch_id for p in top)
    total = sum(_weight(p) / workers[p.batch_id] for p in top)
    below = sum(1 for p in everyone if p.tier > best)
    room = max(capacity - below * floor, floor)
    return max(floor, min(room, round(room * (_weight(me) / workers[me.batch_id]) / total)))


class ShareKeeper(Heartbeat):
    """Beats every `interval` seconds and keeps `slots` current for the engine's limiter."""

    what = "share-keeper"

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
        self.capacity, self.stale_seconds = capacity, stale_seconds
        self.slots = capacity
        super().__init__(interval)

    def beat(self) -> int:
        me = self.me
        rows = share_rows.beat(
            self.db, self.engine_key, me.batch_id, me.owner, me.tier, me.weight, self.stale_seconds
        )
        self.slots = slots_for(me, [Participant(*row) for row in rows], self.capacity)
        return self.slots

    def leave(self) -> None:
        share_rows.leave(self.db, self.engine_key, self.me.batch_id, self.me.owner)

    def __call__(self) -> int:
        """The slots of the last beat: a failed beat keeps them."""
        return self.slots
