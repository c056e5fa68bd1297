"""/metrics counts an ended batch from its totals, added up once (store/totals.py): the same
figures as its rows gave, on both stores, whatever later happens to the rows; a reopened
batch is counted from its rows again, never twice."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete

from offline_queue.engines.base import Reply
from offline_queue.states import BatchStatus
from offline_queue.store import batches, claims, totals
from offline_queue.store.db import session
from offline_queue.store.metrics import Snapshot, snapshot
from offline_queue.store.tables import Result
from tests.test_store import make_batch


def serve_all(db: str, batch_id: str) -> None:
    answer = Reply(ok=True, body="{}", prompt_tokens=5, completion_tokens=3, latency_ms=300.0)
    busy = Reply.error(400, "bad_request", "no")
    while (claim := claims.claim(db, batch_id, "w", 7, lease_seconds=60)) is not None:
        outcomes = [
            claims.Outcome(r, busy if r.line_no % 5 == 0 else answer) for r in claim.requests
        ]
        claims.settle(db, batch_id, claim, outcomes, 3)


def figures(snap: Snapshot) -> tuple[dict, dict, dict]:
    return snap.results, snap.tokens, snap.latency


def test_an_ended_batch_is_counted_from_its_totals_the_same_as_from_its_rows(
    db_url: str, tmp_path: Path
) -> None:
    ended = make_batch(db_url, tmp_path, 40, bad_every=9, tag="e")
    running = make_batch(db_url, tmp_path, 12, tag="r")
    serve_all(db_url, ended)
    serve_all(db_url, running)
    batches.set_status(db_url, ended, BatchStatus.IN_PROGRESS, model_version="m@1")
    before = figures(snapshot(db_url))  # both live: added up from their rows
    batches.set_status(db_url, ended, BatchStatus.COMPLETED)
    after = figures(snapshot(db_url))  # this scrape adds the ended one up, once
    assert after == before and before[0]
    found = batches.get_batch(db_url, ended)
    assert found is not None and found.totals_at is not None
    assert totals.roll_up(db_url) == 0  # nothing left to add up

    # From now on its rows are not read: gone, the figures stay (rows are never deleted in
    # the product; here it proves where the figures come from).
    with session(db_url) as s:
        s.execute(delete(Result).where(Result.batch_id == ended))
    assert figures(snapshot(db_url)) == before

    # Reopened (a lost run resumes it): its totals go and its rows count again, not both.
    with session(db_url) as s:
        s.execute(delete(Result).where(Result.batch_id == running))  # a fixed point
    batches.set_status(db_url, ended, BatchStatus.IN_PROGRESS)
    reopened = snapshot(db_url)
    assert not any(key[0] == ended for key in reopened.results)
    found = batches.get_batch(db_url, ended)
    assert found is not None and found.totals_at is None
