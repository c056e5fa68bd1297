"""GPU time: the engine-seconds a served chunk used — what a team that owns its GPUs bills its
tenants by and plans its nodes by, which token counts do not say (a long prompt and a short one
cost the GPU very differently from their token counts alone).

One rule for both kinds of engine, counted in engine-seconds (one engine busy for one second):

- An engine in this process (`vllm.LLM`, one batch per GPU) is the batch's alone while a chunk
  is in it: the chunk used the wall time of its `infer` — the slot-seconds of the GPU it holds.
- A served engine is shared by every batch that sends to it, and a request holds one of its
  `capacity` seats while it is in flight: the chunk used the seat-seconds its requests held
  (the sum of their latencies) divided by the seats, capped at the chunk's wall time. A batch
  alone on the server that keeps every seat busy is charged the wall time; two batches with
  half the seats each are charged half each; a batch that keeps 8 of 32 seats busy is charged a
  quarter — the server had room for others all along.

What is not counted: the engine's start (weights loading, a shard's wait for a GPU) and the
store's work around a chunk; a chunk answered from the result cache costs nothing.
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
    it: a served engine's share of it is 0."""
    seconds = wall_seconds
    if engine.shared:
        held = sum(r.latency_ms or 0.0 for r in replies) / 1000.0
        seconds = min(wall_seconds, held / max(engine.capacity, 1))
    errors = faulted + sum(1 for r in replies if not r.ok)
    return EngineUse(engine.engine_key, seconds, len(replies), errors)
