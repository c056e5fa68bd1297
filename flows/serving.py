"""What the batch flow's serving rests on: the loop that serves a batch's chunks
while this shard holds a GPU (flows/shard.py) and hands it over at a chunk boundary, a shard's
own run, the backlog left while the ingest runs beside, the progress artifact, and the run's
name and owner as the UI and the store show them. flows/batch.py is the flow that uses them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast
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

from blocks.engines import load_engine_block
from flows.chunks import ChunkFeed
from flows.shard import GpuSlot, Turn, default_parallelism, start_shard
from offline_queue.batch_object import FinishEstimate, RunStats
from offline_queue.batches import finish_estimate
from offline_queue.leases import OwnerHeartbeat
from offline_queue.runs import BatchRun
from offline_queue.serving import ChunkReport
from offline_queue.states import BatchStatus, Tier
from offline_queue.store import batches, claims, results, slots
from offline_queue.store.db import patiently
from offline_queue.store.tables import Batch
from offline_queue.worker import ChunkWorker

PROGRESS_SECONDS = 2.0
"""How often a running batch's progress artifact is brought up to date (a count over the batch)
— at most: the count costs time in proportion to the batch, so the interval stretches to keep
it under PROGRESS_SHARE (1 %) of the worker's time."""
PROGRESS_SHARE = 0.01


def artifact_key(batch_id: str, what: str) -> str:
    return f"{batch_id}-{what}".replace("_", "-").lower()


def serve(
    run: BatchRun,
    db: str,
    batch_id: str,
    backlog: Backlog,
    tally: RunStats,
    progress: ProgressArtifact | None = None,
) -> str | None:
    """Serve chunks of the batch until nothing is left; returns the engine's model version.

    On a node whose worker made its GPU limit, chunks are served only while this shard holds
    one of the node's GPUs (flows/shard.py): the engine is loaded once a slot is held (an
    in-process engine needs the GPU), and at each chunk boundary a shard of a lower tier that a
    waiting higher tier needs hands the slot over and waits for it again. The process keeps its
    engine (loaded once per process) for when the slot comes back."""
    slot = GpuSlot.on_this_node(db, claims.new_owner(), batch_id, Tier(run.tier).rank)
    model_version = None
    may_move = True
    try:
        while True:
            turn = Turn.HELD if slot is None else slot.acquire(backlog.open, may_move)
            if turn is Turn.NOT_NEEDED:
                break
            if turn is Turn.ELSEWHERE:  # a run of ours where a GPU is free: a shard moves,
                may_move = False  # the first run (which finalizes) stays and sends one more
                moved = run.shard or (run.parallelism or default_parallelism())
                target = slot.moving_to if slot is not None else None
                start_shard(run, batch_id, moved, f"{flow_run.get_id()}-moved-{moved}", target)
                get_run_logger().info("%s has a free GPU: shard %d goes there", target, moved)
                if run.shard:
                    break
                continue
            chosen = load_engine_block(run.engine, run.model).engine()  # loaded once per process
            model_version = chosen.model_version
            label_run(batch_id, run.tier, run.tenant, model_version)
            batches.set_status(db, batch_id, BatchStatus.IN_PROGRESS, model_version=model_version)
            with ChunkWorker(
                db,
                batch_id,
                chosen,
                tier=run.tier,
                weight=run.weight,
                max_attempts=run.max_attempts,
                lease_seconds=run.lease_seconds,
            ) as worker:
                done = _serve_chunks(run, db, worker, backlog, tally, slot, progress)
            if done or slot is None:
                break
            slot.release()
            get_run_logger().info("handed the GPU to a waiting higher tier; waiting for it again")
    finally:
        if slot is not None:
            slot.close()
    return model_version


def _serve_chunks(
    run: BatchRun,
    db: str,
    worker: ChunkWorker,
    backlog: Backlog,
    tally: RunStats,
    slot: GpuSlot | None,
    progress: ProgressArtifact | None,
) -> bool:
    """Chunks until nothing is left and the ingest is over — ours, or other workers' (we wait
    for their leases): True; or until the GPU slot is to be handed over: False."""
    bid = worker.batch_id
    feed = ChunkFeed(worker, run.chunk_size, may_claim_ahead=lambda: not _must_yield(slot))
    try:
        while True:
            stop_reason = patiently(lambda: why_stopped(db, bid))
            if stop_reason:  # cancelled or expired: what is queued leaves, in-flight finishes
                results.drop_queued(db, bid, *stop_reason)
            report = feed.next()
            if report is not None:
                _count(tally, report)
                if progress is not None:
                    progress.after_chunk()
            else:
                final = backlog.settled_or_wait(run.lease_seconds)
                if final is not None:
                    if progress is not None:
                        progress.show(final)
                    return True
            if _must_yield(slot):  # the chunk boundary
                return False
    finally:
        for report in feed.hand_back():  # what the chunk claimed ahead started, finished
            _count(tally, report)


def _count(tally: RunStats, report: ChunkReport) -> None:
    tally.inferred += report.inferred
    tally.reused += report.reused


def _must_yield(slot: GpuSlot | None) -> bool:
    return slot is not None and patiently(slot.must_yield)


def serve_shard(run: BatchRun, db: str) -> dict[str, Any]:
    """A shard the batch's first run started: serve until nothing is left (the first run
    finalizes)."""
    assert run.batch_id is not None, "a shard is started with its batch's id"
    bid = run.batch_id
    label_run(bid, run.tier, run.tenant)
    tally = RunStats()
    backlog = Backlog(db, bid, lambda: _ingest_done(db, bid))
    if backlog.has_work():
        with OwnerHeartbeat(db, bid, *run_owner(), run.lease_seconds):  # alive while it serves
            serve(run, db, bid, backlog, tally)
    get_run_logger().info("shard %d of %s: %d inferred", run.shard, bid, tally.inferred)
    return {"batch_id": bid, "shard": run.shard, **tally.model_dump(mode="json")}


def _ingest_done(db: str, batch_id: str) -> bool:
    batch = batches.get_batch(db, batch_id)
    return batch is None or batch.ingest_done or BatchStatus(batch.status).terminal


class Backlog:
    """What is left of the batch to infer while its ingest runs beside the inference: whether
    there is anything at all — a file of rejected lines, or a batch resumed after its last
    result, never loads the engine — and, when nothing is claimable, whether the batch is
    done. `ingested()` says whether the ingest is over (the first run knows from its task; a
    shard from the store)."""

    def __init__(self, db: str, batch_id: str, ingested: Callable[[], bool]):
        self.db, self.batch_id, self._ingested = db, batch_id, ingested

    @classmethod
    def beside(cls, db: str, batch_id: str, ingest_run: PrefectFuture[int]) -> Backlog:
        """The backlog of the run whose ingest task is `ingest_run`."""
        ingested = threading.Event()
        ingest_run.add_done_callback(lambda _: ingested.set())
        return cls(db, batch_id, ingested.is_set)

    def open(self) -> bool:
        """Whether the batch may still have work for a shard (one look, no wait)."""
        ingested = self._ingested()
        return (
            not ingested or patiently(lambda: results.progress(self.db, self.batch_id)).pending > 0
        )

    def has_work(self) -> bool:
        while True:
            ingested = self._ingested()
            p = results.progress(self.db, self.batch_id)
            if p.pending or ingested:
                return p.pending > 0
            time.sleep(0.05)

    def settled_or_wait(self, lease_seconds: float) -> results.Progress | None:
        """The batch's progress once nothing is pending and the ingest is over; else None,
        after a wait for what is left: leased by another worker, waiting for its retry time,
        or not ingested yet."""
        ingested = self._ingested()  # before the count: lines may land in between
        p = patiently(lambda: results.progress(self.db, self.batch_id))
        if p.pending == 0 and ingested:
            return p
        wait = (p.due_in or 0) if p.processing == 0 else lease_seconds / 6
        if p.pending == 0:
            wait = 0.05
        time.sleep(min(max(wait, 0.05), 2.0))
        return None


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
        live = slots.batch_shards(self.db, self.batch_id)
        if live.running or live.waiting:
            description += f"; shards: {live.running} serving, {live.waiting} waiting for a GPU"
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
