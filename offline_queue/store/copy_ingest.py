"""Ingest on PostgreSQL: each group of lines is streamed into `requests` with COPY while it is
being validated, under a lock on the batch's row, and commits with the `ingested_through`
watermark.

Why no `ON CONFLICT` is needed: a group's transaction first locks the batch row (FOR NO KEY
UPDATE, so workers settling other batches' rows are not blocked) and reads the watermark W;
every line ≤ W is committed and no line > W is, because each group commits its lines and
moves W past them in one transaction, and an ingester's next group starts right after its
last committed one (its first group after the W it read at start, which only grew since). So
the group copies exactly its lines > W, and a second worker ingesting the same batch at the
same time waits on the lock, then skips what the first committed — both derive the same rows
from the same file (duplicates are decided by the lines before, which are the same for both).
An interrupted group rolls back whole; the next pass resumes after W.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update

from offline_queue.store.bulk import insert_ignoring_conflicts
from offline_queue.store.db import get_engine
from offline_queue.store.queue import RESULT_COLUMNS, IngestReport, _error_row
from offline_queue.store.tables import Batch, Result
from offline_queue.validate import Accepted, Rejected

_COPY_REQUESTS = (
    "COPY requests (batch_id, line_no, custom_id, url, body, cache_digest, state, attempts, "
    "not_before) FROM STDIN"
)


# COPY's text format: backslash, newline, carriage return and tab are escaped, NULL is \N.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_ROWS_PER_WRITE = 256


def _copy_text(value: str) -> str:
    # isprintable() is False for newline, CR and tab (and other characters, harmlessly).
    if "\\" in value or not value.isprintable():
        return value.translate(_COPY_ESCAPES)
    return value


def ingest_by_copy(
    db: str, batch_id: str, items: Iterable[Accepted | Rejected], group_size: int, now: float
) -> IngestReport:
    report = IngestReport()
    endpoints = report.endpoints
    stream = iter(items)
    head = _copy_text(batch_id) + "\t"
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
                                rows.append(
                                    f"{head}{last_line}\t{_copy_text(item.custom_id)}\t{item.url}\t"
                                    # JSON from orjson: no raw control characters to escape
                                    f"{item.body_json.replace(chr(92), chr(92) * 2)}\t"
                                    f"{item.cache_digest or chr(92) + 'N'}\tqueued\t0\t0\n"
                                )
                                if len(rows) >= _ROWS_PER_WRITE:
                                    copy.write("".join(rows))
                                    rows.clear()
                        else:
                            assert isinstance(item, Rejected)
                            report.rejected += 1
                            if last_line > through:
                                rejections.append(
                                    _error_row(
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
