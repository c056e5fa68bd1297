"""The heartbeat that keeps this worker's claims alive while it works on them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from offline_queue.store import claims

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of the claims in hand every `lease_seconds / 3`.

    A chunk can take longer than one lease (a slow engine, a long generation) and still be
    ours; a worker killed with -9 stops renewing, and its chunk is claimed again within one
    lease. That is what bounds resume waste to one chunk per worker.
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
