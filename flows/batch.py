"""The batch flow, top to bottom: submit → validate and queue → infer (+ persist, per chunk)
→ finalize.

Validation and queueing share one streaming pass (a million-line file never sits in memory),
and a chunk's results are persisted in the same transaction that marks its requests done, so
those pairs are one task each. Chunks, not prompts, are Prefect tasks: a task run costs
6–20 ms here, a chunk of 256 requests seconds.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from offline_queue.engines.env import apply_engine_env

apply_engine_env()  # before anything imports torch or vLLM

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from blocks.engines import EngineBlock, load_engine_block  # noqa: E402
from blocks.store import store_url  # noqa: E402
from offline_queue.batches import batch_object, default_outputs, write_files  # noqa: E402
from offline_queue.cache import ResultCache  # noqa: E402
from offline_queue.formats import TERMINAL_STATUSES, BatchObject, RunStats  # noqa: E402
from offline_queue.leases import LeaseKeeper  # noqa: E402
from offline_queue.queue_file import queue_batch_file  # noqa: E402
from offline_queue.serving import ChunkReport, serve_claim  # noqa: E402
from offline_queue.shares import TIERS, Participant, ShareKeeper  # noqa: E402
from offline_queue.store import batches, claims, ingest, results, stats  # noqa: E402
from offline_queue.store.db import patiently  # noqa: E402
from offline_queue.validate import Limits, inspect_file  # noqa: E402

Tier = Literal["critical", "standard", "bulk"]

PROGRESS_SECONDS = 2.0
"""How often a running batch's progress artifact is brought up to date (a count over the batch)
— at most: the count costs time in proportion to the batch, so the interval stretches to keep
it under PROGRESS_SHARE (1 %) of the worker's time."""
PROGRESS_SHARE = 0.01


class Submitted(BaseModel):
    batch_id: str
    content_hash: str
    created_at: int
    status: str
    lines: int


@task(name="submit", cache_policy=NO_CACHE)
def submit(
    input: str,
    output: str | None,
    errors: str | None,
    db: str,
    batch_id: str | None,
    tier: str,
    weight: int,
    max_attempts: int,
    idempotency_key: str | None,
    metadata: dict[str, str] | None = None,
) -> Submitted:
    """Register the batch once: the same content written to the same files (or the same id, or
    idempotency key) is the same batch, so a re-run resumes it. The same content run from
    elsewhere is a batch of its own with its own files (deterministic answers still come from
    the result cache), never a resume that writes into another directory."""
    path = Path(input).expanduser().resolve()
    info = inspect_file(path, Limits())
    out, err = default_outputs(path)
    out_path = str(Path(output).expanduser().resolve()) if output else str(out)
    err_path = str(Path(errors).expanduser().resolve()) if errors else str(err)
    identity = hashlib.sha256(f"{info.content_hash}\n{out_path}\n{err_path}".encode())
    batch, created = batches.register_batch(
        db,
        batch_id=batch_id or f"batch_{identity.hexdigest()[:24]}",
        content_hash=info.content_hash,
        input_path=str(path),
        output_path=out_path,
        error_path=err_path,
        tier=tier,
        weight=weight,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        metadata=metadata,
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
def infer_chunk(
    db: str,
    batch_id: str,
    owner: str,
    chunk_size: int,
    max_attempts: int,
    engine_block: EngineBlock,
    keeper: LeaseKeeper,
    cache: ResultCache,
    share: ShareKeeper | None = None,
) -> ChunkReport | None:
    """Claim a chunk, answer it (cache, then engine) and persist it in one transaction.
    None when nothing is claimable right now. A whole-chunk fault hands the chunk back and
    raises, and Prefect retries the task with backoff."""
    claim = claims.claim(db, batch_id, owner, chunk_size, keeper.lease_seconds)
    if claim is None:
        return None
    with keeper.holding(claim.token):
        report = serve_claim(db, batch_id, claim, engine_block.engine(), max_attempts, share, cache)
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
    if batch.status not in TERMINAL_STATUSES:
        batches.set_status(db, batch_id, "finalizing")
    outputs, errors = write_files(db, batch)
    status = "completed" if outputs or not errors else "failed"
    if stopped:
        status = "cancelled" if stopped[0] == "batch_cancelled" else "expired"
    if batch.status in TERMINAL_STATUSES:
        status = batch.status
    batches.set_status(
        db,
        batch_id,
        status,
        model_version=model_version or batch.model_version,
        errors_json=results.first_errors_json(db, batch_id) if status == "failed" else None,
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


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    input: str,
    output: str | None = None,
    errors: str | None = None,
    tier: Tier = "standard",
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
) -> dict[str, Any]:
    """Run one OpenAI Batch JSONL file to the end: exactly one output or error line per request.

    Args:
        input: Path of the OpenAI Batch JSONL file.
        output: Output file. Default: <input>.output.jsonl next to the input.
        errors: Error file. Default: <input>.errors.jsonl next to the input.
        tier: Priority tier: critical, standard or bulk.
        weight: Share of a shared engine within the tier (proportional).
        engine: Engine block name (e.g. `vllm/a100`). Empty: vLLM in this process.
        model: Model folder for the in-process engine. Empty: the bundled SmolLM2-135M.
        chunk_size: Requests per task. Larger chunks cost less orchestration; a crash wastes
            at most one chunk per worker.
        max_attempts: Tries per request before it is terminated: retriable failures, and
            workers that died or lost the lease while it ran (then `worker_lost`).
        idempotency_key: The same key again resumes the same batch instead of a new one.
        batch_id: Explicit batch id. Default: derived from the file's content.
        db: Store URL (postgresql+psycopg://... or sqlite:///...). Default: the `store`
            block, else OFFLINE_QUEUE_DB, else a SQLite file in the user's data directory.
        store: Name of an offline-queue-store block holding the store URL (as a secret), e.g.
            `default` as `offline-queue pools apply --db` saves it.
        tenant: Who the batch is for: a tag on the run, and the key a gray release routes by.
        metadata: Free-form labels kept on the batch object (OpenAI's `metadata`).
        release_track: Set by the release router: `stable` or `candidate`.
        release_version: Set by the release router: the model version of that track.
        lease_seconds: A dead worker's chunk is claimed again after this long; the lease is
            renewed every third of it while the worker lives.
    """
    db_url = store_url(db, store)
    submitted = submit(
        input,
        output,
        errors,
        db_url,
        batch_id,
        tier,
        weight,
        max_attempts,
        idempotency_key,
        metadata,
    )
    bid = submitted.batch_id
    label_run(bid, tier, tenant)
    if release_track:
        batches.label_batch(
            db_url, bid, release_track=release_track, release_version=release_version
        )
    # Ingest streams the file in the background while the engine starts and serves the lines
    # already queued: on a million-line file the first results come seconds after submit, not
    # after the whole file is validated, and the engine's load overlaps the validation.
    ingest_run = validate_and_queue.submit(
        db_url, bid, submitted.content_hash, submitted.created_at
    )
    ingested = threading.Event()
    ingest_run.add_done_callback(lambda _: ingested.set())
    ingesting = IngestWatch(db_url, bid, ingested.is_set)
    stopped = _stop_reason(db_url, bid)
    if stopped:
        results.drop_queued(db_url, bid, *stopped)

    run = RunStats(reused=results.settled_requests(db_url, bid))
    model_version = None
    if ingesting.has_work():
        engine_block = load_engine_block(engine, model)
        model_version = engine_block.engine().model_version  # loaded once per process
        label_run(bid, tier, tenant, model_version)
        batches.set_status(db_url, bid, "in_progress", model_version=model_version)
        participant = Participant(bid, claims.new_owner(), TIERS[tier], weight)
        run = infer_all(
            db_url,
            participant,
            chunk_size,
            max_attempts,
            engine_block,
            lease_seconds,
            run,
            ingesting,
            submitted.lines,
        )
    ingest_run.result()  # raises if the ingest failed: the run fails and a re-run resumes it

    engine_label = engine or f"vllm in process ({model or 'bundled model'})"
    return finalize(db_url, bid, model_version, run, engine_label).model_dump(mode="json")


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


def infer_all(
    db: str,
    me: Participant,
    chunk_size: int,
    max_attempts: int,
    engine_block: EngineBlock,
    lease_seconds: float,
    run: RunStats,
    ingesting: IngestWatch,
    lines: int,
) -> RunStats:
    """Chunks until nothing is left and the ingest is over: ours, or other workers' (we wait
    for their leases). On a shared engine, our in-flight share is kept current by a
    ShareKeeper meanwhile."""
    batch_id, owner = me.batch_id, me.owner
    engine = engine_block.engine()
    keeper = LeaseKeeper(db, lease_seconds).start()
    cache = ResultCache(db, engine.model_version)
    share = (
        ShareKeeper(db, engine.engine_key, me, engine.capacity).start() if engine.shared else None
    )
    start = results.progress(db, batch_id)
    total = max(lines, start.pending + start.completed + start.failed)  # lines: still ingesting
    artifact = create_progress_artifact(  # sync context: the id, not a coroutine
        progress=_percent(start, total),
        key=_artifact_key(batch_id, "progress"),
        description=f"Requests of {batch_id} with a result",
    )
    next_update = time.monotonic() + PROGRESS_SECONDS
    try:
        while True:
            stop_reason = patiently(lambda: _stop_reason(db, batch_id))
            if stop_reason:  # cancelled or expired: what is queued leaves, in-flight finishes
                results.drop_queued(db, batch_id, *stop_reason)
            report = infer_chunk(
                db, batch_id, owner, chunk_size, max_attempts, engine_block, keeper, cache, share
            )
            if report is not None:
                run.inferred += report.inferred
                run.reused += report.reused
                # Progress is a count over the whole batch: on a million-line batch with a
                # fast engine, counting after every chunk would cost more than the chunks.
                if time.monotonic() >= next_update:
                    began = time.monotonic()
                    update_progress_artifact(
                        artifact_id=cast(UUID, artifact),
                        progress=_percent(patiently(lambda: results.progress(db, batch_id)), total),
                    )
                    cost = time.monotonic() - began
                    next_update = began + max(PROGRESS_SECONDS, cost / PROGRESS_SHARE)
                continue
            ingested = ingesting.finished()  # before the count: lines may land in between
            p = patiently(lambda: results.progress(db, batch_id))
            if p.pending == 0 and ingested:
                update_progress_artifact(
                    artifact_id=cast(UUID, artifact), progress=_percent(p, total)
                )
                return run
            # What is left is leased by another worker, waiting for its retry time, or not
            # ingested yet.
            wait = (p.due_in or 0) if p.processing == 0 else lease_seconds / 6
            if p.pending == 0:
                wait = 0.05
            time.sleep(min(max(wait, 0.05), 2.0))
    finally:
        cache.flush()
        keeper.stop()
        if share is not None:
            share.stop()


class IngestWatch:
    """Whether the batch's ingest (running beside the inference) is over, and whether there is
    anything to infer at all — a file of rejected lines, or a batch resumed after its last
    result, never loads the engine."""

    def __init__(self, db: str, batch_id: str, done: Callable[[], bool]):
        self.db, self.batch_id, self._done = db, batch_id, done

    def finished(self) -> bool:
        return self._done()

    def has_work(self) -> bool:
        while True:
            ingested = self.finished()
            p = results.progress(self.db, self.batch_id)
            if p.pending or ingested:
                return p.pending > 0
            time.sleep(0.05)


def _stop_reason(db: str, batch_id: str) -> tuple[str, str] | None:
    batch, expired = batches.get_batch_expired(db, batch_id)  # by the store's clock
    if batch is None:
        return None
    if batch.status == "cancelling":
        return "batch_cancelled", "the batch was cancelled before this request ran"
    if expired:
        return "batch_expired", f"the batch's completion window ({batch.completion_window}) ended"
    return None


def _percent(p: results.Progress, total: int) -> float:
    return 100.0 * (p.completed + p.failed) / total if total else 100.0
