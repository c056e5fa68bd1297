"""Claims: leasing the next chunk of the queue to a serving loop in one statement (the claim order
of docs/scheduling.md), keeping the leases alive, and settling them — a chunk's results and state
changes in one transaction, guarded by the claim's token, so a late or replayed settle from an
expired lease inserts nothing. (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session

from offline_queue.batch_object import LineError
from offline_queue.engines.base import Reply
from offline_queue.gpu_time import EngineUse
from offline_queue.retry import RetryPolicy
from offline_queue.states import BatchStatus, RequestState, Tier
from offline_queue.store import clock, gpu_time
from offline_queue.store.bulk import driver_rows, insert_ignoring_conflicts
from offline_queue.store.db import session
from offline_queue.store.results import RESULT_COLUMNS, error_row, response_ids
from offline_queue.store.tables import LIVE, Batch, Request, Result


def new_owner() -> str:
    """A worker identity: host and pid for people, a random suffix so pid reuse never collides."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Claimed(NamedTuple):
    """A claimed request: the claim's RETURNING row as it comes from the driver."""

    id: int
    line_no: int
    custom_id: str
    url: str
    body: str
    cache_digest: str | None
    attempts: int
    prefix_key: str


@dataclass
class Claim:
    token: str
    owner: str
    requests: list[Claimed]
    batch_id: str
    """A claim is a chunk of one batch."""
    tier: Tier = Tier.STANDARD
    max_attempts: int = 3


def _claim_order(r: Claimed) -> tuple[str, int]:
    return r.prefix_key, r.id


TIER_RANK = case({str(t): t.rank for t in Tier}, value=Batch.tier, else_=len(Tier) + 1)
"""The batch's Tier.rank in SQL: 1 is the most urgent."""
CLAIMABLE_STATUSES = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
"""A cancelling batch's queued requests are dropped by its run, not served."""


def claim(db: str, batch_id: str, owner: str, limit: int, lease_seconds: float) -> Claim | None:
    """`claim_next` of one batch (tests and benchmarks that drive one batch by hand)."""
    return claim_next(db, owner, limit, lease_seconds, batch_id=batch_id)


def claim_next(
    db: str,
    owner: str,
    limit: int,
    lease_seconds: float,
    *,
    routes: Sequence[str] | None = None,
    batch_id: str | None = None,
    model_version: str | None = None,
    max_rank: int | None = None,
) -> Claim | None:
    """Lease up to `limit` requests of the batch that comes next on `routes` (or of `batch_id`):
    queued ones that are due, and those whose lease ran out (a crashed or stalled loop).

    Which batch comes next, in one statement (docs/scheduling.md): the most urgent tier
    (strict), then a batch that would miss its window (`late_at`) before the others, then the
    lowest weighted clock (`vtime`: requests claimed / weight — weights 1:3 get 1:3 of the
    requests while both have work; a batch not yet served comes first, once), then the oldest.
    Within the batch, prefix order (`prefix_key`, offline_queue/prefix.py). `max_rank` keeps
    to batches of that tier rank or more urgent (a loop whose engine is full looks only for
    work more urgent than what it holds).

    PostgreSQL skips rows another loop is claiming right now (SKIP LOCKED); SQLite serialises
    claims with BEGIN IMMEDIATE. Due and expired are judged, and the new lease stamped, by the
    store's clock: a loop whose clock runs ahead must not see another's live lease as over.
    The same transaction moves the batch's clock and marks it `in_progress`."""
    now = clock.now()
    token = uuid.uuid4().hex
    due = or_(
        and_(Request.state == RequestState.QUEUED, Request.not_before <= now),
        and_(Request.state == RequestState.PROCESSING, Request.lease_expires < now),
    )
    has_work = exists().where(Request.batch_id == Batch.id, LIVE, due)
    candidates = select(Batch.id).where(
        Batch.status.in_(CLAIMABLE_STATUSES),
        or_(Batch.expires_at.is_(None), Batch.expires_at > now),
        has_work,
    )
    if routes is not None:
        candidates = candidates.where(Batch.route.in_(list(routes)))
    if batch_id is not None:
        candidates = candidates.where(Batch.id == batch_id)
    if max_rank is not None:
        candidates = candidates.where(max_rank >= TIER_RANK)
    chosen = (
        candidates.order_by(
            TIER_RANK,
            Batch.late_at.is_(None),
            Batch.vtime.is_not(None),
            Batch.vtime,
            Batch.created_at,
            Batch.id,
        )
        .limit(1)
        .scalar_subquery()
    )
    claimable = (
        select(Request.id)
        .where(Request.batch_id == chosen, LIVE, due)
        .order_by(Request.prefix_key, Request.id)  # the claimable index's order
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(Request)
        .where(Request.id.in_(claimable.scalar_subquery()))
        .values(
            state=RequestState.PROCESSING,
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
            Request.prefix_key,
            Request.batch_id,
        )
        .execution_options(synchronize_session=False)
    )
    with session(db) as s:
        rows = driver_rows(s.connection(), stmt)
        if not rows:
            return None
        bid = rows[0][-1]
        batch = _advance(s, bid, len(rows), model_version)
    claimed = [Claimed._make(row[:-1]) for row in rows]
    claimed.sort(key=_claim_order)  # RETURNING order is not the claim's ORDER BY
    return Claim(
        token=token,
        owner=owner,
        requests=claimed,
        batch_id=bid,
        tier=Tier(batch.tier),
        max_attempts=batch.max_attempts,
    )


def _advance(s: Session, batch_id: str, claimed: int, model_version: str | None) -> Batch:
    """The claimed batch's clock moves by `claimed / weight` (a first claim starts it at the
    lowest clock of its tier's live batches: a newcomer neither waits for the others' past
    nor takes their future), and it is `in_progress` from its first chunk on."""
    batch = s.get(Batch, batch_id)
    assert batch is not None
    if batch.vtime is None:
        floor = s.scalar(
            select(func.min(Batch.vtime)).where(
                Batch.tier == batch.tier,
                Batch.status.in_(CLAIMABLE_STATUSES),
                Batch.vtime.is_not(None),
                Batch.id != batch_id,
            )
        )
        batch.vtime = float(floor or 0.0)
    batch.vtime += claimed / max(batch.weight, 1)
    if batch.status == BatchStatus.VALIDATING:
        batch.status = BatchStatus.IN_PROGRESS
        if batch.in_progress_at is None:
            batch.in_progress_at = clock.now_seconds()
    if model_version and batch.model_version is None:
        batch.model_version = model_version
    return batch


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
            .where(Request.lease_token.in_(list(tokens)), Request.state == RequestState.PROCESSING)
            .values(lease_expires=clock.now() + lease_seconds)
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


def _guarded(s: Session, token: str, ids: list[int] | None, **values: Any) -> set[int]:
    """Update the rows still leased under `token` (`ids` of them, or None: all of them);
    returns which ones that was. All of them is the common case, and the token's index finds
    them without a parameter per row."""
    if ids is not None and not ids:
        return set()
    mine = and_(Request.lease_token == token, Request.state == RequestState.PROCESSING)
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
    used: EngineUse | None = None,
) -> Settled:
    """Commit a chunk: results, state changes, cache entries and the engine-seconds it used
    (counted even when its lease was lost: the engine did the work) in one transaction.

    A retry's `not_before` is the store's time plus its backoff, so any worker judges it due at
    the same moment. The rows' `created_at` is this worker's time: it only says when the chunk
    was committed, nothing compares it, and the rows go to the driver as plain tuples."""
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
        mine_done = _guarded(s, claim_.token, done_ids, state=RequestState.COMPLETED)
        mine_final = set[int]()
        for o in final:  # each carries its own last_error
            mine_final |= _guarded(
                s,
                claim_.token,
                [o.request.id],
                state=RequestState.TERMINATED,
                last_error=o.reply.error_message,
            )
        for o in again:
            if _guarded(
                s,
                claim_.token,
                [o.request.id],
                state=RequestState.QUEUED,
                not_before=clock.now() + retry.delay(o.request.attempts),
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
                    error_row(
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
        if used is not None:
            gpu_time.record(s, batch_id, used, loop=claim_.owner)
    stats.completed = len(mine_done)
    stats.completed_ids = mine_done
    stats.terminated = len(mine_final)
    stats.lost = len(outcomes) - stats.completed - stats.terminated - stats.retried
    return stats
