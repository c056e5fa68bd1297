"""The serving loop: one engine, loaded once for the loop's life, kept full from the one queue. It
claims the next chunk on its route whenever the engine has room, still looks for more urgent
work every POLL_SECONDS while full, and serves each chunk on a thread of its own (cache, engine,
one settle). Why, and a loop's life (drain, death): docs/scheduling.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from offline_queue.cache import ResultCache
from offline_queue.engines.base import Engine, Overlap
from offline_queue.heartbeat import Heartbeat
from offline_queue.leases import LeaseKeeper
from offline_queue.serving import ChunkFault, ChunkReport, serve_claim
from offline_queue.store import claims, loops

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often an idle loop looks for work."""
MAX_CHUNKS = 8
"""Chunks in hand at most, whatever the engine says about room."""


class _Beat(Heartbeat):
    what = "loop-heartbeat"

    def __init__(self, loop: ServingLoop):
        self.loop = loop
        super().__init__(loops.LOOP_BEAT_SECONDS)

    def beat(self) -> None:
        lp = self.loop
        if loops.beat(lp.db, lp.id, lp.chunks, lp.requests):
            lp.drain()

    def leave(self) -> None:
        loops.leave(self.loop.db, self.loop.id)


class ServingLoop:
    """Serves `route` with `engine` until drained or stopped (`run`, or `start` on a thread)."""

    def __init__(
        self,
        db: str,
        engine: Engine,
        route: str,
        *,
        chunk_size: int = 256,
        lease_seconds: float = 60.0,
        devices: str | None = None,
        on_chunk: Callable[[str, ChunkReport], None] | None = None,
    ):
        self.db, self.engine, self.route = db, engine, route
        self.chunk_size, self.devices, self.on_chunk = chunk_size, devices, on_chunk
        self.id = claims.new_owner()
        self.keeper = LeaseKeeper(db, lease_seconds)
        self.cache = ResultCache(db, engine.model_version)
        self.chunks = self.requests = 0
        self._draining = threading.Event()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def drain(self) -> None:
        """Claim nothing more; `run` returns once what is held is settled."""
        self._draining.set()
        self._changed.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start(self) -> ServingLoop:
        """`run` on a daemon thread (a one-machine run, the API's own loop)."""
        self._thread = threading.Thread(target=self.serve, name="serving-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve(self) -> None:
        """`run`, started again a second after a failure — the store restarting when the loop
        joins, say (what it held goes back to the queue when its leases run out) — until it is
        drained. What a node's loop process and `start` run."""
        while not self.draining:
            try:
                self.run()
            except Exception as exc:
                self.failure = exc
                log.exception("serving loop %s failed; starting it again", self.id)
                time.sleep(1.0)

    def run(self) -> None:
        self.keeper = LeaseKeeper(self.db, self.keeper.lease_seconds)  # a thread starts once
        loops.join(
            self.db,
            self.id,
            socket.gethostname(),
            self.route,
            self.devices,
            self.engine.model_version,
        )
        beat = _Beat(self)
        self.keeper.start()
        beat.start()
        held: dict[Future[ChunkReport | None], tuple[Overlap, int]] = {}
        pool = ThreadPoolExecutor(MAX_CHUNKS, thread_name_prefix="chunk")
        urgent_at = 0.0
        try:
            while not self.draining:
                in_hand = list(held.values())
                if len(in_hand) < MAX_CHUNKS:
                    waiting = [rank for overlap, rank in in_hand if not overlap.room.is_set()]
                    if not waiting:  # the engine has room
                        if self._claim_one(pool, held):
                            continue
                        self._changed.wait(POLL_SECONDS)  # idle: look again soon
                        self._changed.clear()
                        continue
                    # Full: only work more urgent than the least urgent chunk that waits in it.
                    worst = max(waiting)
                    if worst > 1 and time.monotonic() >= urgent_at:
                        if self._claim_one(pool, held, max_rank=worst - 1):
                            continue
                        urgent_at = time.monotonic() + POLL_SECONDS
                self._changed.wait(0.05)
                self._changed.clear()
            for future in list(held):
                future.result()
        finally:
            pool.shutdown(wait=True)
            try:
                self.cache.flush()
            finally:
                self.keeper.stop()
                beat.stop()

    def _claim_one(
        self,
        pool: ThreadPoolExecutor,
        held: dict[Future[ChunkReport | None], tuple[Overlap, int]],
        max_rank: int | None = None,
    ) -> bool:
        try:
            claim = claims.claim_next(
                self.db,
                self.id,
                self.chunk_size,
                self.keeper.lease_seconds,
                routes=[self.route],
                model_version=self.engine.model_version,
                max_rank=max_rank,
            )
        except Exception as exc:  # the store is restarting, or busy: look again in a moment
            log.warning("serving loop %s could not claim: %s", self.id, exc)
            time.sleep(1.0)
            return False
        if claim is None:
            return False
        overlap = Overlap()
        future = pool.submit(self._serve, claim, overlap)
        held[future] = (overlap, claim.tier.rank)

        def settled(f: Future[ChunkReport | None]) -> None:
            held.pop(f, None)
            self._changed.set()

        future.add_done_callback(settled)
        return True

    def _serve(self, claim: claims.Claim, overlap: Overlap) -> ChunkReport | None:
        try:
            with self.keeper.holding(claim.token):
                report = serve_claim(self.db, claim, self.engine, self.cache, overlap)
        except ChunkFault as exc:  # handed back to the queue, retried by whoever claims it
            log.warning("chunk of %s: %s; back in the queue", claim.batch_id, exc)
            time.sleep(1.0)
            return None
        except Exception:  # the store went away mid-settle: the lease runs out, the chunk returns
            log.exception("chunk of %s failed; its lease will run out", claim.batch_id)
            time.sleep(1.0)
            return None
        finally:
            overlap.room.set()
        self.chunks += 1
        self.requests += report.claimed
        if self.on_chunk is not None:
            self.on_chunk(claim.batch_id, report)
        return report


def devices_here() -> str | None:
    """The GPUs this process may use, as the loop row shows them."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
