"""One worker on one batch: the live parts it keeps while it claims and serves chunks.

A worker holds three threads' worth of state besides its engine — the lease keeper (its
claims stay alive while it works), the result cache (answers written behind), and, on a
shared engine, the share keeper (its in-flight share by tier and weight). They start together
and must stop together, flushed, however the run ends: a context manager owns them.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import ClassVar

from offline_queue.cache import ResultCache
from offline_queue.engines.base import Engine, Overlap
from offline_queue.leases import LeaseKeeper
from offline_queue.serving import ChunkReport, serve_claim
from offline_queue.shares import Participant, ShareKeeper
from offline_queue.states import Tier
from offline_queue.store import claims


class ChunkWorker:
    """Claims chunks of one batch under a fresh owner id and serves them with `engine`.

    While entered, the worker is also found by `ChunkWorker.running(batch_id, owner)`: code
    that can carry only plain values (a Prefect task's parameters) reaches it by the same
    identity its leases and its share row carry in the store.
    """

    _running: ClassVar[dict[tuple[str, str], ChunkWorker]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        db: str,
        batch_id: str,
        engine: Engine,
        *,
        tier: str,
        weight: int,
        max_attempts: int,
        lease_seconds: float,
    ):
        self.db, self.batch_id, self.engine = db, batch_id, engine
        self.owner = claims.new_owner()
        self.participant = Participant(batch_id, self.owner, Tier(tier).rank, weight)
        self.max_attempts = max_attempts
        self.keeper = LeaseKeeper(db, lease_seconds)
        self.cache = ResultCache(db, engine.model_version)
        self.share: ShareKeeper | None = None
        self.overlaps: dict[str, Overlap] = {}
        """What the feed driving this worker (flows/chunks.py) and an engine that `overlaps`
        say about each chunk in hand, by the key the chunk's task is given."""

    @property
    def lease_seconds(self) -> float:
        return self.keeper.lease_seconds

    @classmethod
    def running(cls, batch_id: str, owner: str) -> ChunkWorker:
        """The entered worker of this process with that identity."""
        with cls._registry_lock:
            worker = cls._running.get((batch_id, owner))
        if worker is None:
            raise LookupError(f"no worker {owner} on batch {batch_id} runs in this process")
        return worker

    def __enter__(self) -> ChunkWorker:
        self.keeper.start()
        if self.engine.shared:
            share = ShareKeeper(
                self.db, self.engine.engine_key, self.participant, self.engine.capacity
            )
            try:
                share.start()
            except BaseException:
                self.keeper.stop()
                raise
            self.share = share
        with self._registry_lock:
            self._running[(self.batch_id, self.owner)] = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._registry_lock:
            self._running.pop((self.batch_id, self.owner), None)
        try:
            self.cache.flush()
        finally:
            self.keeper.stop()
            if self.share is not None:
                self.share.stop()

    def serve_next(self, chunk_size: int, overlap_key: str | None = None) -> ChunkReport | None:
        """Claim up to `chunk_size` requests, answer them (cache, then engine) and persist
        them in one transaction. None when nothing is claimable right now. A whole-chunk
        fault hands the chunk back and raises `serving.ChunkFault`."""
        overlap = self.overlaps.get(overlap_key or "") if self.engine.overlaps else None
        if overlap is not None and overlap.hand_back.is_set():  # too late to claim ahead
            return None
        claim = claims.claim(self.db, self.batch_id, self.owner, chunk_size, self.lease_seconds)
        if claim is None:
            return None
        with self.keeper.holding(claim.token):
            return serve_claim(
                self.db,
                self.batch_id,
                claim,
                self.engine,
                self.max_attempts,
                self.share,
                self.cache,
                overlap,
            )
