"""The heartbeats of a run: its claims stay alive while it works on them (LeaseKeeper), and
its batch shows an owner that is alive (OwnerHeartbeat)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from offline_queue.store import claims, owners

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of the claims in hand every `lease_seconds / 3`.

    A chunk can take longer than one lease (a slow engine, a long generation) and still be
    ours; a worker killed with -9 stops renewing, and its chunk is claimed again within one
    lease. That is what bounds resume waste to the chunks a worker has in hand: the one in its
    engine and the one claimed ahead of it (flows/chunks.py).
    """

    def __init__(self, db: str, lease_seconds: float):
        self.db = db
        self.lease_seconds = lease_seconds
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @contextmanager
    def holding(self, token: str) -> Iterator[None]:
        with self._lock:
            self._tokens.add(token)
        try:
            yield
        finally:
            with self._lock:
                self._tokens.discard(token)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            with self._lock:
                tokens = list(self._tokens)
            try:
                claims.renew_leases(self.db, tokens, self.lease_seconds)
            except Exception as exc:  # the store may be restarting: try again next beat
                log.warning("lease renewal failed: %s", exc)


class OwnerHeartbeat:
    """Owns a batch for one run and beats its heartbeat every `lease_seconds / 3`, from the
    run's start (before the engine loads: that can take minutes) to its end.

    A run killed with -9 stops beating, and `store.owners.reap_orphans` settles its batch
    once the owner has been silent for longer than a lease: whatever notices first (the next
    worker, the API, `status`) says why the batch stopped, instead of it staying `in_progress`.
    """

    def __init__(self, db: str, batch_id: str, owner: str, run_id: str | None, lease: float):
        self.db, self.batch_id, self.owner, self.run_id = db, batch_id, owner, run_id
        self.lease_seconds = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owner-heartbeat", daemon=True)

    def __enter__(self) -> OwnerHeartbeat:
        self._beat()  # owned (a batch failed by a lost run reopened) before anything runs
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> bool:
        return owners.take_ownership(
            self.db, self.batch_id, self.owner, self.run_id, self.lease_seconds
        )

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if not self._beat():
                    return  # the batch is over: nothing left to own
            except Exception as exc:  # the store may be restarting: try again next beat
                log.warning("batch heartbeat failed: %s", exc)
