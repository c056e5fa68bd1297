"""The batch flow, top to bottom: submit → validate and queue (one streaming pass) → await the
serving loops (infer + persist happen there, per chunk, shown as infer-chunk task runs) →
finalize. The flow comes first, then its tasks in the order it runs them; the wait is in
offline_queue/flows/waiting.py. A waiting batch holds no GPU: the flow run routes, queues,
watches and finalizes (docs/scheduling.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from prefect import Flow, State, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.context import TaskRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from offline_queue.batch_object import BatchObject, RunStats
from offline_queue.batches import batch_object, place_batch, write_files
from offline_queue.blocks.catalog import load_catalog
from offline_queue.blocks.engines import route_of
from offline_queue.blocks.release import load_policy
from offline_queue.blocks.storage import use_storage
from offline_queue.blocks.store import store_url
from offline_queue.catalog import Catalog, ServedModel
from offline_queue.findings import FileInfo
from offline_queue.flows.release import check_guards
from offline_queue.flows.waiting import (
    ProgressArtifact,
    ServedHere,
    artifact_key,
    await_loops,
    label_run,
    run_owner,
    run_stats,
    why_stopped,
)
from offline_queue.leases import OwnerHeartbeat
from offline_queue.queue_file import queue_batch_file
from offline_queue.release import RouteKey
from offline_queue.release import route as release_route
from offline_queue.runs import BatchRun, with_field_docs
from offline_queue.states import TERMINAL_STATUSES, BatchStatus, Tier
from offline_queue.storage import locate, resolve
from offline_queue.store import batches, ingest, owners, results, stats
from offline_queue.store.tables import Batch
from offline_queue.validate import Limits, inspect_file


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
    storage: str | None = None,
    tenant: str | None = None,
    metadata: dict[str, str] | None = None,
    release_track: str | None = None,
    release_version: str | None = None,
    lease_seconds: float = 60.0,
    inspected: FileInfo | None = None,
) -> dict[str, Any]:
    """Run one OpenAI Batch JSONL file to the end: exactly one output or error line per request.

    The parameters are the fields of `offline_queue.runs.BatchRun`, which says what each one
    trades (and why the flow lists them one by one).
    """
    run = BatchRun(**locals())  # nothing else is defined yet: locals() are the parameters
    db_url = store_url(run.db, run.store)
    use_storage(run.storage)  # before any location is opened (the ingest child inherits it)
    submitted = submit(run, db_url)
    bid = submitted.batch_id
    if submitted.served is not None:  # the catalog's engine for the model the lines name
        run = routed(run, submitted.served, bid)
    label_run(bid, run.tier, run.tenant)
    route = route_of(run.engine, run.model)
    batches.label_batch(
        db_url,
        bid,
        route=route,
        **(
            {"release_track": run.release_track, "release_version": run.release_version}
            if run.release_track
            else {}
        ),
    )
    # Ingest streams the file in the background while the loops serve the lines already
    # queued: on a million-line file the first results come seconds after submit.
    ingest_run = validate_and_queue.submit(
        db_url, bid, submitted.content_hash, submitted.created_at
    )
    # The batch shows this run as its owner, alive, until the run ends: a run killed where no
    # hook sees it (kill -9) leaves a silent owner, which reap_orphans settles after a lease.
    with (
        ServedHere(db_url, route, run) as here,
        OwnerHeartbeat(db_url, bid, *run_owner(), run.lease_seconds),
    ):
        stopped = why_stopped(db_url, bid)
        if stopped:
            results.drop_queued(db_url, bid, *stopped)
        start = RunStats(reused=results.settled_requests(db_url, bid))
        began = results.progress(db_url, bid)
        progress = ProgressArtifact(db_url, bid, submitted.lines)
        final, records = await_loops(db_url, bid, here, ingest_run, progress)
        ingest_run.result()  # raises if the ingest failed: the run fails and a re-run resumes it
        tally = run_stats(start, began, final, records.inferred(here.loop_id))
        engine_label = run.engine or f"vllm in process ({run.model or 'bundled model'})"
        done = finalize(db_url, bid, tally, engine_label)
    if submitted.served is not None and submitted.served.release and run.release_track:
        check_guards(submitted.served.release, db_url)  # as the release router does after one
    return done.model_dump(mode="json")


# -- the tasks, in the order the flow runs them ----------------------------------------------


class Submitted(BaseModel):
    batch_id: str
    content_hash: str
    created_at: int
    status: str
    lines: int
    served: ServedModel | None = None
    """The catalog entry that routes the batch (none when an engine was given by name)."""


@task(name="submit", cache_policy=NO_CACHE)
def submit(run: BatchRun, db: str) -> Submitted:
    """Register the batch once: the same content written to the same files (or the same id, or
    idempotency key) is the same batch, so a re-run resumes it. The same content run from
    elsewhere is a batch of its own with its own files (deterministic answers still come from
    the result cache), never a resume that writes into another directory."""
    owners.reap_orphans(db)  # a batch this run resumes was lost: it shows why, then reopens
    info = inspect_file(locate(resolve(run.input), db), Limits(), run.inspected)
    placed = place_batch(run.input, run.output, run.errors, info.content_hash, run.batch_id)
    batch, created = batches.register_batch(
        db,
        replace(
            placed,
            tier=run.tier,
            weight=run.weight,
            max_attempts=run.max_attempts,
            idempotency_key=run.idempotency_key,
            metadata=run.metadata,
        ),
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
        served=None if run.engine or run.model else route_by_catalog(db, batch, info),
    )


def routed(run: BatchRun, served: ServedModel, batch_id: str) -> BatchRun:
    """The run as its catalog entry routes it: the entry's engine, or — when a release policy
    picks the entry's version — the engine of the track the policy gives this batch, stamped as
    the release router stamps its runs (and its guards checked after a candidate batch)."""
    update: dict[str, Any] = {"engine": served.engine, "model": served.model}
    if served.release and not run.release_track:
        policy = load_policy(served.release).policy()
        decision = release_route(policy, RouteKey(tenant=run.tenant, batch=batch_id))
        get_run_logger().info(
            "release %s: %s %s (%s)",
            served.release,
            decision.track,
            decision.version,
            decision.reason,
        )
        update |= {"release_track": decision.track, "release_version": decision.version}
        if decision.engine:  # the track's own engine serves its own model
            update |= {"engine": decision.engine, "model": None}
    return run.model_copy(update=update)


def route_by_catalog(db: str, batch: Batch, info: FileInfo) -> ServedModel | None:
    """The catalog entry for the model the batch's lines name. The first run decides and the
    batch keeps the catalog it saw, so a resume (and its ingest) routes and judges the same."""
    if batch.catalog_json is not None:
        return Catalog.from_json(batch.catalog_json).find(batch.served_model)
    catalog = load_catalog()
    served = catalog.batch_model(info.named)
    batches.label_batch(
        db,
        batch.id,
        served_model=served.name if served is not None else None,
        catalog_json=catalog.to_json(),
    )
    log = get_run_logger()
    if served is None:
        log.warning("no line names a served model (%s): every line is an error", catalog.served())
    else:
        log.info("lines name %s: served by %s", served.name, served.engine or "vLLM in process")
    return served


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


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(db: str, batch_id: str, run: RunStats, engine: str) -> BatchObject:
    """Output and error files from the store, final counts, and a summary for the UI."""
    batch = batches.get_batch(db, batch_id)
    assert batch is not None
    stopped = why_stopped(db, batch_id)
    # A batch reaped while this run was alive (its heartbeat late) is this run's to finish.
    over = batch.status in TERMINAL_STATUSES and not owners.failed_by_run(batch)
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
        waiting_reason=None,
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
        {"field": "engine-seconds (GPU time)", "value": obj.engine_seconds},
        {"field": "engine", "value": engine},
        {"field": "model version", "value": obj.model_version},
    ]
    create_table_artifact(
        key=artifact_key(batch_id, "summary"), table=summary, description=f"Batch {batch_id}"
    )
    create_markdown_artifact(
        key=artifact_key(batch_id, "files"),
        markdown=f"**{batch_id}** {obj.status}\n\n- output: `{obj.output_file}` ({outputs} lines)"
        f"\n- errors: `{obj.error_file}` ({errors} lines)",
        description="Where the results are",
    )
    return obj


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
        code, verb = owners.RUN_CRASHED, "crashed"
    elif state.is_cancelling() or state.is_cancelled():
        code, verb = owners.RUN_CANCELLED, "was cancelled"
    else:
        code, verb = owners.RUN_FAILED, "failed"
    params = flow_run.parameters
    db = store_url(params.get("db"), params.get("store"))
    message = (
        f"Prefect flow run {flow_run.name} ({flow_run.id}) {verb}: {state.message or state.name}"
    )
    failed = owners.fail_run(
        db, code, message, run_id=str(flow_run.id), batch_id=params.get("batch_id")
    )
    for batch_id in failed:
        flow_run_logger(flow_run, flow).warning("batch %s failed: %s", batch_id, message)
