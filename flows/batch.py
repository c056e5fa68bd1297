"""The batch flow, top to bottom: submit → validate and queue → infer (+ persist, per chunk)
→ finalize. The flow comes first; its tasks, then the helpers it leans on, follow in that order.

Validation and queueing share one streaming pass (a million-line file never sits in memory),
and a chunk's results are persisted in the same transaction that marks its requests done, so
those pairs are one task each. Chunks, not prompts, are Prefect tasks: a task run costs
6–20 ms here, a chunk of 256 requests seconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

from prefect import Flow, State, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from blocks.engines import load_engine_block
from blocks.store import store_url
from flows.shard import GpuSlot, Turn, default_parallelism, launch_shards, start_shard
from offline_queue.batches import batch_object, place_batch, write_files
from offline_queue.formats import BatchObject, RunStats
from offline_queue.leases import OwnerHeartbeat
from offline_queue.queue_file import queue_batch_file
from offline_queue.runs import BatchRun, with_field_docs
from offline_queue.serving import ChunkReport
from offline_queue.states import TERMINAL_STATUSES, BatchStatus, Tier
from offline_queue.storage import locate, resolve
from offline_queue.store import batches, claims, ingest, results, stats
from offline_queue.store.db import patiently
from offline_queue.validate import Limits, inspect_file
from offline_queue.worker import ChunkWorker

PROGRESS_SECONDS = 2.0
"""How often a running batch's progress artifact is brought up to date (a count over the batch)
— at most: the count costs time in proportion to the batch, so the interval stretches to keep
it under PROGRESS_SHARE (1 %) of the worker's time."""
PROGRESS_SHARE = 0.01


@flow(name="batch-inference", log_prints=True)
@with_field_docs
def batch_inference(
    input: str,
    output: str | None = None,
    errors: str | None = None,
    tier: Tier = Tier.STANDARD,
    weight: int = 1,
    engine: str | None = None,
    model: str | None = None,
    chunk_size: int = 256,
    max_attempts: int = 3,
    idempotency_key: str | None = None,
    batch_id: str | None = None,
    db: str | None = None,
    store: str | None = None,
    tenant: str | None = None,
    metadata: dict[str, str] | None = None,
    release_track: str | None = None,
    release_version: str | None = None,
    lease_seconds: float = 60.0,
    parallelism: int | None = None,
    shard: int = 0,
) -> dict[str, Any]:
    """Run one OpenAI Batch JSONL file to the end: exactly one output or error line per request.

    The parameters are the fields of `offline_queue.runs.BatchRun`, which says what each one
    trades (and why the flow lists them one by one).
    """
    run = BatchRun(**locals())  # nothing else is defined yet: locals() are the parameters
    db_url = store_url(run.db, run.store)
    if run.shard:  # started by the batch's first run: serve, and leave the rest to it
        return serve_shard(run, db_url)
    submitted = submit(run, db_url)
    bid = submitted.batch_id
    label_run(bid, run.tier, run.tenant)
    if run.release_track:
        batches.label_batch(
            db_url, bid, release_track=run.release_track, release_version=run.release_version
        )
    # Ingest streams the file in the background while the engine starts and serves the lines
    # already queued: on a million-line file the first results come seconds after submit, not
    # after the whole file is validated, and the engine's load overlaps the validation.
    ingest_run = validate_and_queue.submit(
        db_url, bid, submitted.content_hash, submitted.created_at
    )
    backlog = Backlog.beside(db_url, bid, ingest_run)
    # The batch shows this run as its owner, alive, until the run ends: a run killed where no
    # hook sees it (kill -9) leaves a silent owner, which reap_orphans settles after a lease.
    with OwnerHeartbeat(db_url, bid, *_run_owner(), run.lease_seconds):
        stopped = _stop_reason(db_url, bid)
        if stopped:
            results.drop_queued(db_url, bid, *stopped)

        tally = RunStats(reused=results.settled_requests(db_url, bid))
        model_version = None
        if backlog.has_work():
            launch_shards(run, bid, run.parallelism or default_parallelism())
            progress = ProgressArtifact(db_url, bid, submitted.lines)
            model_version = serve(run, db_url, bid, backlog, tally, progress)
        ingest_run.result()  # raises if the ingest failed: the run fails and a re-run resumes it

        engine_label = run.engine or f"vllm in process ({run.model or 'bundled model'})"
        return finalize(db_url, bid, model_version, tally, engine_label).model_dump(mode="json")


# -- the tasks, in the order the flow runs them ----------------------------------------------


class Submitted(BaseModel):
    batch_id: str
    content_hash: str
    created_at: int
    status: str
    lines: int


@task(name="submit", cache_policy=NO_CACHE)
def submit(run: BatchRun, db: str) -> Submitted:
    """Register the batch once: the same content written to the same files (or the same id, or
    idempotency key) is the same batch, so a re-run resumes it. The same content run from
    elsewhere is a batch of its own with its own files (deterministic answers still come from
    the result cache), never a resume that writes into another directory."""
    batches.reap_orphans(db)  # a batch this run resumes was lost: it shows why, then reopens
    info = inspect_file(locate(resolve(run.input), db), Limits())
    bid, path, out_path, err_path = place_batch(
        run.input, run.output, run.errors, info.content_hash, run.batch_id
    )
    batch, created = batches.register_batch(
        db,
        batch_id=bid,
        content_hash=info.content_hash,
        input_path=path,
        output_path=out_path,
        error_path=err_path,
        tier=run.tier,
        weight=run.weight,
        max_attempts=run.max_attempts,
        idempotency_key=run.idempotency_key,
        metadata=run.metadata,
    )
    get_run_logger().info(
        "%s batch %s (%s lines, %s bytes)",
        "registered" if created else "resuming",
        batch.id,
        info.lines,
        info.size,
    )
    return Submitted(
        batch_id=batch.id,
        content_hash=batch.content_hash,
        created_at=batch.created_at,
        status=batch.status,
        lines=info.lines,
    )


def _ingest_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Content, not run id: a re-run of the same batch in the same store skips the pass. The
    batch's creation time is in the key, so a new store (or a recreated batch) never hits."""
    db_digest = hashlib.sha256(parameters["db"].encode()).hexdigest()[:16]
    return (
        f"validate-and-queue-{db_digest}-{parameters['batch_id']}-"
        f"{parameters['content_hash']}-{parameters['created_at']}"
    )


@task(
    name="validate-and-queue",
    cache_key_fn=_ingest_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def validate_and_queue(db: str, batch_id: str, content_hash: str, created_at: int) -> int:
    """Stream the file once: valid lines queued, bad ones recorded with line and field.
    Resumable: an interrupted pass continues after its last committed group. A large file is
    queued in a process of its own, so the inference beside it keeps this one's interpreter."""
    queue_batch_file(db, batch_id)
    accepted, total = ingest.finish_ingest(db, batch_id)
    get_run_logger().info("%s of %s lines queued, %s rejected", accepted, total, total - accepted)
    return accepted


@task(
    name="infer-chunk",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def infer_chunk(batch_id: str, owner: str, chunk_size: int) -> ChunkReport | None:
    """Claim a chunk, answer it (cache, then engine) and persist it in one transaction.
    None when nothing is claimable right now. A whole-chunk fault hands the chunk back and
    raises, and Prefect retries the task with backoff.

    The task is given the worker's identity, not the worker. A task's parameters are what its
    run records and shows — here the batch, the owner its leases carry in the store, and the
    chunk size — and what Prefect walks before each call (and would hash, with a cache
    policy); the live parts (lease keeper, result cache, share keeper, engine) stay in this
    process's `ChunkWorker`, found by that identity. A bound method as the task would not do:
    Prefect passes the instance as a parameter."""
    report = ChunkWorker.running(batch_id, owner).serve_next(chunk_size)
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
        f", {s.lost} lost their lease" if s.lost else "",
    )
    return report


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(
    db: str, batch_id: str, model_version: str | None, run: RunStats, engine: str
) -> BatchObject:
    """Output and error files from the store, final counts, and a summary for the UI."""
    batch = batches.get_batch(db, batch_id)
    assert batch is not None
    stopped = _stop_reason(db, batch_id)
    # A batch reaped while this run was alive (its heartbeat late) is this run's to finish.
    over = batch.status in TERMINAL_STATUSES and not batches.failed_by_run(batch)
    if not over:
        batches.set_status(db, batch_id, BatchStatus.FINALIZING)
    outputs, errors = write_files(db, batch)
    status = BatchStatus.COMPLETED if outputs or not errors else BatchStatus.FAILED
    if stopped:
        status = BatchStatus.CANCELLED if stopped[0] == "batch_cancelled" else BatchStatus.EXPIRED
    if over:
        status = BatchStatus(batch.status)
    batches.set_status(
        db,
        batch_id,
        status,
        model_version=model_version or batch.model_version,
        errors_json=(
            results.first_errors_json(db, batch_id) if status == BatchStatus.FAILED else None
        ),
    )
    final = batches.get_batch(db, batch_id)
    assert final is not None
    obj = batch_object(db, final, run)
    counts = obj.request_counts
    speed = stats.batch_stats(db, [batch_id])
    summary: list[dict[str, Any]] = [
        {"field": "status", "value": obj.status},
        {"field": "requests", "value": counts.total},
        {"field": "completed", "value": counts.completed},
        {"field": "failed", "value": counts.failed},
        {"field": "inferred this run", "value": run.inferred},
        {"field": "reused (resume, cache)", "value": run.reused},
        {"field": "input tokens", "value": obj.usage.input_tokens},
        {"field": "output tokens", "value": obj.usage.output_tokens},
        {
            "field": "latency p50 / p95 ms",
            "value": f"{speed.p50_ms or 0:.0f} / {speed.p95_ms or 0:.0f}",
        },
        {"field": "output tokens/s", "value": round(speed.tokens_per_second, 1)},
        {"field": "engine", "value": engine},
        {"field": "model version", "value": obj.model_version},
    ]
    create_table_artifact(
        key=_artifact_key(batch_id, "summary"), table=summary, description=f"Batch {batch_id}"
    )
    create_markdown_artifact(
        key=_artifact_key(batch_id, "files"),
        markdown=f"**{batch_id}** {obj.status}\n\n- output: `{obj.output_file}` ({outputs} lines)"
        f"\n- errors: `{obj.error_file}` ({errors} lines)",
        description="Where the results are",
    )
    return obj


def _artifact_key(batch_id: str, what: str) -> str:
    return f"{batch_id}-{what}".replace("_", "-").lower()


# -- what the flow leans on ------------------------------------------------------------------


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
                start_shard(run, batch_id, moved, f"{flow_run.get_id()}-moved-{moved}")
                get_run_logger().info("another node has a free GPU: shard %d goes there", moved)
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
    while True:
        stop_reason = patiently(lambda: _stop_reason(db, bid))
        if stop_reason:  # cancelled or expired: what is queued leaves, in-flight finishes
            results.drop_queued(db, bid, *stop_reason)
        report = infer_chunk(bid, worker.owner, run.chunk_size)
        if report is not None:
            tally.inferred += report.inferred
            tally.reused += report.reused
            if progress is not None:
                progress.after_chunk()
        else:
            final = backlog.settled_or_wait(run.lease_seconds)
            if final is not None:
                if progress is not None:
                    progress.show(final)
                return True
        if slot is not None and patiently(slot.must_yield):  # the chunk boundary
            return False


def serve_shard(run: BatchRun, db: str) -> dict[str, Any]:
    """A shard the batch's first run started: serve until nothing is left (the first run
    finalizes)."""
    assert run.batch_id is not None, "a shard is started with its batch's id"
    bid = run.batch_id
    label_run(bid, run.tier, run.tenant)
    tally = RunStats()
    backlog = Backlog(db, bid, lambda: _ingest_done(db, bid))
    if backlog.has_work():
        with OwnerHeartbeat(db, bid, *_run_owner(), run.lease_seconds):  # alive while it serves
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
            progress=_percent(start, self.total),
            key=_artifact_key(batch_id, "progress"),
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
        update_progress_artifact(artifact_id=cast(UUID, self.id), progress=_percent(p, self.total))


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


def _stop_reason(db: str, batch_id: str) -> tuple[str, str] | None:
    batch, expired = batches.get_batch_expired(db, batch_id)  # by the store's clock
    if batch is None:
        return None
    if batch.status == BatchStatus.CANCELLING:
        return "batch_cancelled", "the batch was cancelled before this request ran"
    if expired:
        return "batch_expired", f"the batch's completion window ({batch.completion_window}) ended"
    return None


def _percent(p: results.Progress, total: int) -> float:
    return 100.0 * (p.completed + p.failed) / total if total else 100.0


def _run_owner() -> tuple[str, str | None]:
    """Who this run is, as the batch row shows it, and its flow run id (what hooks find)."""
    run_id = flow_run.get_id()
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    return (f"flow run {flow_run.get_name()} ({run_id}) on {where}" if run_id else where), run_id


@batch_inference.on_failure
@batch_inference.on_crashed
@batch_inference.on_cancellation
def record_run_end(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """A flow run that ends before its batch does leaves the reason on the batch: `failed`
    with RUN_FAILED / RUN_CRASHED / RUN_CANCELLED and Prefect's state message in `errors`.

    Where it runs: `on_failure` in the flow's own process. For a deployment's run on a
    process worker, Prefect 3.7 starts the flow in a subprocess with its cancellation and
    crash hooks turned off there (PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS=false); the
    worker's runner loads the flow from the deployment's entrypoint and runs `on_cancellation`
    after it has stopped the process, and `on_crashed` after the process exited non-zero —
    so this hook runs in the worker, from the run's parameters, and finds the batch by the
    flow run id the batch's owner carries (or by the `batch_id` parameter if the run died
    before it took the batch). A kill -9 of the worker itself runs no hook: reap_orphans."""
    if state.is_crashed():
        code, verb = batches.RUN_CRASHED, "crashed"
    elif state.is_cancelling() or state.is_cancelled():
        code, verb = batches.RUN_CANCELLED, "was cancelled"
    else:
        code, verb = batches.RUN_FAILED, "failed"
    params = flow_run.parameters
    db = store_url(params.get("db"), params.get("store"))
    message = (
        f"Prefect flow run {flow_run.name} ({flow_run.id}) {verb}: {state.message or state.name}"
    )
    failed = batches.fail_run(
        db, code, message, run_id=str(flow_run.id), batch_id=params.get("batch_id")
    )
    for batch_id in failed:
        flow_run_logger(flow_run, flow).warning("batch %s failed: %s", batch_id, message)
