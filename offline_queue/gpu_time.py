"""GPU time: the engine-seconds a served chunk used — what a team that owns its GPUs bills its
tenants by and plans its nodes by, which token counts do not say (a long prompt and a short one
cost the GPU very differently from their token counts alone).

Both kinds of engine serve several chunks (of several batches) at once, so a chunk is charged
its part of the engine's time, which each engine sets on every reply (`Reply.engine_seconds`):

- vLLM in this process: each engine step's time, split between the chunks by how many of
  their requests were in the engine during it (engines/vllm_steps.py).
- A served engine: a request holds one of `capacity` in-flight seats while it runs, so it is
  charged its latency divided by the seats. A chunk that keeps every seat busy is charged the
  wall time; one that keeps 8 of 32 busy, a quarter — the server had room for others.

A chunk is charged at most its wall time. What is not counted: the engine's start (weights
loading) and the store's work around a chunk; a chunk answered from the result cache costs
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from offline_queue.engines.base import Engine, Reply


@dataclass(frozen=True)
class EngineUse:
    """What one chunk used of an engine: stored with the chunk's results."""

    engine_key: str
    seconds: float
    requests: int
    """Requests the engine answered (not those the result cache answered)."""
    errors: int
    """Of the requests sent, those the engine failed (any code, retriable or not)."""


def chunk_use(
    engine: Engine, wall_seconds: float, replies: Sequence[Reply], faulted: int = 0
) -> EngineUse:
    """The engine use of one chunk whose `infer` of `replies` took `wall_seconds` (see the
    module). A chunk whose `infer` raised has no replies, and `faulted` requests failed with
    it: it is charged nothing."""
    seconds = min(wall_seconds, sum(r.engine_seconds for r in replies))
    errors = faulted + sum(1 for r in replies if not r.ok)
    return EngineUse(engine.engine_key, seconds, len(replies), errors)
