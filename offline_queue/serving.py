"""Serving one claimed chunk: answers from the result cache first, the engine for the rest,
then one settle. Kept out of the flow so it reads the same in a Prefect task, a benchmark or
a test."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

import orjson

from offline_queue.engines.base import Engine, EngineRequest, Reply, Share
from offline_queue.formats import CHAT_URL
from offline_queue.store import queue
from offline_queue.store.tables import CachedResult


def cache_key(model_version: str, digest: str) -> str:
    return hashlib.sha256(f"{model_version}\n{digest}".encode()).hexdigest()


def _from_cache(url: str, hit: CachedResult) -> Reply:
    """A cached answer under a fresh id and time: it is a new response with the same content."""
    body = orjson.loads(hit.body)
    body["id"] = f"{'chatcmpl' if url == CHAT_URL else 'cmpl'}-{uuid.uuid4().hex}"
    body["created"] = int(time.time())
    return Reply(
        ok=True,
        body=orjson.dumps(body).decode(),
        prompt_tokens=hit.prompt_tokens,
        completion_tokens=hit.completion_tokens,
        latency_ms=0.0,
        finished_at=time.time(),
    )


@dataclass
class ChunkReport:
    claimed: int
    inferred: int
    """Sent to the engine by this chunk."""
    reused: int
    """Answered from the result cache."""
    settled: queue.Settled


class ChunkFault(RuntimeError):
    """The engine failed the whole chunk; the chunk was handed back to the queue."""


def serve_claim(
    db: str,
    batch_id: str,
    claim: queue.Claim,
    engine: Engine,
    max_attempts: int,
    share: Share | None = None,
) -> ChunkReport:
    version = engine.model_version
    keys = {r.id: cache_key(version, r.cache_digest) for r in claim.requests if r.cache_digest}
    hits = queue.cached_results(db, list(keys.values()))
    outcomes: list[queue.Outcome] = []
    to_run: list[queue.Claimed] = []
    for request in claim.requests:
        key = keys.get(request.id)
        hit = hits.get(key) if key else None
        if hit is not None:
            outcomes.append(
                queue.Outcome(request, _from_cache(request.url, hit), reused=True, cache_key=key)
            )
        else:
            to_run.append(request)
    if to_run:
        try:
            replies = engine.infer(
                [EngineRequest(r.line_no, r.url, r.body) for r in to_run],
                share,
            )
        except Exception as exc:
            fault = Reply.error(503, "engine_unavailable", f"engine fault: {exc}", retriable=True)
            faulted = [queue.Outcome(r, fault) for r in to_run]
            queue.settle(db, batch_id, claim, outcomes + faulted, max_attempts)
            raise ChunkFault(str(exc)) from exc
        outcomes += [
            queue.Outcome(r, reply, cache_key=keys.get(r.id), model_version=version)
            for r, reply in zip(to_run, replies, strict=True)
        ]
    settled = queue.settle(db, batch_id, claim, outcomes, max_attempts)
    return ChunkReport(
        claimed=len(claim.requests),
        inferred=len(to_run),
        reused=len(claim.requests) - len(to_run),
        settled=settled,
    )
