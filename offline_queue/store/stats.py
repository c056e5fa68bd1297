"""Release analytics: what the batches of a release track did — requests, model errors,
latency percentiles, output speed — and how often two model versions gave the same answer to
the same deterministic request. Read by the gray-release guards (flows/release.py) and by
finalize for a batch's own speed; computed in the database, never by loading a batch's rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson
from sqlalchemy import and_, case, func, or_, select

from offline_queue.release import TrackStats
from offline_queue.store import gpu_time
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Request, Result


def track_stats(db: str, track: str, version: str, since: float) -> TrackStats:
    """What one release track did since `since`: requests, model errors (not rejected input
    lines), latency percentiles and output speed."""
    with session(db, readonly=True) as s:
        batch_ids = list(
            s.scalars(
                select(Batch.id).where(
                    Batch.release_track == track,
                    Batch.release_version == version,
                    Batch.created_at >= int(since),
                )
            )
        )
    return batch_stats(db, batch_ids)


def batch_stats(db: str, batch_ids: Sequence[str]) -> TrackStats:
    """Requests, model errors (rejected input lines excluded), latency percentiles and output
    speed of some batches — computed in the database, so a million-row batch is never loaded."""
    answered = and_(
        Result.batch_id.in_(list(batch_ids)), or_(Result.status_code.is_not(None), Result.ok)
    )
    timed = and_(answered, Result.ok, Result.latency_ms.is_not(None))
    with session(db, readonly=True) as s:
        requests, failed, tokens, first, last = s.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Result.ok, 0), else_=1)), 0),
                func.coalesce(func.sum(Result.completion_tokens), 0),
                func.min(Result.finished_at - func.coalesce(Result.latency_ms, 0) / 1000.0),
                func.max(Result.finished_at),
            ).where(answered)
        ).one()
        n = s.scalar(select(func.count()).where(timed)) or 0

        def nearest_rank(q: float) -> float | None:
            if n == 0:
                return None
            rank = min(n - 1, max(0, math.ceil(q * n) - 1))
            latency = select(Result.latency_ms).where(timed).order_by(Result.latency_ms)
            return s.scalar(latency.offset(rank).limit(1))

        p50, p95 = nearest_rank(0.5), nearest_rank(0.95)
    return TrackStats(
        batches=len(batch_ids),
        requests=int(requests),
        failed=int(failed),
        p50_ms=p50,
        p95_ms=p95,
        output_tokens=int(tokens),
        seconds=float(last - first) if last is not None else 0.0,
        engine_seconds=gpu_time.batches_seconds(db, batch_ids),
    )


def _answer_text(body: str) -> str:
    choice = orjson.loads(body)["choices"][0]
    return str(choice.get("text") or (choice.get("message") or {}).get("content") or "")


def track_agreement(
    db: str, stable_version: str, candidate_version: str, since: float
) -> tuple[int, int]:
    """(pairs, agreeing): deterministic requests (same canonical body) that both tracks
    answered since `since`, and how many of those got the same first answer."""
    answers: dict[str, dict[str, str]] = {}
    with session(db, readonly=True) as s:
        for track, version in (("stable", stable_version), ("candidate", candidate_version)):
            rows = s.execute(
                select(Request.cache_digest, Result.body)
                .join(Batch, Batch.id == Request.batch_id)
                .join(
                    Result,
                    and_(Result.batch_id == Request.batch_id, Result.line_no == Request.line_no),
                )
                .where(
                    Batch.release_track == track,
                    Batch.release_version == version,
                    Batch.created_at >= int(since),
                    Request.cache_digest.is_not(None),
                    Result.ok,
                )
            )
            answers[track] = {digest: _answer_text(body) for digest, body in rows}
    shared = answers["stable"].keys() & answers["candidate"].keys()
    same = sum(1 for d in shared if answers["stable"][d] == answers["candidate"][d])
    return len(shared), same
