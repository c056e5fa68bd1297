"""Admission of a batch from the API: within the caller's rights and the tier's backpressure,
fair between tenants, idempotent per (tenant, key) — one check per tier at a time on PostgreSQL.
"""

from __future__ import annotations

import threading
import time

import orjson
from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from offline_queue.states import BatchStatus
from offline_queue.store import clock
from offline_queue.store.batches import new_batch
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Result
from offline_queue.submission import Submission

RUNNABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
"""The statuses of a batch that can still run; `cancelling` ends with its in-flight chunk."""


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


_SAME_REQUEST = ("input_file_id", "endpoint", "completion_window")
"""With the metadata, what makes a create with a known idempotency key the same request."""


def _differences(b: Batch, sub: Submission) -> list[str]:
    differ = [name for name in _SAME_REQUEST if getattr(b, name) != getattr(sub, name)]
    if (orjson.loads(b.metadata_json) if b.metadata_json else {}) != (sub.metadata or {}):
        differ.append("metadata")
    return differ


def admit_batch(
    db: str,
    sub: Submission,
    *,
    max_queued: int,
    max_waiting: int | None,
    window_seconds: int,
) -> tuple[Batch, bool]:
    """A batch from the API, if admitted (`_admit`): (batch, created).

    The tenant's batch that already holds `idempotency_key` is returned when it was created by
    the same request (file, endpoint, window, metadata), else IdempotencyConflict. The key is
    the tenant's: another tenant's keys are never looked at."""
    tenant, tier = sub.tenant, sub.tier
    if tenant is None:
        raise ValueError("an admitted batch has a tenant")
    with session(db) as s:
        _lock(s, f"tier:{tier}")
        _lock(s, f"tenant:{tenant}")
        if sub.idempotency_key:
            existing = s.scalar(
                select(Batch).where(
                    Batch.tenant == tenant, Batch.idempotency_key == sub.idempotency_key
                )
            )
            if existing is not None:
                differ = _differences(existing, sub)
                if differ:
                    raise IdempotencyConflict(existing.id, differ)
                return existing, False
        now = clock.seconds(s)  # the store's time: every worker judges expiry by it
        _admit(
            _waiting(s, tier, tenant, now),
            tenant=tenant,
            tier=tier,
            lines=sub.total_lines,
            max_queued=max_queued,
            max_waiting=max_waiting,
        )
        batch = new_batch(sub, created_at=now, expires_at=now + window_seconds)
        s.add(batch)
    return batch, True


GLANCE_SECONDS = 0.5


class Glance:
    """What admission sees of a tier and a tenant, read at most every GLANCE_SECONDS by this
    process and counted on as it admits: the single requests' admission (one per HTTP call, a
    thousand a second) without a lock and a scan of the runnable batches each. Between two reads
    another process's admissions are not seen, so a tier or a quota may be passed by what the
    API processes admit in half a second; a batch's admission stays exact (`admit_batch`)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[float, list[tuple[str, str, int]]]] = {}
        self._lock = threading.Lock()

    def admit(
        self, db: str, tenant: str, tier: str, lines: int, max_queued: int, max_waiting: int | None
    ) -> None:
        """AdmissionRefused, or room for `lines` more requests (counted here at once)."""
        key = (tier, tenant)
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or time.monotonic() - seen[0] > GLANCE_SECONDS:
                with session(db, readonly=True) as s:
                    rows = _waiting(s, tier, tenant, clock.seconds(s))
                seen = self._seen[key] = (time.monotonic(), rows)
            rows = seen[1]
            _admit(
                rows,
                tenant=tenant,
                tier=tier,
                lines=lines,
                max_queued=max_queued,
                max_waiting=max_waiting,
            )
            for i, (t, k, n) in enumerate(rows):
                if (t, k) == (tenant, tier):
                    rows[i] = (t, k, n + lines)
                    break
            else:
                rows.append((tenant, tier, lines))
