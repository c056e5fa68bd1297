"""What expires — batch outputs past `output_expires_at`, uploaded files past `expires_at`,
uploads that never finished — judged by the database's clock. A batch's outputs go by clearing
the content of its `results` rows, not the rows: its counts, usage and latencies stay, while what
a user downloads (and what could leak) goes, with the cache entries that pointed at it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, CachedResult, Result, StoredFile

STALE_UPLOAD_SECONDS = 24 * 3600
"""An upload still `writing` this long after it started is from a writer that died."""


def set_output_expiry(db: str, batch_id: str, seconds: int) -> None:
    """Outputs expire `seconds` after the batch was created (anchor `created_at`)."""
    with session(db) as s:
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(output_expires_at=Batch.created_at + seconds)
        )


def expired_outputs(db: str) -> list[tuple[str, str, str]]:
    """(batch id, output location, error location) of finished batches whose outputs have
    expired and are still there."""
    with session(db, readonly=True) as s:
        now = clock.now_seconds()
        rows = s.execute(
            select(Batch.id, Batch.output_path, Batch.error_path).where(
                Batch.output_expires_at <= now,
                Batch.outputs_removed_at.is_(None),
                Batch.status.in_(list(TERMINAL_STATUSES)),
            )
        ).all()
    return [(b, o, e) for b, o, e in rows]


def remove_outputs(db: str, batch_id: str) -> int:
    """Clear the content of the batch's result rows, drop the cache entries pointing at them,
    and stamp `outputs_removed_at`, in one transaction; how many result rows were cleared."""
    with session(db) as s:
        s.execute(delete(CachedResult).where(CachedResult.batch_id == batch_id))
        cleared: Any = s.execute(
            update(Result)
            .where(Result.batch_id == batch_id)
            .values(body=None, error_message=None)
            .execution_options(synchronize_session=False)
        )
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.outputs_removed_at.is_(None))
            .values(outputs_removed_at=clock.now_seconds())
        )
        return int(cleared.rowcount or 0)


def expired_files(db: str) -> list[tuple[str, str]]:
    """(file id, location of its bytes) of files past `expires_at` and of uploads that never
    finished — except files a batch still reads (its lines are not all queued yet): those go
    at a later clean-up."""
    with session(db, readonly=True) as s:
        now = clock.now_seconds()
        reading = select(Batch.input_file_id).where(
            Batch.input_file_id.is_not(None),
            Batch.ingest_done.is_(False),
            Batch.status.not_in(list(TERMINAL_STATUSES)),
        )
        rows = s.execute(
            select(StoredFile.id, StoredFile.path).where(
                (
                    (StoredFile.status == "ready") & (StoredFile.expires_at <= now)
                    | (StoredFile.status == "writing")
                    & (StoredFile.created_at <= now - STALE_UPLOAD_SECONDS)
                ),
                StoredFile.id.not_in(reading),
            )
        ).all()
    return [(f, p) for f, p in rows]
