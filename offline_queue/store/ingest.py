"""Ingest: a batch file's lines into the queue — accepted lines as `requests`, rejected ones as
their error rows — in groups that each commit with the batch's `ingested_through` watermark, so
an interrupted ingest resumes after the last committed line and never queues one twice. SQLite
inserts each group under its one writer; PostgreSQL streams it in with COPY (`_ingest_by_copy`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select, update

from offline_queue.findings import Accepted, Rejected
from offline_queue.states import RequestState
from offline_queue.store.bulk import (
    COPY_ROWS_PER_WRITE,
    copy_lines,
    copy_text,
    insert_ignoring_conflicts,
)
from offline_queue.store.db import get_engine, session
from offline_queue.store.results import RESULT_COLUMNS, error_row
from offline_queue.store.tables import Batch, Request, Result

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
    "prefix_key",
)
"""The columns ingest fills: the rest start empty."""


def queued_row(batch_id: str, line_no: int, item: Accepted) -> tuple[Any, ...]:
    """A request just queued, in REQUEST_COLUMNS order (a file's line, a stream entry, a single
    response)."""
    return (
        batch_id,
        line_no,
        item.custom_id,
        item.url,
        item.body_json,
        item.cache_digest,
        RequestState.QUEUED,
        0,
        0.0,
        item.prefix_key,
    )


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
    requests of a group are streamed in with COPY (`_ingest_by_copy`).
    """
    if get_engine(db).dialect.name == "postgresql":
        return _ingest_by_copy(db, batch_id, items, group_size, time.time())
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
            requests.append(queued_row(batch_id, item.line_no, item))
        else:
            report.rejected += 1
            rejections.append(
                error_row(batch_id, item.line_no, item.custom_id, item.error, None, now)
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


# ---- PostgreSQL: COPY ---------------------------------------------------------------------


_QUEUED_TAIL = f"\t{RequestState.QUEUED.value}\t0\t0\t"
"""The columns of a COPY row after cache_digest: state, attempts, not_before of a request just
queued; its prefix_key (hex, nothing to escape) and the newline follow."""
_COPY_REQUESTS = (
    "COPY requests (batch_id, line_no, custom_id, url, body, cache_digest, state, attempts, "
    "not_before, prefix_key) FROM STDIN"
)


def _copy_row(head: str, line_no: int, item: Accepted) -> str:
    """A request just queued as a line of COPY text; `head` is its batch_id column."""
    return (
        f"{head}{line_no}\t{copy_text(item.custom_id)}\t{item.url}\t"
        # JSON from orjson: no raw control characters to escape
        f"{item.body_json.replace(chr(92), chr(92) * 2)}\t"
        f"{item.cache_digest or chr(92) + 'N'}{_QUEUED_TAIL}{item.prefix_key}\n"
    )


def copy_requests(conn: Connection, batch_id: str, items: Sequence[tuple[int, Accepted]]) -> None:
    """PostgreSQL: queue (line_no, line) pairs of a batch no other writer has with COPY, in
    `conn`'s transaction: a third of the client's time of an array insert, which dumps every
    value of every row on its own."""
    head = copy_text(batch_id) + "\t"
    copy_lines(conn, _COPY_REQUESTS, (_copy_row(head, n, item) for n, item in items))


def _ingest_by_copy(
    db: str, batch_id: str, items: Iterable[Accepted | Rejected], group_size: int, now: float
) -> IngestReport:
    """Ingest on PostgreSQL: each group of lines is streamed into `requests` with COPY while
    it is being validated, under a lock on the batch's row, and commits with the
    `ingested_through` watermark.

    Why no `ON CONFLICT` is needed: a group's transaction first locks the batch row (FOR NO
    KEY UPDATE, so workers settling other batches' rows are not blocked) and reads the
    watermark W; every line ≤ W is committed and no line > W is, because each group commits
    its lines and moves W past them in one transaction, and an ingester's next group starts
    right after its last committed one (its first group after the W it read at start, which
    only grew since). So the group copies exactly its lines > W, and a second worker
    ingesting the same batch at the same time waits on the lock, then skips what the first
    committed — both derive the same rows from the same file (duplicates are decided by the
    lines before, which are the same for both). An interrupted group rolls back whole; the
    next pass resumes after W.
    """
    report = IngestReport()
    endpoints = report.endpoints
    stream = iter(items)
    head = copy_text(batch_id) + "\t"
    with get_engine(db).connect() as conn:
        driver = conn.connection.driver_connection  # the psycopg connection, for COPY
        assert driver is not None
        exhausted = False
        while not exhausted:
            with conn.begin():
                through = conn.execute(
                    select(Batch.ingested_through)
                    .where(Batch.id == batch_id)
                    .with_for_update(key_share=True)  # FOR NO KEY UPDATE
                ).scalar_one()
                rejections: list[tuple[Any, ...]] = []
                rows: list[str] = []
                last_line = taken = 0
                exhausted = True
                with driver.cursor() as cur, cur.copy(_COPY_REQUESTS) as copy:
                    # Rows go out as COPY text, a few hundred per write: psycopg's write_row
                    # cost twice as much client time per row.
                    for item in stream:
                        last_line = item.line_no
                        taken += 1
                        if type(item) is Accepted:
                            report.accepted += 1
                            endpoints.add(item.url)
                            if last_line > through:
                                rows.append(_copy_row(head, last_line, item))
                                if len(rows) >= COPY_ROWS_PER_WRITE:
                                    copy.write("".join(rows))
                                    rows.clear()
                        else:
                            assert isinstance(item, Rejected)
                            report.rejected += 1
                            if last_line > through:
                                rejections.append(
                                    error_row(
                                        batch_id, last_line, item.custom_id, item.error, None, now
                                    )
                                )
                        if taken >= group_size:
                            exhausted = False
                            break
                    if rows:
                        copy.write("".join(rows))
                insert_ignoring_conflicts(conn, Result, RESULT_COLUMNS, rejections)
                if last_line > through:
                    conn.execute(
                        update(Batch)
                        .where(Batch.id == batch_id, Batch.ingested_through < last_line)
                        .values(ingested_through=last_line)
                    )
    return report
