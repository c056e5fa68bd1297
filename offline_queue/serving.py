"""Serving one claimed chunk: answers from the result cache first, the engine for the rest,
then one settle. Kept out of the loop so it reads the same in a serving loop, a benchmark or
a test."""

from __future__ import annotations

import time
from dataclasses import dataclass

from offline_queue.cache import ResultCache
from offline_queue.engines.base import Engine, EngineRequest, Overlap, Reply
from offline_queue.gpu_time import chunk_use
from offline_queue.store import claims


@dataclass
class ChunkReport:
    claimed: int
    inferred: int
    """Sent to the engine by this chunk."""
    reused: int
    """Answered from the result cache."""
    settled: claims.Settled


class ChunkFault(RuntimeError):
    """The engine failed the whole chunk; the chunk was handed back to the queue."""


def serve_claim(
    db: str,
    claim: claims.Claim,
    engine: Engine,
    cache: ResultCache | None = None,
    overlap: Overlap | None = None,
) -> ChunkReport:
    """`cache` is the loop's (written behind); without one, a chunk's answers are cached
    when it settles. `overlap` goes to the engine. The requests carry the batch's tier as
    the engine's priority."""
    batch_id, max_attempts = claim.batch_id, claim.max_attempts
    priority = claim.tier.rank - 1
    own_cache = cache is None
    cache = cache or ResultCache(db, engine.model_version)
    outcomes = claims.abandoned(claim, max_attempts)
    requests = claim.requests
    if outcomes:
        given_up = {o.request.id for o in outcomes}
        requests = [r for r in requests if r.id not in given_up]
    keys = {r.id: cache.key(r.cache_digest) for r in requests if r.cache_digest}
    hits = cache.lookup(keys.values())
    to_run = requests
    if hits:
        to_run = []
        for request in requests:
            hit = hits.get(keys.get(request.id, ""))
            if hit is not None:
                outcomes.append(claims.Outcome(request, hit.reply(request.url), reused=True))
            else:
                to_run.append(request)
    used = None
    if to_run:
        began = time.monotonic()
        try:
            replies = engine.infer(
                [EngineRequest(r.line_no, r.url, r.body, priority) for r in to_run], overlap
            )
        except Exception as exc:
            fault = Reply.error(503, "engine_unavailable", f"engine fault: {exc}", retriable=True)
            faulted = [claims.Outcome(r, fault) for r in to_run]
            spent = chunk_use(engine, time.monotonic() - began, [], faulted=len(to_run))
            claims.settle(db, batch_id, claim, outcomes + faulted, max_attempts, used=spent)
            raise ChunkFault(str(exc)) from exc
        used = chunk_use(engine, time.monotonic() - began, replies)
        outcomes += [claims.Outcome(r, reply) for r, reply in zip(to_run, replies, strict=True)]
    settled = claims.settle(db, batch_id, claim, outcomes, max_attempts, used=used)
    cache.remember(
        batch_id,
        [
            o.request.line_no
            for o in outcomes
            if o.reply.ok
            and not o.reused
            and o.request.id in keys
            and o.request.id in settled.completed_ids
        ],
    )
    if own_cache:
        cache.flush()
    return ChunkReport(
        claimed=len(claim.requests),
        inferred=len(to_run),
        reused=len(requests) - len(to_run),
        settled=settled,
    )
