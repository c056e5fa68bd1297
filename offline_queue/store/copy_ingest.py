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
from sqlalchemy.dialects import postgresql

from offline_queue.store.db import get_engine
from offline_queue.store.queue import IngestReport, _error_result
from offline_queue.store.tables import Batch, Result
from offline_queue.validate import Accepted, Rejected

_COPY_REQUESTS = (
    "COPY requests (batch_id, line_no, custom_id, url, body, cache_digest, state, attempts, "
    "not_before) FROM STDIN"
)


def ingest_by_copy(
    db: str, batch_id: str, items: Iterable[Accepted | Rejected], group_size: int, now: float
) -> IngestReport:
    report = IngestReport()
    stream = iter(items)
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
                rejections: list[dict[str, Any]] = []
                last_line = taken = 0
                exhausted = True
                with driver.cursor() as cur, cur.copy(_COPY_REQUESTS) as copy:
                    for item in stream:
                        last_line = item.line_no
                        taken += 1
                        if isinstance(item, Accepted):
                            report.accepted += 1
                            report.endpoints.add(item.url)
                            if last_line > through:
                                copy.write_row(
                                    (
                                        batch_id,
                                        last_line,
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
                            if last_line > through:
                                rejections.append(
                                    _error_result(
                                        batch_id, last_line, item.custom_id, item.error, None, now
                                    )
                                )
                        if taken >= group_size:
                            exhausted = False
                            break
                if rejections:
                    conn.execute(postgresql.insert(Result).on_conflict_do_nothing(), rejections)
                if last_line > through:
                    conn.execute(
                        update(Batch)
                        .where(Batch.id == batch_id, Batch.ingested_through < last_line)
                        .values(ingested_through=last_line)
                    )
    return report
