"""Who gets a node's GPUs: shards of every batch on the node hold one GPU each or wait for one,
urgent tiers first, and a holder of a lower tier hands its GPU over at a chunk boundary.

Why a table of seats beside Prefect's global concurrency limit: the limit is what holds a GPU
(a shard serves only inside its slot, and the slot is leased, so a dead shard's GPU comes back)
but it is neither first-come-first-served nor aware of tiers — a blocked acquirer sleeps a
delay the server suggests (up to 30 s for a long-held slot) and whoever retries first wins. So
every shard keeps a row at its node's limit (batch, tier, holding or waiting, since when) and
every shard computes the same `plan` from the live rows:

- free GPUs go to waiters in order of tier, then of waiting time: a waiter of a lower tier
  never takes a GPU while one of a higher tier waits (it does not even ask the limit);
- each waiter left over takes one holder of a strictly lower tier as the one to yield — the
  lowest tier first, the most recent holder among equals — so only as many holders yield as
  there are higher-tier waiters that no free GPU serves; a holder learns it is one at its next
  chunk boundary, releases its slot there (nothing is killed: its chunk is committed) and waits
  again, as a waiter of its own tier, to come back when a GPU frees.

What bounds the starvation of bulk work: a bulk shard yields only to a higher-tier shard that
is waiting at the same node, and that shard serves a finite batch (the critical and standard
work queues have concurrency limits); once no higher-tier shard waits, the free GPU is the bulk
shard's again, first come first served among its tier. Bulk work waits while urgent work is
queued, by design, and never longer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from offline_queue.heartbeat import Heartbeat
from offline_queue.store import slots as seat_rows
from offline_queue.store.slots import SeatRow


@dataclass(frozen=True)
class Plan:
    granted: frozenset[str] = field(default_factory=frozenset)
    """Waiters that may take a free GPU now."""
    yielding: frozenset[str] = field(default_factory=frozenset)
    """Holders that hand their GPU to a waiting higher tier at their next chunk boundary."""


def plan(seats: Iterable[SeatRow], gpus: int) -> Plan:
    """What every shard at one node's `gpus` does next, from the live seats (see the module)."""
    seats = list(seats)
    holders = [s for s in seats if s.holding]
    waiters = sorted((s for s in seats if not s.holding), key=lambda s: (s.tier, s.since, s.shard))
    # Lowest tier first, then the most recent holder.
    candidates = sorted(holders, key=lambda s: (-s.tier, -s.since, s.shard))
    free = max(gpus - len(holders), 0)
    granted: set[str] = set()
    yielding: set[str] = set()
    for waiter in waiters:
        if free > 0:
            granted.add(waiter.shard)
            free -= 1
            continue
        victim = next(
            (h for h in candidates if h.tier > waiter.tier and h.shard not in yielding), None
        )
        if victim is None:  # the waiters after this one are of its tier or lower: none either
            break
        yielding.add(victim.shard)
    return Plan(frozenset(granted), frozenset(yielding))


class Seat(Heartbeat):
    """One shard's row at a node's GPUs, beating every `interval` seconds from a thread of its
    own while it lives (a chunk may take minutes), and looked at afresh when the shard asks."""

    what = "gpu-seat"

    def __init__(
        self,
        db: str,
        limit: str,
        gpus: int,
        shard: str,
        batch_id: str,
        tier: int,
        interval: float = 2.0,
        stale_seconds: float = 20.0,
    ):
        self.db, self.limit, self.gpus, self.shard = db, limit, gpus, shard
        self.batch_id, self.tier = batch_id, tier
        self.stale_seconds = stale_seconds
        self.holding = False
        self.since = seat_rows.now(self.db)
        self._lock = threading.Lock()
        super().__init__(interval)

    def look(self) -> Plan:
        """Beat, and the plan over the live seats."""
        return plan(self._beat_rows(), self.gpus)

    def _beat_rows(self) -> list[SeatRow]:
        with self._lock:
            return seat_rows.beat(
                self.db,
                self.limit,
                self.shard,
                self.batch_id,
                self.tier,
                self.holding,
                self.since,
                self.stale_seconds,
            )

    def may_take(self) -> bool:
        return self.shard in self.look().granted

    def stuck(self) -> bool:
        """Waiting, with every GPU here held by shards of our tier or a higher one: nothing
        here will be handed to us before one of them ends (a batch's own shards, say)."""
        rows = self._beat_rows()
        return self.shard not in plan(rows, self.gpus).granted and not any(
            r.holding and r.tier > self.tier for r in rows
        )

    def must_yield(self) -> bool:
        return self.shard in self.look().yielding

    def set_holding(self, holding: bool) -> None:
        """Now holding a GPU, or waiting again (the wait counts from now)."""
        self.holding, self.since = holding, seat_rows.now(self.db)
        self.look()

    def beat(self) -> Plan:
        return self.look()

    def leave(self) -> None:
        seat_rows.leave(self.db, self.limit, self.shard)
