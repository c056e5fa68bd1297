"""Results: one row per line of a batch file, the output or the error, and what is read back from
them — a batch's progress, its first errors, its rows in line order for the output files. The row
layout (RESULT_COLUMNS) and the error row live here because three writers share them: ingest
(rejected lines), settles (answers and final errors) and drops (cancel, expiry).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from sqlalchemy import case, func, select, update

from offline_queue.batch_object import LineError
from offline_queue.states import SETTLED_STATES, RequestState
from offline_queue.store import clock
from offline_queue.store.bulk import driver_stream, insert_ignoring_conflicts
from offline_queue.store.db import session
from offline_queue.store.tables import LIVE, Request, Result

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


def response_ids(n: int) -> Iterator[str]:
    """`n` response ids from one read of the random source (a chunk's worth)."""
    pool = os.urandom(16 * n).hex()
    return (f"batch_req_{pool[i : i + 32]}" for i in range(0, 32 * n, 32))


def response_id() -> str:
    return next(response_ids(1))


def error_row(
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


def drop_queued(db: str, batch_id: str, code: str, message: str) -> int:
    """Every still-queued request of the batch gets its error row (`code`) and leaves the
    queue; requests in flight finish. Returns how many were dropped. (The rows' `created_at`
    is this machine's time: it is shown, never compared.)"""
    now = time.time()
    with session(db) as s:
        rows = s.execute(
            update(Request)
            .where(Request.batch_id == batch_id, Request.state == RequestState.QUEUED)
            .values(state=RequestState.TERMINATED, last_error=message)
            .returning(Request.line_no, Request.custom_id)
            .execution_options(synchronize_session=False)
        ).all()
        error = LineError(code=code, message=message)
        insert_ignoring_conflicts(
            s.connection(),
            Result,
            RESULT_COLUMNS,
            [error_row(batch_id, line, cid, error, None, now) for line, cid in rows],
        )
    return len(rows)


@dataclass
class Progress:
    queued: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused: int = 0
    due_in: float | None = None
    """Seconds until the earliest retry waiting in the queue is due, by the store's clock (a
    worker's own clock may be off), so a worker with nothing to claim knows how long to wait."""

    @property
    def pending(self) -> int:
        return self.queued + self.processing


def pending(db: str, batch_id: str) -> int:
    """Requests of the batch still to serve: one count over the queue's partial index, cheap
    enough for a run to ask every fraction of a second however large the batch."""
    with session(db, readonly=True) as s:
        return int(s.scalar(select(func.count()).where(Request.batch_id == batch_id, LIVE)) or 0)


def progress(db: str, batch_id: str) -> Progress:
    with session(db, readonly=True) as s:
        p = Progress()
        for state, count, due_in in s.execute(
            select(Request.state, func.count(), func.min(Request.not_before) - clock.now())
            .where(Request.batch_id == batch_id, LIVE)
            .group_by(Request.state)
        ):
            setattr(p, state, count)
            if state == RequestState.QUEUED:
                p.due_in = due_in
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


def settled_requests(db: str, batch_id: str) -> int:
    """Accepted requests that already have their result (completed or terminated)."""
    with session(db, readonly=True) as s:
        return int(
            s.scalar(
                select(func.count()).where(
                    Request.batch_id == batch_id, Request.state.in_(SETTLED_STATES)
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


RESULT_LINE = (
    Result.line_no,
    Result.custom_id,
    Result.response_id,
    Result.ok,
    Result.status_code,
    Result.body,
    Result.error_code,
    Result.error_message,
)
"""The columns a ResultLine is made of, in its order."""


def iter_results(
    db: str, batch_id: str, chunk: int = 5000, ok: bool | None = None
) -> Iterator[ResultLine]:
    """Every result row of a batch in line order (only the outputs, or only the errors, when
    `ok` says), streamed (a million rows never in memory) and fetched at the driver: building
    a SQLAlchemy row, let alone an ORM object, per line was most of finalize."""
    stmt = select(*RESULT_LINE).where(Result.batch_id == batch_id).order_by(Result.line_no)
    if ok is not None:
        stmt = stmt.where(Result.ok.is_(ok))
    with session(db, readonly=True) as s:
        for rows in driver_stream(s.connection(), stmt, chunk):
            yield from map(ResultLine._make, rows)
