"""Who runs a batch: ownership and its heartbeat, the end of a run recorded on its batch, and
the reaper of runs that died where nothing saw them (kill -9, a node gone)."""

from __future__ import annotations

import time
from typing import NamedTuple

import orjson
from sqlalchemy import and_, exists, func, or_, select, update

from offline_queue.states import TERMINAL_STATUSES, BatchStatus, RequestState
from offline_queue.store import clock, totals
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Request

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
    of one batch (a re-run beside a live run) each beat: the last one is the owner
    shown, and the batch lives while any of them does."""
    with session(db) as s:
        batch = s.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            raise KeyError(batch_id)
        if failed_by_run(batch):
            totals.forget(s, batch)
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
