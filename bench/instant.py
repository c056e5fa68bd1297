"""BENCHMARK INSTRUMENT — an engine that answers every request at once with a fixed completion.

It exists to measure what the pipeline itself costs (submit → validate → queue → claim →
settle → finalize) with the model taken out. It lives under bench/ on purpose: no product
module imports it, `load_engine_block` cannot name it unless a benchmark process has imported
this file first (that import registers the block type), and its answers say what it is.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from prefect.blocks.core import Block

from offline_queue.engines.base import EngineRequest, Overlap, Reply
from offline_queue.formats import CHAT_URL, COMPLETIONS_URL

MODEL = "instant-benchmark-engine"
_CHAT = (
    '{"id":"chatcmpl-bench%d","object":"chat.completion","created":%d,"model":"' + MODEL + '",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"benchmark"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
_COMPLETION = (
    '{"id":"cmpl-bench%d","object":"text_completion","created":%d,"model":"' + MODEL + '",'
    '"choices":[{"index":0,"text":"benchmark","finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


class InstantEngine:
    """Zero work per request: every request of a call gets the same fixed completion (one
    reply object, shared), so what is timed is the pipeline around it. Nothing of a chunk ever
    waits in it, so a loop claims its next chunk while this one settles."""

    model_version = MODEL
    engine_key = MODEL

    def __init__(self) -> None:
        self._calls = itertools.count()

    def infer(
        self, requests: Sequence[EngineRequest], overlap: Overlap | None = None
    ) -> list[Reply]:
        if overlap is not None:
            overlap.room.set()
        now = time.time()
        call, created = next(self._calls), int(now)
        replies = {
            url: Reply(
                ok=True,
                body=template % (call, created),
                prompt_tokens=1,
                completion_tokens=1,
                latency_ms=0.0,
                finished_at=now,
            )
            for url, template in ((CHAT_URL, _CHAT), (COMPLETIONS_URL, _COMPLETION))
        }
        chat = replies[CHAT_URL]
        return [chat if r.url == CHAT_URL else replies[COMPLETIONS_URL] for r in requests]


_ENGINE = InstantEngine()


class InstantBenchmarkEngine(Block):
    """Benchmark instrument only (bench/instant.py): never an engine for real batches."""

    _block_type_name = "Instant benchmark engine"
    _block_type_slug = "instant-benchmark-engine"
    _description = "BENCHMARK INSTRUMENT: answers instantly with a fixed completion."

    def engine(self) -> InstantEngine:
        return _ENGINE
