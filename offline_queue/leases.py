"""The heartbeats of a run: its claims stay alive while it works on them (LeaseKeeper), and
its batch shows an owner that is alive (OwnerHeartbeat)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from offline_queue.heartbeat import Heartbeat
from offline_queue.store import claims, owners


class LeaseKeeper(Heartbeat):
    """Renews the leases of the claims in hand every `lease_seconds / 3`.

    A chunk can take longer than one lease (a slow engine, a long generation) and still be
    ours; a worker killed with -9 stops renewing, and its chunk is claimed again within one
    lease. That is what bounds resume waste to the chunks a worker has in hand: the one in its
    engine (offline_queue/loop.py).
    """

    what = "lease-keeper"

    def __init__(self, db: str, lease_seconds: float):
        self.db = db
        self.lease_seconds = lease_seconds
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(lease_seconds / 3)

    @contextmanager
    def holding(self, token: str) -> Iterator[None]:
        with self._lock:
            self._tokens.add(token)
        try:
            yield
        finally:
            with self._lock:
                self._tokens.discard(token)

    def beat(self) -> None:
        with self._lock:
            tokens = list(self._tokens)
        if tokens:
            claims.renew_leases(self.db, tokens, self.lease_seconds)


class OwnerHeartbeat(Heartbeat):
    """Owns a batch for one run and beats its heartbeat every `lease_seconds / 3`, from the
    run's start (before the engine loads: that can take minutes) to its end.

    A run killed with -9 stops beating, and `store.owners.reap_orphans` settles its batch
    once the owner has been silent for longer than a lease: whatever notices first (the next
    worker, the API, `status`) says why the batch stopped, instead of it staying `in_progress`.
    """

    what = "owner-heartbeat"

    def __init__(self, db: str, batch_id: str, owner: str, run_id: str | None, lease: float):
        self.db, self.batch_id, self.owner, self.run_id = db, batch_id, owner, run_id
        self.lease_seconds = lease
        super().__init__(lease / 3)

    def __enter__(self) -> OwnerHeartbeat:
        # The first beat owns the batch (a batch failed by a lost run reopens) before anything
        # runs on it.
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def beat(self) -> bool:
        """False once the batch is over: nothing left to own."""
        return owners.take_ownership(
            self.db, self.batch_id, self.owner, self.run_id, self.lease_seconds
        )
