"""Batches: the one row per batch — created once (by a run's submit, or by the API's admission
check), labelled, cancelled, moved through its statuses — and the lists of batches the CLI and
the API show.

Every batch row is built by `_new_batch`, so a batch from `offline-queue run` and one from
POST /v1/batches start in the same state with the same fields.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import orjson
from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from offline_queue.states import TERMINAL_STATUSES, BatchStatus, RequestState, Tier
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Request, Result


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


RUNNABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
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
        status=BatchStatus.VALIDATING,
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
    tier: str = Tier.STANDARD,
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
            created_at=clock.seconds(s),
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
        now = clock.seconds(s)  # the store's time: every worker judges expiry by it
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
        for key, value in {"status": status, **fields}.items():
            setattr(batch, key, value)
        stamp = _STAMPS.get(status)
        if stamp and getattr(batch, stamp) is None:
            setattr(batch, stamp, clock.now_seconds())  # written in the UPDATE: the store's time


# -- who runs a batch: ownership, heartbeat, and the reaper of runs that died -----------------

RUN_FAILED = "run_failed"
"""The batch's run raised (its Prefect flow run is Failed), or the API could not start it."""
RUN_CRASHED = "run_crashed"
"""Its flow run's process died (Prefect's Crashed: kill -9, out of memory)."""
RUN_CANCELLED = "run_cancelled"
"""Its flow run was cancelled in Prefect (the UI, the API). The batch's own cancel is
`cancelled`; stopping one run is not cancelling the batch, so a re-run resumes it."""
RUN_LOST = "run_lost"
"""Nobody saw the end: the owner stopped beating for longer than its lease (reap_orphans)."""
RUN_ERRORS = frozenset({RUN_FAILED, RUN_CRASHED, RUN_CANCELLED, RUN_LOST})
"""Failures of a run, not of the batch's requests: a re-run of the batch reopens it."""

REAP_GRACE_SECONDS = 5.0
"""Past its lease, how long a silent owner is still given before its batch is reaped."""


def failed_by_run(batch: Batch) -> bool:
    """The batch failed because a run ended (not because its requests did): resumable."""
    if batch.status != BatchStatus.FAILED or not batch.errors_json:
        return False
    errors = orjson.loads(batch.errors_json)
    return bool(errors) and errors[0].get("code") in RUN_ERRORS


def _reopened_status(batch: Batch) -> BatchStatus:
    if batch.cancelling_at is not None and batch.cancelled_at is None:
        return BatchStatus.CANCELLING
    return BatchStatus.IN_PROGRESS if batch.in_progress_at else BatchStatus.VALIDATING


def take_ownership(
    db: str, batch_id: str, owner: str, run_id: str | None, lease_seconds: float
) -> bool:
    """Make `owner` the batch's owner, seen now; called when a run starts and at each beat.
    False when the batch is over (nothing to own: the heartbeat stops).

    A batch that failed because a run ended (RUN_ERRORS) is reopened: the new run resumes it
    (nothing with a result runs again), and a run that was reaped while it was in fact alive
    (a store outage longer than its lease) takes its batch back at its next beat. Several runs
    of one batch (shards, a re-run beside a live run) each beat: the last one is the owner
    shown, and the batch lives while any of them does."""
    with session(db) as s:
        batch = s.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            raise KeyError(batch_id)
        if failed_by_run(batch):
            batch.status = _reopened_status(batch)
            batch.errors_json = None
            batch.failed_at = None
        elif batch.status in TERMINAL_STATUSES:
            return False
        batch.owner, batch.owner_run_id = owner, run_id
        batch.owner_heartbeat, batch.owner_lease = clock.now(), lease_seconds  # the store's
    return True


def await_run(db: str, batch_id: str, run_id: str, owner: str) -> None:
    """Name the Prefect flow run that will work on the batch once a worker takes it. No
    heartbeat yet: a run that waits for a worker is not lost (the reaper leaves it), and the
    flow run's state hooks find the batch by `run_id` if it is cancelled or crashes."""
    with session(db) as s:
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.not_in(TERMINAL_STATUSES))
            .values(owner=owner, owner_run_id=run_id, owner_heartbeat=None)
        )


def beat_owned(db: str, owner: str) -> int:
    """Beat the heartbeat of every unfinished batch `owner` holds (a process that keeps
    batches waiting for its own runner threads); returns how many."""
    with session(db) as s:
        done = s.execute(
            update(Batch)
            .where(Batch.owner == owner, Batch.status.not_in(TERMINAL_STATUSES))
            .values(owner_heartbeat=clock.now())
        )
    return int(done.rowcount or 0)  # type: ignore[attr-defined]


def _errors(code: str, message: str) -> str:
    return orjson.dumps([{"code": code, "message": message, "line": None}]).decode()


def fail_run(
    db: str, code: str, message: str, *, run_id: str | None = None, batch_id: str | None = None
) -> list[str]:
    """Settle the unfinished batches a run leaves behind as `failed`, the reason in `errors`
    (`cancelled` if a cancel was asked: the run was stopping it anyway):
    those the flow run `run_id` owns, and `batch_id` — unless another run has taken it since.
    Returns their ids."""
    assert run_id or batch_id
    mine = []
    if run_id:
        mine.append(Batch.owner_run_id == run_id)
    if batch_id:
        free = Batch.owner_run_id.is_(None)
        mine.append(and_(Batch.id == batch_id, free if not run_id else or_(free, mine[0])))
    with session(db) as s:
        rows = s.scalars(
            select(Batch)
            .where(Batch.status.not_in(TERMINAL_STATUSES), or_(*mine))
            .with_for_update()
        ).all()
        for batch in rows:
            if batch.status == BatchStatus.CANCELLING:  # asked to stop, and it has: cancelled
                batch.status = BatchStatus.CANCELLED
                batch.cancelled_at = batch.cancelled_at or clock.now_seconds()
                continue
            batch.status = BatchStatus.FAILED
            batch.failed_at = batch.failed_at or clock.now_seconds()
            # A tenant reads this: its file by the id it knows, never by a path of ours.
            seen = message.replace(batch.input_path, batch.input_file_id or "the input file")
            batch.errors_json = _errors(code, seen)
    return [b.id for b in rows]


class Reaped(NamedTuple):
    batch_id: str
    owner: str | None
    last_seen: float


def reap_orphans(db: str, grace_seconds: float = REAP_GRACE_SECONDS) -> list[Reaped]:
    """Settle the batches whose run died where no hook could see it (kill -9 of the process,
    a node gone): unfinished, an owner that has not beaten for longer than its lease plus
    `grace_seconds`, and no request lease still alive (nobody is working on it). Each becomes
    `failed` with RUN_LOST, naming the last owner and when it was last seen; a re-run resumes
    it. Any worker calls this at start, the API every few seconds, `status` before it reads.

    A batch with no heartbeat at all is waiting for its run to start (a deployment's flow
    run still Scheduled or Pending): not lost, left alone."""
    with session(db, readonly=True) as s:  # owners beat on the store's clock: judge by it
        now = float(s.execute(select(clock.now())).scalar_one())
    working = exists().where(
        Request.batch_id == Batch.id,
        Request.state == RequestState.PROCESSING,
        Request.lease_expires >= now,
    )
    silent = and_(
        Batch.status.not_in(TERMINAL_STATUSES),
        Batch.owner_heartbeat.is_not(None),
        Batch.owner_heartbeat + func.coalesce(Batch.owner_lease, 60.0) + grace_seconds < now,
        ~working,
    )
    reaped = []
    with session(db) as s:
        for batch in s.scalars(select(Batch).where(silent).with_for_update(skip_locked=True)):
            seen = float(batch.owner_heartbeat or 0)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seen))
            batch.status = BatchStatus.FAILED
            batch.failed_at = batch.failed_at or clock.now_seconds()
            batch.errors_json = _errors(
                RUN_LOST,
                f"the run of this batch was lost: its owner {batch.owner} was last seen at "
                f"{when} ({now - seen:.0f} s ago, lease {batch.owner_lease or 60:.0f} s) and "
                "nobody is working on it; run the batch again to resume it",
            )
            reaped.append(Reaped(batch.id, batch.owner, seen))
    return reaped
