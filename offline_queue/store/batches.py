"""Batches: the one row per batch — created once (by a run's submit or the API's admission,
store/admission.py) and only by `new_batch`, so every batch starts in the same state with the same
fields; labelled, cancelled, moved through its statuses — and the lists the CLI and the API show.
Who runs a batch, and the reaper of runs that died: store/owners.py.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import func, select, update

from offline_queue.states import TERMINAL_STATUSES, BatchStatus
from offline_queue.store import clock, totals
from offline_queue.store.db import session
from offline_queue.store.tables import Batch
from offline_queue.submission import Submission


class BatchConflict(ValueError):
    """An explicit batch id or idempotency key already names a batch with other content."""


def new_batch(sub: Submission, *, created_at: int, expires_at: int | None = None) -> Batch:
    """A new batch row, `validating`, nothing ingested yet."""
    return Batch(
        **sub.columns(),
        metadata_json=orjson.dumps(sub.metadata).decode() if sub.metadata else None,
        status=BatchStatus.VALIDATING,
        ingested_through=0,
        ingest_done=False,
        created_at=created_at,
        expires_at=expires_at,
    )


def register_batch(db: str, sub: Submission) -> tuple[Batch, bool]:
    """The batch for this content, created if new. Returns (batch, created).

    Submitting the same content (or the same idempotency key) again returns the batch that
    exists, so a re-run resumes it instead of duplicating it.
    """
    with session(db) as s:
        existing = s.get(Batch, sub.id)
        if existing is None and sub.idempotency_key:
            existing = s.scalar(
                select(Batch).where(
                    Batch.tenant.is_(None), Batch.idempotency_key == sub.idempotency_key
                )
            )
        if existing is not None:
            if existing.content_hash != sub.content_hash:
                raise BatchConflict(
                    f"batch {existing.id} was submitted with different content "
                    f"(sha256 {existing.content_hash[:12]}…, this file {sub.content_hash[:12]}…)"
                )
            return existing, False
        batch = new_batch(sub, created_at=clock.seconds(s))
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
                Batch.status.not_in(TERMINAL_STATUSES),
            )
            .values(status=BatchStatus.CANCELLING, cancelling_at=clock.now_seconds())
        )


def get_batch(db: str, batch_id: str) -> Batch | None:
    with session(db, readonly=True) as s:
        return s.get(Batch, batch_id)


def get_batch_expired(db: str, batch_id: str) -> tuple[Batch | None, bool]:
    """The batch, and whether its completion window is over by the store's clock, in one read:
    a worker asks before every chunk, and its own clock may be off."""
    with session(db, readonly=True) as s:
        found = s.execute(
            select(Batch, func.coalesce(Batch.expires_at < clock.now(), False)).where(
                Batch.id == batch_id
            )
        ).first()
    return (None, False) if found is None else (found[0], bool(found[1]))


def recent_batches(db: str, limit: int) -> list[Batch]:
    """The newest batches of the store, every tenant's (the CLI's `--db` view)."""
    with session(db, readonly=True) as s:
        return list(s.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))


def tenant_batches(
    db: str, tenant: str, limit: int, after: str | None = None
) -> tuple[list[Batch], bool]:
    """A page of a tenant's batches, newest first, and whether more follow. `after` is the
    last id of the previous page; another tenant's id (or an unknown one) is ignored. Only the
    batches of files: a single response's row and a stream's bookkeeping are not batches."""
    with session(db, readonly=True) as s:
        q = select(Batch).where(Batch.tenant == tenant, Batch.source.is_(None))
        if after:
            anchor = s.get(Batch, after)
            if anchor is not None and anchor.tenant == tenant:
                q = q.where(
                    (Batch.created_at < anchor.created_at)
                    | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id))
                )
        rows = list(
            s.scalars(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1))
        )
    return rows[:limit], len(rows) > limit


_STAMPS = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.CANCELLED: "cancelled_at",
    BatchStatus.EXPIRED: "expired_at",
}


def set_status(db: str, batch_id: str, status: BatchStatus, **fields: Any) -> None:
    """Move a batch to `status`, stamping `<status>_at` the first time it gets there.

    A cancel that arrived meanwhile wins over a run starting: `cancelling` is not moved back
    to `in_progress` (the worker drops the queued requests at its next chunk)."""
    status = BatchStatus(status)
    with session(db) as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status == BatchStatus.CANCELLING and status == BatchStatus.IN_PROGRESS:
            status = BatchStatus.CANCELLING
        if not status.terminal:
            totals.forget(s, batch)
        for key, value in {"status": status, **fields}.items():
            setattr(batch, key, value)
        stamp = _STAMPS.get(status)
        if stamp and getattr(batch, stamp) is None:
            setattr(batch, stamp, clock.now_seconds())  # written in the UPDATE: the store's time


def mark_late(db: str, batch_id: str) -> bool:
    """Stamp the first moment a worker found the batch would finish after its window; True for
    the one caller that stamped it (whoever comes later, on any node, gets False): the event
    that says so is raised once."""
    with session(db) as s:
        stamped = s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.late_at.is_(None))
            .values(late_at=clock.now_seconds())
        )
        return bool(getattr(stamped, "rowcount", 0))
