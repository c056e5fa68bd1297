"""What the batch flow's await rests on: the wait for the serving loops to serve the batch
(while its ingest runs beside), with cancel and expiry, the progress artifact, the chunk
records and the reason a batch waits; loops this process serves itself (`offline-queue run`,
the API); and the run's name and owner as the UI and the store show them. flows/batch.py is
the flow that uses them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from offline_queue.batch_object import FinishEstimate, RunStats
from offline_queue.batches import finish_estimate
from offline_queue.blocks.engines import load_engine_block
from offline_queue.flows.chunks import ChunkRecords
from offline_queue.loop import ServingLoop
from offline_queue.runs import BatchRun
from offline_queue.states import BatchStatus
from offline_queue.store import batches, loops, results
from offline_queue.store.db import patiently
from offline_queue.store.tables import Batch

log = logging.getLogger(__name__)

SERVE_HERE_ENV = "OFFLINE_QUEUE_SERVE_HERE"
"""Set by `offline-queue run` and the API: this process serves the batches it runs with loops
of its own (one per route), instead of waiting for a node's."""

PROGRESS_SECONDS = 2.0
"""How often a running batch's progress artifact is brought up to date (a count over the batch)
— at most: the count costs time in proportion to the batch, so the interval stretches to keep
it under PROGRESS_SHARE (1 %) of the worker's time."""
PROGRESS_SHARE = 0.01


def artifact_key(batch_id: str, what: str) -> str:
    return f"{batch_id}-{what}".replace("_", "-").lower()


WAIT_SECONDS = (0.25, 1.0)
"""How often a waiting run looks at its batch: at once after a change, backing off to a second
while nothing changes (a run per batch, and a node may run many)."""
OWN_WAIT_SECONDS = 5.0
"""The longest wait of a run served by this process's own loop, which wakes it as each chunk
settles: its looks held the interpreter lock for ~5 % of the engine's time at one a second."""
REASON_SECONDS = 5.0


def await_loops(
    db: str,
    batch_id: str,
    here: ServedHere,
    ingest_run: PrefectFuture[int],
    progress: ProgressArtifact,
) -> tuple[results.Progress, ChunkRecords]:
    """Wait while the serving loops of the batch's route serve it, until nothing is left and the
    ingest is over. Meanwhile: what is queued leaves on cancel or expiry, the progress bar
    and the chunk records stay live, and a batch no live loop serves says so. Each look is
    one count over the queue's index (and a batch read); the rest only when it changed."""
    records = ChunkRecords(db, batch_id)
    waiting = WaitingReason(db, batch_id, here.key[1])
    ingested = threading.Event()

    def ingest_ended(_: object) -> None:
        ingested.set()
        here.poke()

    ingest_run.add_done_callback(ingest_ended)
    seen, wait, reason_at = -1, WAIT_SECONDS[0], 0.0
    while True:
        stop_reason = patiently(lambda: why_stopped(db, batch_id))
        if stop_reason:  # cancelled or expired: what is queued leaves, in-flight finishes
            results.drop_queued(db, batch_id, *stop_reason)
        done = ingested.is_set()  # before the count: lines may land in between
        left = patiently(lambda: results.pending(db, batch_id))
        if left == 0 and done:
            final = patiently(lambda: results.progress(db, batch_id))
            waiting.clear()
            records.record()
            progress.show(final)
            return final, records
        if left:
            here.ensure()
        if left and here.own is None and time.monotonic() >= reason_at:  # waits for a node's
            waiting.check()
            reason_at = time.monotonic() + REASON_SECONDS
        if left != seen:
            seen, wait = left, WAIT_SECONDS[0]
            records.record()
            progress.after_chunk()
        else:
            wait = min(wait * 2, OWN_WAIT_SECONDS)
        here.nap(wait)


class WaitingReason:
    """Shown on the batch (`waiting_reason`: status, the batch object, a metric) while no live
    loop serves its route, and taken away when one does."""

    def __init__(self, db: str, batch_id: str, route: str):
        self.db, self.batch_id, self.route = db, batch_id, route
        self.shown: str | None = None

    def check(self) -> None:
        served = patiently(lambda: loops.serves(self.db, self.route))
        reason = None if served else f"no serving loop serves {self.route}"
        if reason != self.shown:
            batches.label_batch(self.db, self.batch_id, waiting_reason=reason)
            if reason:
                get_run_logger().warning("batch %s waits: %s", self.batch_id, reason)
            self.shown = reason

    def clear(self) -> None:
        if self.shown:
            batches.label_batch(self.db, self.batch_id, waiting_reason=None)
            self.shown = None


@dataclass
class _OwnLoop:
    loop: ServingLoop
    users: int = 0
    settled: int = 0
    """Chunks the loop settled (or pokes): what a waiting run's nap ends on."""
    changed: threading.Condition = field(default_factory=threading.Condition)

    def poke(self, *_: object) -> None:
        with self.changed:
            self.settled += 1
            self.changed.notify_all()


_own_loops: dict[tuple[str, str], _OwnLoop] = {}
_own_lock = threading.Lock()


class ServedHere:
    """When this process serves its own batches (SERVE_HERE_ENV), a loop of its own on the
    batch's route, started once the batch has work (a file of rejected lines, or a resumed
    batch with nothing left, never loads an engine) and kept while any of this process's
    batches on the route runs; the engine stays loaded for the process's life, so a loop
    started again costs nothing. Otherwise nothing: a node's loops serve the batch."""

    def __init__(self, db: str, route: str, run: BatchRun):
        self.key = (db, route)
        self.run = run
        self.own: _OwnLoop | None = None

    def ensure(self) -> None:
        if self.own is not None or not os.environ.get(SERVE_HERE_ENV):
            return
        with _own_lock:
            own = _own_loops.get(self.key)
            if own is None:
                db, route = self.key
                chosen = load_engine_block(self.run.engine, self.run.model).engine()
                loop = ServingLoop(
                    db,
                    chosen,
                    route,
                    chunk_size=self.run.chunk_size,
                    lease_seconds=self.run.lease_seconds,
                )
                own = _own_loops[self.key] = _OwnLoop(loop)
                loop.on_chunk = own.poke
                loop.start()
            own.users += 1
            self.own = own

    def nap(self, seconds: float) -> None:
        """Sleep; with a loop of this process, up to OWN_WAIT_SECONDS, until it settles a chunk."""
        own = self.own
        if own is None:
            time.sleep(min(seconds, WAIT_SECONDS[1]))
            return
        with own.changed:
            seen = own.settled
            own.changed.wait_for(lambda: own.settled != seen, min(seconds, OWN_WAIT_SECONDS))

    def poke(self) -> None:
        """End a nap now (the ingest ended)."""
        if self.own is not None:
            self.own.poke()

    @property
    def loop_id(self) -> str | None:
        """This process's loop, once it served the batch."""
        return self.own.loop.id if self.own is not None else None

    def __enter__(self) -> ServedHere:
        return self

    def __exit__(self, *_: object) -> None:
        own = self.own
        if own is None:
            return
        with _own_lock:
            own.users -= 1
            last = own.users == 0 and _own_loops.get(self.key) is own
            if last:
                del _own_loops[self.key]
        if last:
            own.loop.stop()


_kept: dict[tuple[str, str], ServedHere] = {}


def keep_own_loop(db: str, route: str, run: BatchRun) -> None:
    """A loop of this process on `route` until `release_kept_loops`, when it serves its own
    work (SERVE_HERE_ENV): what the API's single responses wait on in its run-here mode."""
    if (db, route) in _kept or not os.environ.get(SERVE_HERE_ENV):
        return
    here = ServedHere(db, route, run)
    with _own_lock:
        if (db, route) in _kept:
            return
        _kept[(db, route)] = here
    here.ensure()


def release_kept_loops(db: str) -> None:
    """The kept loops on `db` stop once nothing else of this process uses them (the API's
    shutdown)."""
    for key in [k for k in _kept if k[0] == db]:
        _kept.pop(key).__exit__()


def run_stats(
    start: RunStats, began: results.Progress, final: results.Progress, sent: int
) -> RunStats:
    """What this run did: requests sent to an engine for it (`sent`: by this process's own loop
    when it served the batch, else by every loop), and those taken from earlier work (settled
    before it began, or answered from the result cache meanwhile)."""
    return RunStats(inferred=sent, reused=start.reused + final.reused - began.reused)


class ProgressArtifact:
    """The batch's progress bar in the UI: requests with a result, of the file's lines.

    Progress is a count over the whole batch: on a million-line batch with a fast engine,
    counting after every chunk would cost more than the chunks (PROGRESS_SECONDS)."""

    def __init__(self, db: str, batch_id: str, lines: int):
        self.db, self.batch_id = db, batch_id
        start = results.progress(db, batch_id)
        self.total = max(lines, start.pending + start.completed + start.failed)  # still ingesting
        self.id = create_progress_artifact(  # sync context: the id, not a coroutine
            progress=percent(start, self.total),
            key=artifact_key(batch_id, "progress"),
            description=f"Requests of {batch_id} with a result",
        )
        self._next_update = time.monotonic() + PROGRESS_SECONDS

    def after_chunk(self) -> None:
        if time.monotonic() < self._next_update:
            return
        began = time.monotonic()
        self.show(patiently(lambda: results.progress(self.db, self.batch_id)))
        cost = time.monotonic() - began
        self._next_update = began + max(PROGRESS_SECONDS, cost / PROGRESS_SHARE)

    def show(self, p: results.Progress) -> None:
        """The bar, with the finish-time estimate while work is left; raises LATE_EVENT once
        when that estimate passes the batch's window."""
        batch = batches.get_batch(self.db, self.batch_id)
        estimate = finish_estimate(self.db, batch, p.pending) if batch and p.pending else None
        description = f"Requests of {self.batch_id} with a result"
        if batch is not None and batch.waiting_reason:
            description += f"; waiting: {batch.waiting_reason}"
        if estimate is not None:
            when = time.strftime("%H:%M:%S %Z", time.localtime(estimate.finish_at))
            description += f"; finish about {when}{' (after its window)' if estimate.late else ''}"
        update_progress_artifact(
            artifact_id=cast(UUID, self.id),
            progress=percent(p, self.total),
            description=description,
        )
        if (
            batch is not None
            and estimate is not None
            and estimate.late
            and batches.mark_late(self.db, self.batch_id)
        ):
            warn_late(batch, estimate, p)


LATE_EVENT = "offline-queue.batch.late"
"""Raised once per batch, before it expires, when its finish-time estimate passes its window."""


def warn_late(batch: Batch, estimate: FinishEstimate, p: results.Progress) -> None:
    """The event an automation reacts to (add a node, raise the tier, tell the tenant), and a
    markdown artifact that says the same in the UI."""
    stamp = "%Y-%m-%d %H:%M:%S %Z"
    finish = time.strftime(stamp, time.localtime(estimate.finish_at))
    expires = time.strftime(stamp, time.localtime(batch.expires_at or 0))
    emit_event(
        event=LATE_EVENT,
        resource={
            "prefect.resource.id": f"offline-queue.batch.{batch.id}",
            "prefect.resource.name": batch.id,
            "offline-queue.tier": batch.tier,
            "offline-queue.tenant": batch.tenant or "",
        },
        payload={
            "estimated_finish_at": estimate.finish_at,
            "expires_at": batch.expires_at,
            "pending": p.pending,
            "requests_per_second": estimate.requests_per_second,
            "requests_ahead": estimate.requests_ahead,
        },
    )
    create_markdown_artifact(
        key=artifact_key(batch.id, "late"),
        markdown=f"# {batch.id} will not make its window\n\n"
        f"- estimated finish: **{finish}**\n- expires: **{expires}** "
        f"({batch.completion_window} window)\n- left: {p.pending} requests at "
        f"{estimate.requests_per_second:.2f} req/s, {estimate.requests_ahead} requests ahead "
        "(more urgent tiers first)\n\nWhat is not done when it expires is dropped as "
        "`expired`; what finished is delivered.",
        description=f"{batch.id}: estimated finish after its window",
    )
    get_run_logger().warning(
        "%s: estimated finish %s, after its window (%s)", batch.id, finish, expires
    )


def label_run(batch_id: str, tier: str, tenant: str | None, model: str | None = None) -> None:
    """Name the flow run after its batch and tag it, so the UI's filters find it."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    tags = set(flow_run.get_tags()) | {f"tier:{tier}", f"batch:{batch_id}"}
    if tenant:
        tags.add(f"tenant:{tenant}")
    if model:
        tags.add(f"model:{model}")
    with get_client(sync_client=True) as client:
        name = batch_id if batch_id.startswith("batch") else f"batch-{batch_id}"
        client.update_flow_run(UUID(run_id), name=f"{name}-{tier}", tags=sorted(tags))


def why_stopped(db: str, batch_id: str) -> tuple[str, str] | None:
    batch, expired = batches.get_batch_expired(db, batch_id)  # by the store's clock
    if batch is None:
        return None
    if batch.status == BatchStatus.CANCELLING:
        return "batch_cancelled", "the batch was cancelled before this request ran"
    if expired:
        return "batch_expired", f"the batch's completion window ({batch.completion_window}) ended"
    return None


def percent(p: results.Progress, total: int) -> float:
    return 100.0 * (p.completed + p.failed) / total if total else 100.0


def run_owner() -> tuple[str, str | None]:
    """Who this run is, as the batch row shows it, and its flow run id (what hooks find)."""
    run_id = flow_run.get_id()
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    return (f"flow run {flow_run.get_name()} ({run_id}) on {where}" if run_id else where), run_id
