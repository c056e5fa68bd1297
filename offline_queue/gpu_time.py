"""GPU time: the engine-seconds a served chunk used — what a team that owns its GPUs bills its
tenants and plans its nodes by, which token counts do not say. A chunk is charged its part of an
engine it shares with other chunks (`Reply.engine_seconds`), at most its wall time.
(docs/ARCHITECTURE.md, Why the parts are as they are)
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
