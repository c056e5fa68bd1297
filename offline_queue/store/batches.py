"""Batches: the one row per batch — created once (by a run's submit, or by the API's admission
check), labelled, cancelled, moved through its statuses — and the lists of batches the CLI and
the API show.

Every batch row is built by `_new_batch`, so a batch from `offline-queue run` and one from
POST /v1/batches start in the same state with the same fields.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Result


class BatchConflict(ValueError):
    """An explicit batch id or idempotency key already names a batch with other content."""


class AdmissionRefused(Exception):
    """The batch cannot be taken now: the tenant's quota, or a busy tier and the tenant at its
    share of it. The API's 429; the message holds only the tenant's own numbers."""


class IdempotencyConflict(Exception):
    """The tenant's idempotency key already names a batch created by a different request: the
    API's 409, naming the fields that differ."""

    def __init__(self, batch_id: str, fields: list[str]):
        super().__init__(
            f"this Idempotency-Key was used for batch {batch_id} with a different "
            f"{', '.join(fields)}: use a new key for a new request"
        )
        self.batch_id, self.fields = batch_id, fields


RUNNABLE = ("validating", "in_progress", "finalizing")
"""The statuses of a batch that can still run; `cancelling` ends with its in-flight chunk."""


def _new_batch(
    *,
    batch_id: str,
    content_hash: str,
    input_path: str,
    output_path: str,
    error_path: str,
    tier: str,
    weight: int,
    max_attempts: int,
    metadata: dict[str, str] | None,
    idempotency_key: str | None,
    created_at: int,
    total_lines: int = 0,
    endpoint: str | None = None,
    tenant: str | None = None,
    input_file_id: str | None = None,
    completion_window: str | None = None,
    expires_at: int | None = None,
) -> Batch:
    """A new batch row, `validating`, nothing ingested yet."""
    return Batch(
        id=batch_id,
        content_hash=content_hash,
        idempotency_key=idempotency_key,
        input_path=input_path,
        output_path=output_path,
        error_path=error_path,
        status="validating",
        endpoint=endpoint,
        tier=tier,
        weight=weight,
        max_attempts=max_attempts,
        metadata_json=orjson.dumps(metadata).decode() if metadata else None,
        total_lines=total_lines,
        ingested_through=0,
        ingest_done=False,
        created_at=created_at,
        tenant=tenant,
        input_file_id=input_file_id,
        completion_window=completion_window,
        expires_at=expires_at,
    )


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
            existing = s.scalar(
                select(Batch).where(
                    Batch.tenant.is_(None), Batch.idempotency_key == idempotency_key
                )
            )
        if existing is not None:
            if existing.content_hash != content_hash:
                raise BatchConflict(
                    f"batch {existing.id} was submitted with different content "
                    f"(sha256 {existing.content_hash[:12]}…, this file {content_hash[:12]}…)"
                )
            return existing, False
        batch = _new_batch(
            batch_id=batch_id,
            content_hash=content_hash,
            input_path=input_path,
            output_path=output_path,
            error_path=error_path,
            tier=tier,
            weight=weight,
            max_attempts=max_attempts,
            metadata=metadata,
            idempotency_key=idempotency_key,
            created_at=int(time.time()),
        )
        s.add(batch)
    return batch, True


def _lock(s: Session, name: str) -> None:
    """On PostgreSQL, one admission per `name` at a time (held to the commit), so concurrent
    creates cannot all pass the same check; SQLite's BEGIN IMMEDIATE already serialises them."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": name})


def _waiting(s: Session, tier: str, tenant: str, now: int) -> list[tuple[str, str, int]]:
    """(tenant, tier, requests without a result) over the batches that can still run — in
    `tier`, and the tenant's in every tier. A cancelled, expired, failed or finished batch counts
    for nothing, nor does a line that has its result."""
    settled = (
        select(func.count())
        .select_from(Result)
        .where(Result.batch_id == Batch.id)
        .correlate(Batch)
        .scalar_subquery()
    )
    rows = s.execute(
        select(Batch.tenant, Batch.tier, func.sum(Batch.total_lines - settled))
        .where(
            Batch.status.in_(RUNNABLE),
            or_(Batch.expires_at.is_(None), Batch.expires_at > now),
            or_(Batch.tier == tier, Batch.tenant == tenant),
        )
        .group_by(Batch.tenant, Batch.tier)
    )
    return [(str(t), str(k), max(0, int(n or 0))) for t, k, n in rows]


def _admit(
    rows: list[tuple[str, str, int]],
    *,
    tenant: str,
    tier: str,
    lines: int,
    max_queued: int,
    max_waiting: int | None,
) -> None:
    """Raise AdmissionRefused unless the batch may be taken.

    The tenant's own quota (all tiers) is a hard limit. The tier's limit is backpressure shared
    fairly: while the tier has room anyone is admitted; when it is full, a tenant is still
    admitted with its first batch there or while it stays within an equal share of the tier
    between the tenants with work waiting in it. So no tenant's backlog makes another's first
    batch a 429."""
    mine = sum(n for t, _, n in rows if t == tenant)
    if max_waiting is not None and mine + lines > max_waiting:
        raise AdmissionRefused(
            f"your batches have {mine} requests waiting; this one's {lines} would pass your "
            f"quota of {max_waiting} (max_waiting): retry when some are done"
        )
    if lines > max_queued:
        raise AdmissionRefused(
            f"this batch's {lines} requests are more than the {tier} tier takes at once "
            f"({max_queued}): split the file"
        )
    in_tier = {t: n for t, k, n in rows if k == tier and n > 0}
    mine_here = in_tier.get(tenant, 0)
    share = max_queued // len(in_tier.keys() | {tenant})
    if sum(in_tier.values()) + lines <= max_queued or mine_here == 0 or mine_here + lines <= share:
        return
    raise AdmissionRefused(
        f"the {tier} tier is busy and your {mine_here} requests waiting in it are your share "
        "for now: retry later"
    )


def _differences(b: Batch, want: dict[str, Any]) -> list[str]:
    have = {
        "input_file_id": b.input_file_id,
        "endpoint": b.endpoint,
        "completion_window": b.completion_window,
        "metadata": orjson.loads(b.metadata_json) if b.metadata_json else {},
    }
    return [field for field, value in want.items() if have[field] != value]


def admit_batch(
    db: str,
    *,
    max_queued: int,
    max_waiting: int | None,
    batch_id: str,
    tenant: str,
    input_file_id: str,
    content_hash: str,
    input_path: str,
    output_path: str,
    error_path: str,
    endpoint: str,
    tier: str,
    weight: int,
    metadata: dict[str, str] | None,
    idempotency_key: str | None,
    total_lines: int,
    completion_window: str,
    window_seconds: int,
) -> tuple[Batch, bool]:
    """A batch from the API, if admitted (`_admit`): (batch, created).

    The tenant's batch that already holds `idempotency_key` is returned when it was created by
    the same request (file, endpoint, window, metadata), else IdempotencyConflict. The key is
    the tenant's: another tenant's keys are never looked at."""
    want = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": completion_window,
        "metadata": metadata or {},
    }
    with session(db) as s:
        _lock(s, f"tier:{tier}")
        _lock(s, f"tenant:{tenant}")
        if idempotency_key:
            existing = s.scalar(
                select(Batch).where(
                    Batch.tenant == tenant, Batch.idempotency_key == idempotency_key
                )
            )
            if existing is not None:
                differ = _differences(existing, want)
                if differ:
                    raise IdempotencyConflict(existing.id, differ)
                return existing, False
        now = int(time.time())
        _admit(
            _waiting(s, tier, tenant, now),
            tenant=tenant,
            tier=tier,
            lines=total_lines,
            max_queued=max_queued,
            max_waiting=max_waiting,
        )
        batch = _new_batch(
            batch_id=batch_id,
            content_hash=content_hash,
            input_path=input_path,
            output_path=output_path,
            error_path=error_path,
            tier=tier,
            weight=weight,
            max_attempts=3,
            metadata=metadata,
            idempotency_key=idempotency_key,
            created_at=now,
            total_lines=total_lines,
            endpoint=endpoint,
            tenant=tenant,
            input_file_id=input_file_id,
            completion_window=completion_window,
            expires_at=now + window_seconds,
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


def recent_batches(db: str, limit: int) -> list[Batch]:
    """The newest batches of the store, every tenant's (the CLI's `--db` view)."""
    with session(db, readonly=True) as s:
        return list(s.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))


def tenant_batches(
    db: str, tenant: str, limit: int, after: str | None = None
) -> tuple[list[Batch], bool]:
    """A page of a tenant's batches, newest first, and whether more follow. `after` is the
    last id of the previous page; another tenant's id (or an unknown one) is ignored."""
    with session(db, readonly=True) as s:
        q = select(Batch).where(Batch.tenant == tenant)
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


def end_unfinished(db: str, batch_id: str, code: str, message: str) -> str | None:
    """A batch whose run ended without finishing it (the flow raised, or could not be started)
    ends at once instead of staying `validating` or `cancelling` for ever: `cancelled` if a
    cancel was asked, else `failed` with the reason. Returns the new status (None: it had one
    already)."""
    with session(db) as s:
        batch = s.get(Batch, batch_id)
        if batch is None or batch.status in ("completed", "failed", "cancelled", "expired"):
            return None
        now = int(time.time())
        if batch.status == "cancelling":
            batch.status, batch.cancelled_at = "cancelled", now
        else:
            batch.status, batch.failed_at = "failed", now
            batch.errors_json = orjson.dumps(
                [{"code": code, "message": message, "line": None}]
            ).decode()
        return batch.status
