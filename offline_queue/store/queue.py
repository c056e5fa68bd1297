"""The queue: registering batches, ingesting lines, claiming chunks under a lease, and settling
them — results and state changes of a chunk in one transaction, guarded by the claim's token.

The guard is what keeps the invariants: a settle only touches rows still leased to the claim
it came from, and `results` has one primary key per line, so a late or replayed settle from a
worker whose lease expired inserts nothing.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from offline_queue.engines.base import Reply
from offline_queue.formats import LineError
from offline_queue.release import TrackStats
from offline_queue.retry import RetryPolicy
from offline_queue.store.bulk import driver_rows, driver_stream, insert_ignoring_conflicts
from offline_queue.store.db import get_engine, session
from offline_queue.store.tables import LIVE, Batch, Request, Result
from offline_queue.validate import Accepted, Rejected


def new_owner() -> str:
    """A worker identity: host and pid for people, a random suffix so pid reuse never collides."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def response_ids(n: int) -> Iterator[str]:
    """`n` response ids from one read of the random source (a chunk's worth)."""
    pool = os.urandom(16 * n).hex()
    return (f"batch_req_{pool[i : i + 32]}" for i in range(0, 32 * n, 32))


def response_id() -> str:
    return next(response_ids(1))


class BatchConflict(ValueError):
    """An explicit batch id or idempotency key already names a batch with other content."""


# ---- batches ------------------------------------------------------------------------------


def register_batch(
    db: str,
    *,
    batch_id: str,
    content_hash: str,
    input_path: str,
    output_path: str,
    error_path: str,
    tier: str = "standard",
    weight: int = 1,
    max_attempts: int = 3,
    metadata: dict[str, str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """The batch for this content, created if new. Returns (batch, created).

    Submitting the same content (or the same idempotency key) again returns the batch that
    exists, so a re-run resumes it instead of duplicating it.
    """
    with session(db) as s:
        existing = s.get(Batch, batch_id)
        if existing is None and idempotency_key:
            existing = s.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.content_hash != content_hash:
                raise BatchConflict(
                    f"batch {existing.id} was submitted with different content "
                    f"(sha256 {existing.content_hash[:12]}…, this file {content_hash[:12]}…)"
                )
            return existing, False
        batch = Batch(
            id=batch_id,
            content_hash=content_hash,
            idempotency_key=idempotency_key,
            input_path=input_path,
            output_path=output_path,
            error_path=error_path,
            status="validating",
            tier=tier,
            weight=weight,
            max_attempts=max_attempts,
            metadata_json=orjson.dumps(metadata).decode() if metadata else None,
            total_lines=0,
            ingested_through=0,
            ingest_done=False,
            created_at=int(time.time()),
        )
        s.add(batch)
    return batch, True


def label_batch(db: str, batch_id: str, **fields: Any) -> None:
    """Set descriptive fields of a batch (release track and version, ...)."""
    with session(db) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(**fields))


def request_cancel(db: str, batch_id: str) -> None:
    """Ask a batch to stop: its worker cancels what is still queued at the next chunk."""
    with session(db) as s:
        s.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status.not_in(["completed", "failed", "cancelled", "expired"]),
            )
            .values(status="cancelling", cancelling_at=int(time.time()))
        )


def drop_queued(db: str, batch_id: str, code: str, message: str) -> int:
    """Every still-queued request of the batch gets its error row (`code`) and leaves the
    queue; requests in flight finish. Returns how many were dropped."""
    now = time.time()
    with session(db) as s:
        rows = s.execute(
            update(Request)
            .where(Request.batch_id == batch_id, Request.state == "queued")
            .values(state="terminated", last_error=message)
            .returning(Request.line_no, Request.custom_id)
            .execution_options(synchronize_session=False)
        ).all()
        error = LineError(code=code, message=message)
        insert_ignoring_conflicts(
            s.connection(),
            Result,
            RESULT_COLUMNS,
            [_error_row(batch_id, line, cid, error, None, now) for line, cid in rows],
        )
    return len(rows)


def get_batch(db: str, batch_id: str) -> Batch | None:
    with session(db, readonly=True) as s:
        return s.get(Batch, batch_id)


_STAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "cancelled": "cancelled_at",
    "expired": "expired_at",
}


def set_status(db: str, batch_id: str, status: str, **fields: Any) -> None:
    """Move a batch to `status`, stamping `<status>_at` the first time it gets there.

    A cancel that arrived meanwhile wins over a run starting: `cancelling` is not moved back
    to `in_progress` (the worker drops the queued requests at its next chunk)."""
    with session(db) as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status == "cancelling" and status == "in_progress":
            status = "cancelling"
        for key, value in {"status": status, **fields}.items():
            setattr(batch, key, value)
        stamp = _STAMPS.get(status)
        if stamp and getattr(batch, stamp) is None:
            setattr(batch, stamp, int(time.time()))


# ---- ingest -------------------------------------------------------------------------------


REQUEST_COLUMNS = (
    "batch_id",
    "line_no",
    "custom_id",
    "url",
    "body",
    "cache_digest",
    "state",
    "attempts",
    "not_before",
)
"""The columns ingest fills: the rest start empty."""


@dataclass
class IngestReport:
    accepted: int = 0
    rejected: int = 0
    endpoints: set[str] = field(default_factory=set)


def known_custom_ids(db: str, batch_id: str) -> set[str]:
    """custom_ids already queued for a batch: the duplicate check's memory after a resume."""
    with session(db, readonly=True) as s:
        return set(s.scalars(select(Request.custom_id).where(Request.batch_id == batch_id)))


def ingest(
    db: str, batch_id: str, items: Iterable[Accepted | Rejected], group_size: int = 5000
) -> IngestReport:
    """Queue accepted lines and record rejected ones, `group_size` lines per transaction.

    Each group commits with the batch's `ingested_through` watermark, so an interrupted ingest
    resumes after the last committed line and never queues a line twice. On PostgreSQL the
    requests of a group are streamed in with COPY (offline_queue/store/copy_ingest.py).
    """
    if get_engine(db).dialect.name == "postgresql":
        from offline_queue.store.copy_ingest import ingest_by_copy  # it imports this module

        return ingest_by_copy(db, batch_id, items, group_size, time.time())
    report = IngestReport()
    requests: list[tuple[Any, ...]] = []
    rejections: list[tuple[Any, ...]] = []
    last_line = 0

    def flush() -> None:
        # As on PostgreSQL, only the lines past the watermark, read in this transaction (BEGIN
        # IMMEDIATE: the one writer): the lines up to it are committed, and were decided by an
        # ingester that saw every line before them. A resumer whose `seen` was read after
        # another committed more can call such a line a duplicate; it must not add an error
        # row beside the queued request. Conflicts are still ignored, as a safety net.
        with session(db) as s:
            through = s.scalar(select(Batch.ingested_through).where(Batch.id == batch_id)) or 0
            conn = s.connection()  # line_no is the second column of both
            insert_ignoring_conflicts(
                conn, Request, REQUEST_COLUMNS, [r for r in requests if r[1] > through]
            )
            insert_ignoring_conflicts(
                conn, Result, RESULT_COLUMNS, [r for r in rejections if r[1] > through]
            )
            s.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.ingested_through < last_line)
                .values(ingested_through=last_line)
            )
        requests.clear()
        rejections.clear()

    now = time.time()
    for item in items:
        last_line = item.line_no
        if isinstance(item, Accepted):
            report.accepted += 1
            report.endpoints.add(item.url)
            requests.append(
                (
                    batch_id,
                    item.line_no,
                    item.custom_id,
                    item.url,
                    item.body_json,
                    item.cache_digest,
                    "queued",
                    0,
                    0.0,
                )
            )
        else:
            report.rejected += 1
            rejections.append(
                _error_row(batch_id, item.line_no, item.custom_id, item.error, None, now)
            )
        if len(requests) + len(rejections) >= group_size:
            flush()
    flush()
    return report


def finish_ingest(db: str, batch_id: str) -> tuple[int, int]:
    """Mark ingest complete; returns (accepted, total lines) from what the store holds."""
    with session(db) as s:
        accepted = s.scalar(select(func.count()).where(Request.batch_id == batch_id)) or 0
        rejected = s.scalar(
            select(func.count()).where(
                Result.batch_id == batch_id,
                Result.status_code.is_(None),
                Result.error_code == "invalid_request",
            )
        )
        endpoints = list(
            s.scalars(select(Request.url).where(Request.batch_id == batch_id).distinct().limit(2))
        )
        batch = s.get(Batch, batch_id)
        assert batch is not None
        batch.total_lines = accepted + (rejected or 0)
        batch.ingest_done = True
        batch.endpoint = endpoints[0] if len(endpoints) == 1 else None
        return accepted, batch.total_lines


# ---- claims -------------------------------------------------------------------------------


class Claimed(NamedTuple):
    """A claimed request: the claim's RETURNING row as it comes from the driver."""

    id: int
    line_no: int
    custom_id: str
    url: str
    body: str
    cache_digest: str | None
    attempts: int


@dataclass
class Claim:
    token: str
    owner: str
    requests: list[Claimed]


def claim(db: str, batch_id: str, owner: str, limit: int, lease_seconds: float) -> Claim | None:
    """Lease up to `limit` requests of a batch: queued ones that are due, and those whose
    lease ran out (a crashed or stalled worker). PostgreSQL skips rows another worker is
    claiming right now (SKIP LOCKED); SQLite serialises claims with BEGIN IMMEDIATE."""
    now = time.time()
    token = uuid.uuid4().hex
    claimable = (
        select(Request.id)
        .where(
            Request.batch_id == batch_id,
            LIVE,
            or_(
                and_(Request.state == "queued", Request.not_before <= now),
                and_(Request.state == "processing", Request.lease_expires < now),
            ),
        )
        .order_by(Request.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(Request)
        .where(Request.id.in_(claimable.scalar_subquery()))
        .values(
            state="processing",
            attempts=Request.attempts + 1,
            lease_owner=owner,
            lease_token=token,
            lease_expires=now + lease_seconds,
        )
        .returning(
            Request.id,
            Request.line_no,
            Request.custom_id,
            Request.url,
            Request.body,
            Request.cache_digest,
            Request.attempts,
        )
        .execution_options(synchronize_session=False)
    )
    with session(db) as s:
        rows = driver_rows(s.connection(), stmt)
    if not rows:
        return None
    rows.sort()  # by id: RETURNING order is not the claim's ORDER BY
    claimed = list(map(Claimed._make, rows))
    return Claim(token=token, owner=owner, requests=claimed)


def renew_leases(db: str, tokens: Sequence[str], lease_seconds: float) -> int:
    """Extend the leases of claims still being worked on: the heartbeat that keeps a slow
    chunk from being claimed again, while a dead worker's chunk expires within one lease.

    By token, not by owner: a claim its worker gave up on (say, its settle failed) must
    expire even though the worker lives on."""
    if not tokens:
        return 0
    with session(db) as s:
        result = s.execute(
            update(Request)
            .where(Request.lease_token.in_(list(tokens)), Request.state == "processing")
            .values(lease_expires=time.time() + lease_seconds)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(slots=True)
class Outcome:
    """What became of one claimed request, and whether it came from earlier work."""

    request: Claimed
    reply: Reply
    reused: bool = False


def abandoned(claim_: Claim, max_attempts: int) -> list[Outcome]:
    """Error outcomes for the claimed requests that have had all their tries: each worker that
    took one lost its lease before answering — it died or stalled, perhaps on this very
    request. They end here, as errors, instead of taking down worker after worker."""
    return [
        Outcome(
            r,
            Reply.error(
                500,
                "worker_lost",
                f"line {r.line_no}: {r.attempts - 1} tries ended without an answer (each "
                f"worker that took it stopped or lost its lease); max_attempts is {max_attempts}",
            ),
        )
        for r in claim_.requests
        if r.attempts > max_attempts
    ]


@dataclass
class Settled:
    completed: int = 0
    retried: int = 0
    terminated: int = 0
    lost: int = 0
    """Outcomes dropped because the lease had passed to another worker (nothing committed)."""
    completed_ids: set[int] = field(default_factory=set)
    """Requests whose answer this settle committed."""


RESULT_COLUMNS = (
    "batch_id",
    "line_no",
    "custom_id",
    "response_id",
    "ok",
    "status_code",
    "body",
    "error_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "finished_at",
    "reused",
    "created_at",
)


def _error_row(
    batch_id: str,
    line_no: int,
    custom_id: str | None,
    error: LineError,
    status_code: int | None,
    now: float,
    body: str | None = None,
) -> tuple[Any, ...]:
    """A `results` row (RESULT_COLUMNS order) for a line that ends in an error."""
    return (
        batch_id,
        line_no,
        custom_id,
        response_id(),
        False,
        status_code,
        body,
        error.code,
        error.message,
        0,
        0,
        None,
        None,
        False,
        now,
    )


def _guarded(s: Session, token: str, ids: list[int] | None, **values: Any) -> set[int]:
    """Update the rows still leased under `token` (`ids` of them, or None: all of them);
    returns which ones that was. All of them is the common case, and the token's index finds
    them without a parameter per row."""
    if ids is not None and not ids:
        return set()
    mine = and_(Request.lease_token == token, Request.state == "processing")
    rows = driver_rows(
        s.connection(),
        update(Request)
        .where(mine if ids is None else and_(Request.id.in_(ids), mine))
        .values(lease_owner=None, lease_token=None, lease_expires=None, **values)
        .returning(Request.id),
    )
    return {row[0] for row in rows}


def settle(
    db: str,
    batch_id: str,
    claim_: Claim,
    outcomes: Sequence[Outcome],
    max_attempts: int,
    retry: RetryPolicy | None = None,
) -> Settled:
    """Commit a chunk: results, state changes and cache entries in one transaction."""
    retry = retry or RetryPolicy()
    now = time.time()
    done: list[Outcome] = []
    again: list[Outcome] = []
    final: list[Outcome] = []
    for o in outcomes:
        if o.reply.ok:
            done.append(o)
        elif o.reply.retriable and o.request.attempts < max_attempts:
            again.append(o)
        else:
            final.append(o)
    stats = Settled()
    with session(db) as s:
        everything = len(done) == len(claim_.requests)
        done_ids = None if everything else [o.request.id for o in done]
        mine_done = _guarded(s, claim_.token, done_ids, state="completed")
        mine_final = set[int]()
        for o in final:  # each carries its own last_error
            mine_final |= _guarded(
                s,
                claim_.token,
                [o.request.id],
                state="terminated",
                last_error=o.reply.error_message,
            )
        for o in again:
            if _guarded(
                s,
                claim_.token,
                [o.request.id],
                state="queued",
                not_before=now + retry.delay(o.request.attempts),
                last_error=o.reply.error_message,
            ):
                stats.retried += 1
        ids = response_ids(len(done))
        rows = [
            (
                batch_id,
                o.request.line_no,
                o.request.custom_id,
                next(ids),
                True,
                200,
                o.reply.body,
                None,
                None,
                o.reply.prompt_tokens,
                o.reply.completion_tokens,
                o.reply.latency_ms,
                o.reply.finished_at,
                o.reused,
                now,
            )
            for o in done
            if o.request.id in mine_done
        ]
        for o in final:
            if o.request.id in mine_final:
                error = LineError(
                    code=o.reply.error_code or "engine_error",
                    message=o.reply.error_message or "the engine failed",
                    line=o.request.line_no,
                )
                rows.append(
                    _error_row(
                        batch_id,
                        o.request.line_no,
                        o.request.custom_id,
                        error,
                        o.reply.status_code,
                        now,
                        o.reply.body,
                    )
                )
        insert_ignoring_conflicts(s.connection(), Result, RESULT_COLUMNS, rows)
    stats.completed = len(mine_done)
    stats.completed_ids = mine_done
    stats.terminated = len(mine_final)
    stats.lost = len(outcomes) - stats.completed - stats.terminated - stats.retried
    return stats


# ---- progress -----------------------------------------------------------------------------


@dataclass
class Progress:
    queued: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused: int = 0
    next_due: float | None = None
    """When the earliest retry waiting in the queue becomes due."""

    @property
    def pending(self) -> int:
        return self.queued + self.processing


def progress(db: str, batch_id: str) -> Progress:
    with session(db, readonly=True) as s:
        p = Progress()
        for state, count, due in s.execute(
            select(Request.state, func.count(), func.min(Request.not_before))
            .where(Request.batch_id == batch_id, LIVE)
            .group_by(Request.state)
        ):
            setattr(p, state, count)
            if state == "queued":
                p.next_due = due
        row = s.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Result.ok, 1), else_=0)), 0),
                func.coalesce(func.sum(Result.prompt_tokens), 0),
                func.coalesce(func.sum(Result.completion_tokens), 0),
                func.coalesce(func.sum(case((Result.reused, 1), else_=0)), 0),
            ).where(Result.batch_id == batch_id)
        ).one()
        total, ok, p.prompt_tokens, p.completion_tokens, p.reused = (int(v) for v in row)
        p.completed, p.failed = ok, total - ok
        return p


def track_stats(db: str, track: str, version: str, since: float) -> TrackStats:
    """What one release track did since `since`: requests, model errors (not rejected input
    lines), latency percentiles and output speed."""
    with session(db, readonly=True) as s:
        batch_ids = list(
            s.scalars(
                select(Batch.id).where(
                    Batch.release_track == track,
                    Batch.release_version == version,
                    Batch.created_at >= int(since),
                )
            )
        )
    return batch_stats(db, batch_ids)


def batch_stats(db: str, batch_ids: Sequence[str]) -> TrackStats:
    """Requests, model errors (rejected input lines excluded), latency percentiles and output
    speed of some batches — computed in the database, so a million-row batch is never loaded."""
    answered = and_(
        Result.batch_id.in_(list(batch_ids)), or_(Result.status_code.is_not(None), Result.ok)
    )
    timed = and_(answered, Result.ok, Result.latency_ms.is_not(None))
    with session(db, readonly=True) as s:
        requests, failed, tokens, first, last = s.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Result.ok, 0), else_=1)), 0),
                func.coalesce(func.sum(Result.completion_tokens), 0),
                func.min(Result.finished_at - func.coalesce(Result.latency_ms, 0) / 1000.0),
                func.max(Result.finished_at),
            ).where(answered)
        ).one()
        n = s.scalar(select(func.count()).where(timed)) or 0

        def nearest_rank(q: float) -> float | None:
            if n == 0:
                return None
            rank = min(n - 1, max(0, math.ceil(q * n) - 1))
            latency = select(Result.latency_ms).where(timed).order_by(Result.latency_ms)
            return s.scalar(latency.offset(rank).limit(1))

        p50, p95 = nearest_rank(0.5), nearest_rank(0.95)
    return TrackStats(
        batches=len(batch_ids),
        requests=int(requests),
        failed=int(failed),
        p50_ms=p50,
        p95_ms=p95,
        output_tokens=int(tokens),
        seconds=float(last - first) if last is not None else 0.0,
    )


def _answer_text(body: str) -> str:
    choice = orjson.loads(body)["choices"][0]
    return str(choice.get("text") or (choice.get("message") or {}).get("content") or "")


def track_agreement(
    db: str, stable_version: str, candidate_version: str, since: float
) -> tuple[int, int]:
    """(pairs, agreeing): deterministic requests (same canonical body) that both tracks
    answered since `since`, and how many of those got the same first answer."""
    answers: dict[str, dict[str, str]] = {}
    with session(db, readonly=True) as s:
        for track, version in (("stable", stable_version), ("candidate", candidate_version)):
            rows = s.execute(
                select(Request.cache_digest, Result.body)
                .join(Batch, Batch.id == Request.batch_id)
                .join(
                    Result,
                    and_(Result.batch_id == Request.batch_id, Result.line_no == Request.line_no),
                )
                .where(
                    Batch.release_track == track,
                    Batch.release_version == version,
                    Batch.created_at >= int(since),
                    Request.cache_digest.is_not(None),
                    Result.ok,
                )
            )
            answers[track] = {digest: _answer_text(body) for digest, body in rows}
    shared = answers["stable"].keys() & answers["candidate"].keys()
    same = sum(1 for d in shared if answers["stable"][d] == answers["candidate"][d])
    return len(shared), same


def settled_requests(db: str, batch_id: str) -> int:
    """Accepted requests that already have their result (completed or terminated)."""
    with session(db, readonly=True) as s:
        return int(
            s.scalar(
                select(func.count()).where(
                    Request.batch_id == batch_id, Request.state.in_(("completed", "terminated"))
                )
            )
            or 0
        )


def first_errors_json(db: str, batch_id: str, limit: int = 20) -> str:
    """The first errors of a batch, for the `errors` of a batch object that failed."""
    with session(db, readonly=True) as s:
        rows = s.execute(
            select(Result.line_no, Result.error_code, Result.error_message)
            .where(Result.batch_id == batch_id, Result.ok.is_(False))
            .order_by(Result.line_no)
            .limit(limit)
        ).all()
    return orjson.dumps(
        [{"code": code, "message": message, "line": line} for line, code, message in rows]
    ).decode()


class ResultLine(NamedTuple):
    """What a file line is made of: a row of `iter_results`."""

    line_no: int
    custom_id: str | None
    response_id: str
    ok: bool
    status_code: int | None
    body: str | None
    error_code: str | None
    error_message: str | None


def iter_results(db: str, batch_id: str, chunk: int = 5000) -> Iterator[ResultLine]:
    """Every result row of a batch in line order, streamed (a million rows never in memory)
    and fetched at the driver: building a SQLAlchemy row, let alone an ORM object, per line
    was most of finalize."""
    stmt = (
        select(
            Result.line_no,
            Result.custom_id,
            Result.response_id,
            Result.ok,
            Result.status_code,
            Result.body,
            Result.error_code,
            Result.error_message,
        )
        .where(Result.batch_id == batch_id)
        .order_by(Result.line_no)
    )
    with session(db, readonly=True) as s:
        for rows in driver_stream(s.connection(), stmt, chunk):
            yield from map(ResultLine._make, rows)
