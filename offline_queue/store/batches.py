"""Batches: the one row per batch — created once, labelled, cancelled, moved through its
statuses."""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import select, update

from offline_queue.store.db import session
from offline_queue.store.tables import Batch


class BatchConflict(ValueError):
    """An explicit batch id or idempotency key already names a batch with other content."""


def register_batch(
    db: str,
    *,
    batch_id: str,
    content_hash: str,
    input_path: str,
    output_path: str,
    error_path: str,
    tier: str = "standard",
    weight: int = 1,
    max_attempts: int = 3,
    metadata: dict[str, str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """The batch for this content, created if new. Returns (batch, created).

    Submitting the same content (or the same idempotency key) again returns the batch that
    exists, so a re-run resumes it instead of duplicating it.
    """
    with session(db) as s:
        existing = s.get(Batch, batch_id)
        if existing is None and idempotency_key:
            existing = s.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.content_hash != content_hash:
                raise BatchConflict(
                    f"batch {existing.id} was submitted with different content "
                    f"(sha256 {existing.content_hash[:12]}…, this file {content_hash[:12]}…)"
                )
            return existing, False
        batch = Batch(
            id=batch_id,
            content_hash=content_hash,
            idempotency_key=idempotency_key,
            input_path=input_path,
            output_path=output_path,
            error_path=error_path,
            status="validating",
            tier=tier,
            weight=weight,
            max_attempts=max_attempts,
            metadata_json=orjson.dumps(metadata).decode() if metadata else None,
            total_lines=0,
            ingested_through=0,
            ingest_done=False,
            created_at=int(time.time()),
        )
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
                Batch.status.not_in(["completed", "failed", "cancelled", "expired"]),
            )
            .values(status="cancelling", cancelling_at=int(time.time()))
        )


def get_batch(db: str, batch_id: str) -> Batch | None:
    with session(db, readonly=True) as s:
        return s.get(Batch, batch_id)


_STAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "cancelled": "cancelled_at",
    "expired": "expired_at",
}


def set_status(db: str, batch_id: str, status: str, **fields: Any) -> None:
    """Move a batch to `status`, stamping `<status>_at` the first time it gets there.

    A cancel that arrived meanwhile wins over a run starting: `cancelling` is not moved back
    to `in_progress` (the worker drops the queued requests at its next chunk)."""
    with session(db) as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status == "cancelling" and status == "in_progress":
            status = "cancelling"
        for key, value in {"status": status, **fields}.items():
            setattr(batch, key, value)
        stamp = _STAMPS.get(status)
        if stamp and getattr(batch, stamp) is None:
            setattr(batch, stamp, int(time.time()))
