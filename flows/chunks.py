"""The chunk task, and the feed that keeps an engine busy across chunk boundaries.

A chunk is the unit of claiming, persisting and handing over: one task run claims it, answers
it and settles it in one transaction. Served one after the other, an engine drains at every
boundary: a chunk's last wave runs with fewer requests than the engine holds, and the next is
claimed only once the last answer is in. An engine that `overlaps` (both of ours) says when the
chunk in it leaves room — none of its requests waits to be started — and the feed then claims
the next chunk in a task run of its own. That chunk is fed into the engine only as the first
frees seats (vllm_steps.py; on a server, the worker's one in-flight limit), so the engine stays
full through the tail. At most two chunks are in hand.

At the boundary, if a higher tier waits for this GPU, the chunk claimed ahead is handed back:
what of it the engine has not started returns to the queue as it was (no try spent), what runs
finishes, and the slot goes over — within one chunk's time, as without the overlap. Otherwise
it becomes the lead, and the rest of it goes in at once. What it costs: a worker killed with -9
holds two chunks' leases instead of one (both are claimed again after a lease; the second had
only begun).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.tasks import exponential_backoff

from offline_queue.engines.base import Overlap
from offline_queue.serving import ChunkReport
from offline_queue.worker import ChunkWorker

POLL_SECONDS = 0.05


@task(
    name="infer-chunk",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def infer_chunk(
    batch_id: str, owner: str, chunk_size: int, overlap_key: str | None = None
) -> ChunkReport | None:
    """Claim a chunk, answer it (cache, then engine) and persist it in one transaction.
    None when nothing is claimable right now. A whole-chunk fault hands the chunk back and
    raises, and Prefect retries the task with backoff.

    The task is given the worker's identity, not the worker. A task's parameters are what its
    run records and shows — here the batch, the owner its leases carry in the store, and the
    chunk size — and what Prefect walks before each call (and would hash, with a cache
    policy); the live parts (lease keeper, result cache, share keeper, engine, the chunk's
    `Overlap` by its key) stay in this process's `ChunkWorker`, found by that identity. A
    bound method as the task would not do: Prefect passes the instance as a parameter."""
    report = ChunkWorker.running(batch_id, owner).serve_next(chunk_size, overlap_key)
    if report is None:
        return None
    s = report.settled
    get_run_logger().info(
        "chunk of %d: %d inferred, %d from cache; %d completed, %d failed, %d to retry%s",
        report.claimed,
        report.inferred,
        report.reused,
        s.completed,
        s.terminated,
        s.retried,
        (f", {s.handed_back} handed back unstarted" if s.handed_back else "")
        + (f", {s.lost} lost their lease" if s.lost else ""),
    )
    return report


class ChunkFeed:
    """The worker's chunks one report at a time, the next claimed early where the engine
    allows it and `may_claim_ahead()` says so (no higher tier waits for this GPU)."""

    def __init__(self, worker: ChunkWorker, chunk_size: int, may_claim_ahead: Callable[[], bool]):
        self.worker, self.chunk_size, self.may_claim_ahead = worker, chunk_size, may_claim_ahead
        self._keys = itertools.count()
        self._ahead: tuple[str, PrefectFuture[ChunkReport | None]] | None = None

    def next(self) -> ChunkReport | None:
        """The next chunk's report (None: nothing was claimable)."""
        if not self.worker.engine.overlaps:
            return infer_chunk(self.worker.batch_id, self.worker.owner, self.chunk_size)
        if self._ahead is not None:
            key, this = self._ahead
            self.worker.overlaps[key].lead.set()  # the one before is settled: all of it in
        else:
            key, this = self._submit(lead=True)
        self._ahead = None
        room = self.worker.overlaps[key].room
        done = threading.Event()  # not `this.state`: that asks the API each time
        this.add_done_callback(lambda _: done.set())
        while not done.wait(POLL_SECONDS):
            if self._ahead is None and room.is_set() and self.may_claim_ahead():
                self._ahead = self._submit(lead=False)
        try:
            return this.result()
        finally:
            self.worker.overlaps.pop(key, None)

    def hand_back(self) -> Iterator[ChunkReport]:
        """The chunk claimed ahead, at a hand-over: it starts nothing more, and its report
        (what it answered; the rest went back to the queue) once what runs has finished."""
        if self._ahead is None:
            return
        (key, ahead), self._ahead = self._ahead, None
        self.worker.overlaps[key].hand_back.set()
        try:
            report = ahead.result()
        finally:
            self.worker.overlaps.pop(key, None)
        if report is not None:
            yield report

    def _submit(self, lead: bool) -> tuple[str, PrefectFuture[ChunkReport | None]]:
        key = f"chunk-{next(self._keys)}"
        overlap = self.worker.overlaps[key] = Overlap()
        if lead:
            overlap.lead.set()
        w = self.worker
        return key, infer_chunk.submit(w.batch_id, w.owner, self.chunk_size, key)
