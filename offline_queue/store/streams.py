"""A Redis stream's entries in the queue (offline_queue/streams.py takes them): queued in the
transaction that records them, so a redelivered entry is found and never queued twice; their
results leased to one consumer at a time to reply; their batches closed once all is replied."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.errors import UniqueViolation
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from offline_queue.findings import Accepted
from offline_queue.states import BatchStatus
from offline_queue.store import clock
from offline_queue.store.batches import new_batch
from offline_queue.store.bulk import copy_rows, insert_ignoring_conflicts
from offline_queue.store.db import session
from offline_queue.store.ingest import REQUEST_COLUMNS, copy_requests, queued_row
from offline_queue.store.results import RESULT_LINE, ResultLine
from offline_queue.store.tables import LIVE, Batch, Request, Result, StreamEntry
from offline_queue.submission import Submission

SOURCE = "stream"
OPEN = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
"""A stream batch's statuses until all its entries are replied."""
ENTRY_COLUMNS = ("stream", "custom_id", "entry_id", "batch_id", "line_no", "reply_to")


@dataclass(frozen=True)
class Entry:
    """One valid entry: where it came from, where its answer goes, its request."""

    entry_id: str
    reply_to: str
    line: Accepted


def queue_entries(
    db: str, stream: str, sub: Submission, route: str, entries: Sequence[Entry]
) -> list[str]:
    """Queue the entries whose custom_id the stream has not seen, as one batch (`sub`), with
    their stream_entries rows, in one transaction. Returns the entry ids queued now; the
    others were taken before (a redelivery, a repeat) and wait for, or have, their answer."""
    rows = [
        (stream, e.line.custom_id, e.entry_id, sub.id, n, e.reply_to)
        for n, e in enumerate(entries, 1)
    ]
    with session(db) as s:
        new = _record_new(s, rows)
        fresh: list[tuple[int, Entry]] = []
        for n, e in enumerate(entries, 1):
            if e.line.custom_id in new:  # the first of a custom_id twice in one read
                new.discard(e.line.custom_id)
                fresh.append((n, e))
        if not fresh:
            return []
        batch = new_batch(sub, created_at=clock.seconds(s))
        batch.source, batch.route = SOURCE, route
        batch.total_lines, batch.ingested_through, batch.ingest_done = len(fresh), len(fresh), True
        s.add(batch)
        s.flush()
        conn = s.connection()
        if conn.dialect.name == "postgresql":
            copy_requests(conn, sub.id, [(n, e.line) for n, e in fresh])
        else:
            rows = [queued_row(sub.id, n, e.line) for n, e in fresh]
            insert_ignoring_conflicts(conn, Request, REQUEST_COLUMNS, rows)
    return [e.entry_id for _, e in fresh]


def _record_new(s: Session, rows: Sequence[tuple[Any, ...]]) -> set[str]:
    """Write the stream_entries rows whose (stream, custom_id) is new; their custom_ids. The
    key decides: an entry whose key is there is not queued again. On PostgreSQL the first row
    of each custom_id is COPYed (a third of an insert's time, client and server) in a
    savepoint; a key already there (a redelivery, another consumer's entry) fails the COPY,
    and the rows go again as an insert that skips what is there."""
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        firsts = {row[1]: row for row in reversed(rows)}  # custom_id → its first row
        driver: Any = conn.connection.driver_connection
        try:
            with driver.transaction():  # a savepoint in the session's transaction
                copy_rows(conn, StreamEntry, ENTRY_COLUMNS, list(firsts.values()))
            return set(firsts)
        except UniqueViolation:
            pass
    return set(insert_ignoring_conflicts(conn, StreamEntry, ENTRY_COLUMNS, rows, "custom_id"))


@dataclass(frozen=True)
class Reply:
    reply_to: str
    custom_id: str
    result: ResultLine


def claim_replies(
    db: str, stream: str, owner: str, limit: int, lease_seconds: float
) -> list[Reply]:
    """Lease up to `limit` answered, unreplied entries of the stream to this consumer."""
    free = or_(StreamEntry.reply_lease.is_(None), StreamEntry.reply_lease < clock.now())
    answered = and_(Result.batch_id == StreamEntry.batch_id, Result.line_no == StreamEntry.line_no)
    with session(db) as s:
        batch_ids = _answered_batches(s, stream)
        if not batch_ids:
            return []
        keys = s.execute(
            select(StreamEntry.custom_id)
            .where(
                StreamEntry.stream == stream,
                StreamEntry.batch_id.in_(batch_ids),
                StreamEntry.replied_at.is_(None),
                free,
                exists().where(answered),
            )
            .limit(limit)
        ).scalars()
        taken = list(
            s.scalars(
                update(StreamEntry)
                .where(
                    StreamEntry.stream == stream,
                    StreamEntry.custom_id.in_(list(keys)),
                    StreamEntry.replied_at.is_(None),
                    free,
                )
                .values(reply_owner=owner, reply_lease=clock.now() + lease_seconds)
                .returning(StreamEntry.custom_id)
            )
        )
        rows = s.execute(
            select(StreamEntry.reply_to, StreamEntry.custom_id, *RESULT_LINE)
            .join(Result, answered)
            .where(StreamEntry.stream == stream, StreamEntry.custom_id.in_(taken))
        ).all()
    return [Reply(r[0], r[1], ResultLine(*r[2:])) for r in rows]


def replied(db: str, stream: str, owner: str, custom_ids: Sequence[str]) -> None:
    with session(db) as s:
        s.execute(
            update(StreamEntry)
            .where(
                StreamEntry.stream == stream,
                StreamEntry.custom_id.in_(list(custom_ids)),
                StreamEntry.reply_owner == owner,
            )
            .values(replied_at=clock.now(), reply_owner=None, reply_lease=None)
        )


def close_batches(db: str, stream: str) -> int:
    """Complete the stream's batches whose every entry is replied (nothing left to serve).
    Only batches with an answer can be; each is looked up by its id, which keeps the look
    cheap whatever the planner believes of a table that grew since its statistics (it once
    scanned every unreplied entry of the stream for each open batch: 0.3 s a look at 100,000)."""
    with session(db) as s:
        candidates = _answered_batches(s, stream)
        if not candidates:
            return 0
        unreplied = select(StreamEntry.batch_id).where(
            StreamEntry.stream == stream,
            StreamEntry.batch_id.in_(candidates),
            StreamEntry.replied_at.is_(None),
        )
        live = select(Request.batch_id).where(Request.batch_id.in_(candidates), LIVE)
        busy = set(s.scalars(unreplied.distinct())) | set(s.scalars(live.distinct()))
        done = [b for b in candidates if b not in busy]
        if done:  # one UPDATE, past the outbox's flush hook: a stream's batches raise no event
            s.execute(
                update(Batch)
                .where(Batch.id.in_(done), Batch.status.in_(OPEN))
                .values(status=BatchStatus.COMPLETED, completed_at=clock.now_seconds())
            )
    return len(done)


def _answered_batches(s: Session, stream: str) -> list[str]:
    """The stream's open batches that have an answer: the only ones with entries to reply to,
    or to close (a probe per open batch, not per entry, however many entries wait)."""
    return list(
        s.scalars(
            select(Batch.id).where(
                Batch.source == SOURCE,
                Batch.input_path == input_path(stream),
                Batch.status.in_(OPEN),
                exists().where(Result.batch_id == Batch.id),
            )
        )
    )


def input_path(stream: str) -> str:
    """What a stream batch names as its input: the stream it was read from."""
    return f"redis-stream:{stream}"


def waiting(db: str, stream: str) -> int:
    """The stream's entries queued and not yet answered: the backlog a consumer stops reading
    at (the stream itself holds the rest)."""
    with session(db, readonly=True) as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(Request)
                .join(Batch, Batch.id == Request.batch_id)
                .where(Batch.source == SOURCE, Batch.input_path == input_path(stream), LIVE)
            )
            or 0
        )
