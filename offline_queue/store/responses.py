"""Single responses in the queue: one request each, in a batch of its own (`source` =
`response`) that no flow run owns — the serving loops answer it like any other, and whoever
looks (the API's watch, a poll, the waiting call) closes it once its request has its result,
which raises its `response.*` event (store/outbox.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import exists, insert, select, update
from sqlalchemy.orm import Session

from offline_queue.findings import Accepted
from offline_queue.states import LIVE_STATES, BatchStatus, RequestState
from offline_queue.store import clock
from offline_queue.store.admission import RUNNABLE
from offline_queue.store.db import session
from offline_queue.store.ingest import REQUEST_COLUMNS, queued_row
from offline_queue.store.results import RESULT_LINE, ResultLine
from offline_queue.store.tables import LIVE, Batch, Request, Result
from offline_queue.submission import Submission

SOURCE = "response"
WINDOW_SECONDS = 24 * 3600
"""A single response not answered within a day expires (OpenAI keeps background ones as long)."""


def create(db: str, sub: Submission, route: str, line: Accepted) -> Batch:
    """Queue one admitted request (admission.Glance), in one transaction."""
    values = {
        **sub.columns(),
        "status": BatchStatus.VALIDATING,
        "source": SOURCE,
        "route": route,
        "total_lines": 1,
        "ingested_through": 1,
        "ingest_done": True,
    }
    with session(db) as s:  # two statements: a thousand of these a second is the door's work
        conn = s.connection()
        created = conn.execute(_NEW_BATCH, values).scalar_one()
        row = queued_row(sub.id, 1, line)
        conn.execute(_NEW_REQUEST, dict(zip(REQUEST_COLUMNS, row, strict=True)))
    return Batch(**values, created_at=created)


# Built once, with their parameters named by the values given at each call: building an ORM
# insert from a dict of values cost more than half of a create's time in SQLAlchemy.
_NEW_BATCH = (
    insert(Batch)
    .values(
        created_at=clock.now_seconds(),
        expires_at=clock.now_seconds() + WINDOW_SECONDS,
    )
    .returning(Batch.created_at)
)
_NEW_REQUEST = insert(Request)


@dataclass(frozen=True)
class Seen:
    """A response as the store has it: its batch, its request's state, its result if any."""

    batch: Batch
    state: str | None
    result: ResultLine | None


def look(db: str, tenant: str, response_id: str) -> Seen | None:
    """The tenant's response (None for another tenant's, or none); closed, and read again, when
    its result is in and nobody closed it yet. A look while it waits writes nothing: a
    synchronous call looks every 50 ms."""
    seen = _read(db, tenant, response_id)
    if (
        seen is not None
        and seen.batch.status in RUNNABLE
        and seen.state not in LIVE_STATES
        and close(db, response_id)
    ):
        seen = _read(db, tenant, response_id)
    return seen


def _read(db: str, tenant: str, response_id: str) -> Seen | None:
    with session(db, readonly=True) as s:
        batch = s.scalar(
            select(Batch).where(
                Batch.id == response_id, Batch.tenant == tenant, Batch.source == SOURCE
            )
        )
        if batch is None:
            return None
        state = s.scalar(select(Request.state).where(Request.batch_id == response_id))
        row = s.execute(select(*RESULT_LINE).where(Result.batch_id == response_id)).first()
    return Seen(batch, state, ResultLine(*row) if row is not None else None)


def close(db: str, response_id: str | None = None, limit: int = 500) -> int:
    """Move answered responses (one, or up to `limit`) to their terminal status: completed
    with a good answer, failed with an error; and (all of them) those past their window
    unanswered to expired (OpenAI's `incomplete`)."""
    live = exists().where(Request.batch_id == Batch.id, LIVE)
    q = select(Batch).where(Batch.source == SOURCE, Batch.status.in_(RUNNABLE), ~live)
    q = q.where(Batch.id == response_id) if response_id else q.limit(limit)
    with session(db) as s:
        done = list(s.scalars(q.with_for_update(skip_locked=True)))
        for batch in done:
            ok = s.scalar(select(Result.ok).where(Result.batch_id == batch.id))
            status = BatchStatus.COMPLETED if ok else BatchStatus.FAILED
            batch.status = status
            stamp = "completed_at" if ok else "failed_at"
            setattr(batch, stamp, clock.now_seconds())
        if response_id is None:  # the watch also ends those nobody served within their window
            late = s.scalars(
                select(Batch)
                .where(
                    Batch.source == SOURCE,
                    Batch.status.in_(RUNNABLE),
                    Batch.expires_at < clock.now_seconds(),
                )
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            for batch in late:
                _drop_queued(s, batch.id, "expired")
                batch.status = BatchStatus.EXPIRED
                batch.expired_at = clock.now_seconds()
    return len(done)


def _drop_queued(s: Session, batch_id: str, why: str) -> None:
    s.execute(
        update(Request)
        .where(Request.batch_id == batch_id, Request.state == RequestState.QUEUED)
        .values(state=RequestState.TERMINATED, last_error=why)
        .execution_options(synchronize_session=False)
    )


def cancel(db: str, tenant: str, response_id: str) -> bool:
    """Cancel the tenant's response if it is not done: a queued request leaves the queue; one in
    the engine finishes there, its answer unused. False when there is none to cancel."""
    with session(db) as s:
        batch = s.scalar(
            select(Batch)
            .where(Batch.id == response_id, Batch.tenant == tenant, Batch.source == SOURCE)
            .with_for_update()
        )
        if batch is None or batch.status not in RUNNABLE:
            return False
        _drop_queued(s, response_id, "cancelled")
        batch.status = BatchStatus.CANCELLED
        batch.cancelled_at = clock.now_seconds()
    return True
