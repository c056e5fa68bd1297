"""Tables. Times are epoch seconds (floats for leases, ints where OpenAI shows them), so the same
code runs on PostgreSQL and SQLite. Those that workers compare (leases, retry times, heartbeats,
expiry, status stamps) are the database's time (clock.py); the rest are the writer's."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from offline_queue.states import LIVE_STATES, RequestState, Tier

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants 64 bits for a million-line
# batch every night.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_release", "release_track", "release_version"),
        Index("ix_batches_tenant_created", "tenant", "created_at"),
        Index("ix_batches_route_status", "route", "status"),
        # An API batch's idempotency key is its tenant's own: unique per (tenant, key), so no
        # tenant's key can name another's batch. Batches run from the CLI have no tenant and
        # share one key space.
        UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_idempotency"),
        Index(
            "uq_batches_local_idempotency",
            "idempotency_key",
            unique=True,
            postgresql_where=text("tenant IS NULL"),
            sqlite_where=text("tenant IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    input_path: Mapped[str] = mapped_column(Text)
    output_path: Mapped[str] = mapped_column(Text)
    error_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(256))
    tier: Mapped[str] = mapped_column(String(16), default=Tier.STANDARD)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    metadata_json: Mapped[str | None] = mapped_column(Text)
    release_track: Mapped[str | None] = mapped_column(String(16))
    """stable or candidate, when a gray-release router sent the batch; None otherwise."""
    release_version: Mapped[str | None] = mapped_column(String(256))
    errors_json: Mapped[str | None] = mapped_column(Text)
    total_lines: Mapped[int] = mapped_column(Integer, default=0)
    ingested_through: Mapped[int] = mapped_column(Integer, default=0)
    """Last line number whose request (or rejection) is committed: an interrupted ingest
    resumes after it."""
    ingest_done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    # The HTTP API's view of a batch: who owns it, what file it came from, its window.
    tenant: Mapped[str | None] = mapped_column(String(128))
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    completion_window: Mapped[str | None] = mapped_column(String(16))
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    """Past it, what is not done is dropped as `expired` (what finished is delivered)."""
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    output_expires_at: Mapped[int | None] = mapped_column(BigInteger)
    """OpenAI's `output_expires_after` on create: past it, the clean-up removes the batch's
    output and error contents (offline_queue/expiry.py). None: kept."""
    outputs_removed_at: Mapped[int | None] = mapped_column(BigInteger)
    """When the clean-up removed them: the files are gone, not empty."""
    served_model: Mapped[str | None] = mapped_column(String(256))
    """The catalog entry the batch's lines name (offline_queue/catalog.py); None: the batch
    runs on an engine given by name, which serves whatever the lines name."""
    catalog_json: Mapped[str | None] = mapped_column(Text)
    """The catalog as it was when the batch was routed: a resumed ingest judges by it."""
    # Who runs the batch now (see store/owners.py `reap_orphans`): a run beats the heartbeat
    # every third of its lease; a non-terminal batch whose owner is silent for longer than the
    # lease is settled as `failed` (`run_lost`). No heartbeat yet: nobody has started it.
    owner: Mapped[str | None] = mapped_column(String(256))
    """The last run that took the batch: its Prefect flow run (if any), host and pid."""
    owner_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    """The owner's Prefect flow run id: what a flow run's state hook finds its batch by."""
    owner_heartbeat: Mapped[float | None] = mapped_column(Float)
    owner_lease: Mapped[float | None] = mapped_column(Float)
    totals_at: Mapped[int | None] = mapped_column(BigInteger)
    """When the batch's result rows were added up into `result_totals` (it had ended): a
    scrape of /metrics reads those few rows instead of the batch's million."""
    late_at: Mapped[int | None] = mapped_column(BigInteger)
    """When its run first estimated that the batch would finish after `expires_at` and said so
    (a Prefect event, an artifact). Set once; from then on the claim order puts the batch first
    within its tier (offline_queue/store/claims.py)."""
    route: Mapped[str | None] = mapped_column(String(512))
    """The engine the batch runs on (offline_queue/routes.py): the serving loops of that route
    claim its chunks. None until its run has routed it."""
    vtime: Mapped[float | None] = mapped_column(Float)
    """Requests claimed divided by weight: the weighted fair share's clock within a tier. None
    until the first claim, which starts it at the lowest clock of its tier's live batches."""
    waiting_reason: Mapped[str | None] = mapped_column(Text)
    """Why the batch waits with nobody serving it (no live loop on its route); None otherwise."""
    source: Mapped[str | None] = mapped_column(String(16))
    """Where its lines came from: None for a file (a flow run owns it); `stream` for entries
    of a Redis stream (no flow run: the loops serve it, its consumers reply and close it)."""


LIVE = text(f"state IN ({', '.join(repr(str(state)) for state in LIVE_STATES)})")
"""A request a worker may still have to serve: the predicate of the queue's partial index.
Queries must use this very text, with literals: with bound parameters neither SQLite nor a
generic PostgreSQL plan can prove the index applies, and every claim scanned the whole batch."""


class Request(Base):
    """One accepted line. state: queued → processing → completed | queued (retry) | terminated."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "line_no", name="uq_requests_batch_line"),
        # custom_id is unique per batch by validation (validate_file), not by an index whose
        # keys arrive in random order (migration 0005).
        # The queue: a partial index over the rows a worker may still claim, in the order
        # claims hand them out (prefix order, then line order: migration 0011).
        Index(
            "ix_requests_claimable",
            "batch_id",
            "prefix_key",
            "id",
            postgresql_where=LIVE,
            sqlite_where=LIVE,
        ),
        # Only leased rows carry a token, and every lookup compares it to one.
        Index(
            "ix_requests_lease_token",
            "lease_token",
            postgresql_where=text("lease_token IS NOT NULL"),
            sqlite_where=text("lease_token IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # No foreign key to batches (migration 0005): its trigger cost a lookup per ingested row,
    # and batches are never deleted.
    batch_id: Mapped[str] = mapped_column(String(64))
    line_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    url: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    cache_digest: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=RequestState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    prefix_key: Mapped[str] = mapped_column(String(32), server_default="-")
    """Sortable key of the rendered prompt's prefix (offline_queue/prefix.py): claims go in
    its order. "-" for rows queued before it existed (they sort first, in line order)."""


class Result(Base):
    """Exactly one per line of the batch file: the output, or the error. The primary key is
    what makes a replayed commit insert nothing twice."""

    __tablename__ = "results"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    response_id: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    """When the engine answered; `created_at` is when the chunk was committed."""
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class CachedResult(Base):
    """Answers to deterministic requests, by model version and canonical body (see
    offline_queue/cache.py): each points at the `results` row that holds the answer."""

    __tablename__ = "result_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(256))
    batch_id: Mapped[str] = mapped_column(String(64))
    line_no: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    """SHA-256 of the key: the key itself is shown once and never stored."""
    tenant: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # What the key may do; NULL: the server's defaults (ApiSettings).
    tiers: Mapped[str | None] = mapped_column(String(64))
    """Comma-separated tiers the key may ask for in `metadata.tier`."""
    max_weight: Mapped[int | None] = mapped_column(Integer)
    max_waiting: Mapped[int | None] = mapped_column(BigInteger)
    """Requests of the tenant's unfinished batches (all tiers) beyond which a create is a 429."""
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Bytes of the tenant's uploaded files beyond which an upload is a 413."""
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class StoredFile(Base):
    """A file uploaded through /v1/files. `path` is where its bytes are: `store://<id>` for bytes
    held in `file_chunks` (the default: every node reads them), else a path or an object-storage
    URL (offline_queue/storage.py)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), server_default="ready")
    """`writing` while an upload streams its chunks in (invisible to every reader), `ready`
    once it is whole."""
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    """Past it, the clean-up deletes the file. None: kept."""
    endpoint: Mapped[str | None] = mapped_column(String(64))
    """The url of the file's first request line: a batch of the file must be for it."""


class FileChunk(Base):
    """The bytes of a file held in the store, in order, about a MiB each (offline_queue/store/
    files.py): one row a MiB keeps a row well under what either database holds comfortably,
    and a reader fetches a few at a time."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class EngineTime(Base):
    """Engine-seconds a batch used, one row per served chunk (offline_queue/gpu_time.py says how a
    chunk's seconds are counted): GPU time is what a team that owns its GPUs bills and plans by.
    One row per chunk, not per request, and stamped by the store's clock, so `gpu-time --since`
    is one indexed range over rows written on any node."""

    __tablename__ = "engine_time"
    __table_args__ = (Index("ix_engine_time_batch", "batch_id"), Index("ix_engine_time_at", "at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    engine_key: Mapped[str] = mapped_column(String(512))
    seconds: Mapped[float] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer)
    """Requests the engine answered in the chunk: a tier's recent throughput, by one clock."""
    errors: Mapped[int] = mapped_column(Integer)
    """Requests the engine failed in the chunk (any code): failures per engine."""
    at: Mapped[float] = mapped_column(Float)
    loop: Mapped[str | None] = mapped_column(String(128))
    """The serving loop that served the chunk."""


class ServingLoop(Base):
    """A serving loop: one engine on its node's GPU (or tensor-parallel group), pulling chunks of
    every batch on its `route`. Kept alive by its heartbeat; a loop silent for longer than
    LOOP_STALE_SECONDS no longer counts as serving its route."""

    __tablename__ = "serving_loops"
    __table_args__ = (Index("ix_serving_loops_route", "route", "heartbeat"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(512))
    devices: Mapped[str | None] = mapped_column(String(64))
    """CUDA_VISIBLE_DEVICES of the loop's process (None: no GPU, or all of them)."""
    model_version: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat: Mapped[float] = mapped_column(Float)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    """Asked to finish what it holds and claim nothing new (`offline-queue worker drain`)."""
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)


class ResultTotals(Base):
    """An ended batch's result rows added up, once, per outcome and error code: what /metrics
    counts for it from then on (offline_queue/store/metrics.py), so a scrape costs the same
    after a year of nightly million-line batches as on the first night."""

    __tablename__ = "result_totals"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ok: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The error code; "" for the completed ones."""
    tier: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(256))
    results: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    timed: Mapped[int] = mapped_column(BigInteger)
    """Answered requests with a latency: the histogram's count."""
    latency_ms: Mapped[float] = mapped_column(Float)
    """Their latencies' sum."""
    buckets: Mapped[str] = mapped_column(Text)
    """JSON list: how many of them took at most each of LATENCY_BUCKETS_MS."""


class WebhookEndpoint(Base):
    """Where a tenant's events go (`offline-queue webhooks add`), signed with its secret."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant", "tenant"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(128))
    """None: the endpoint of work sent without a tenant (the CLI's own runs)."""
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    """`whsec_` + base64 of the signing key (Standard Webhooks)."""
    events: Mapped[str] = mapped_column(Text)
    """Comma-separated EventType values it wants."""
    retry_seconds: Mapped[float] = mapped_column(Float)
    """How long an event is retried before it is given up."""
    created_at: Mapped[float] = mapped_column(Float)


class WebhookEvent(Base):
    """One ending (a batch's, a response's), written in the transaction that ended it: the
    durable outbox. `announced` once it was also emitted as a Prefect event."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_announced", "announced"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    data_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    announced: Mapped[bool] = mapped_column(Boolean, default=False)


class WebhookDelivery(Base):
    """One event to one endpoint: leased by a dispatcher while it is sent, retried with backoff
    until it is accepted (2xx) or its endpoint's retry time has passed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            sqlite_where=text("delivered_at IS NULL AND given_up_at IS NULL"),
            postgresql_where=text("delivered_at IS NULL AND given_up_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    endpoint_id: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    give_up_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    given_up_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)


class StreamEntry(Base):
    """A Redis stream entry taken into the queue: one per (stream, custom_id), written in the
    transaction that queues its request, so a redelivered entry is found here and never
    queued (nor inferred) twice. Replied once its result is on the results stream."""

    __tablename__ = "stream_entries"
    __table_args__ = (
        Index(
            "ix_stream_entries_unreplied",
            "stream",
            "batch_id",
            sqlite_where=text("replied_at IS NULL"),
            postgresql_where=text("replied_at IS NULL"),
        ),
    )

    stream: Mapped[str] = mapped_column(String(256), primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    entry_id: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str] = mapped_column(String(64))
    line_no: Mapped[int] = mapped_column(Integer)
    reply_to: Mapped[str] = mapped_column(String(256))
    reply_owner: Mapped[str | None] = mapped_column(String(128))
    reply_lease: Mapped[float | None] = mapped_column(Float)
    replied_at: Mapped[float | None] = mapped_column(Float)
