"""A Redis stream's entries in the queue (offline_queue/streams.py takes them): queued in the
transaction that records them, so a redelivered entry is found and never queued twice; their
results leased to one consumer at a time to reply; their batches closed once all is replied."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, or_, select, update

from offline_queue.findings import Accepted
from offline_queue.states import BatchStatus
from offline_queue.store import clock
from offline_queue.store.batches import new_batch
from offline_queue.store.bulk import insert_ignoring_conflicts
from offline_queue.store.db import session
from offline_queue.store.ingest import REQUEST_COLUMNS, queued_row
from offline_queue.store.results import RESULT_LINE, ResultLine
from offline_queue.store.tables import LIVE, Batch, Request, Result, StreamEntry
from offline_queue.submission import Submission

SOURCE = "stream"
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
        # The key decides: an entry whose (stream, custom_id) is there is not queued again.
        new = set(
            insert_ignoring_conflicts(
                s.connection(), StreamEntry, ENTRY_COLUMNS, rows, returning="custom_id"
            )
        )
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
        insert_ignoring_conflicts(
            s.connection(),
            Request,
            REQUEST_COLUMNS,
            [queued_row(sub.id, n, e.line) for n, e in fresh],
        )
    return [e.entry_id for _, e in fresh]


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
    # Only the stream's open batches that have an answer are looked into: a look stays cheap
    # while a surge of unanswered entries waits (a probe per open batch, not per entry).
    answered_batches = select(Batch.id).where(
        Batch.source == SOURCE,
        Batch.input_path == input_path(stream),
        Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)),
        exists().where(Result.batch_id == Batch.id),
    )
    with session(db) as s:
        batch_ids = list(s.scalars(answered_batches))
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
    """Complete the stream's batches whose every entry is replied (nothing left to serve)."""
    unreplied = exists().where(
        StreamEntry.stream == stream,
        StreamEntry.batch_id == Batch.id,
        StreamEntry.replied_at.is_(None),
    )
    live = exists().where(Request.batch_id == Batch.id, LIVE)
    with session(db) as s:
        done = list(
            s.scalars(
                select(Batch)
                .where(
                    Batch.source == SOURCE,
                    Batch.input_path == input_path(stream),
                    Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)),
                    ~unreplied,
                    ~live,
                )
                .limit(100)
            )
        )
        for batch in done:
            batch.status = BatchStatus.COMPLETED
            batch.completed_at = clock.now_seconds()
    return len(done)


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
