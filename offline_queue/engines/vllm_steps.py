"""One in-process vLLM engine stepped for the chunks of several threads at once, so that it never
runs part-empty at a chunk boundary and serves several batches together; each step's time is
split between the chunks in it (their engine-seconds).
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from offline_queue.engines.base import Overlap

Outcome = tuple[Any, float] | Exception
"""Per request: (vLLM's output, when it finished), or the error vLLM refused it with (ValueError,
TypeError)."""


@dataclass
class _Chunk:
    overlap: Overlap | None
    added: dict[int, str] = field(default_factory=dict)
    refused: dict[int, Exception] = field(default_factory=dict)
    running: int = 0
    """Requests of the chunk in the engine and not finished."""
    engine_seconds: float = 0.0


class SharedSteps:
    """The engine of one `vllm.LLM`, for callers in several threads."""

    def __init__(self, llm: Any):
        self.engine = llm.llm_engine
        self.max_num_seqs: int = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._owner: dict[str, _Chunk] = {}
        self._finished: dict[str, tuple[Any, float]] = {}
        self._ids = itertools.count()
        self._count_lock = threading.Lock()
        self._arriving = 0

    def run(
        self,
        prepared: Sequence[tuple[list[int], Any]],
        overlap: Overlap | None = None,
        priority: int = 0,
    ) -> tuple[list[Outcome], float]:
        """Each request's outcome, in order, and the chunk's engine-seconds, stepping the engine
        (in turn with other callers) until every one that went in has finished. If the engine
        fails, this chunk's requests are aborted and the error is raised."""
        chunk = _Chunk(overlap)
        with self._count_lock:  # let in before the next step: a stepping thread could
            self._arriving += 1  # otherwise take the lock back again and again
        try:
            with self._lock:
                self._chunks.append(chunk)
                for k, (ids, params) in enumerate(prepared):
                    self._add(chunk, k, ids, params, priority)
                self._tell_room()
        finally:
            with self._count_lock:
                self._arriving -= 1
        try:
            while True:
                while self._arriving:
                    time.sleep(0.001)
                with self._lock:
                    if all(r in self._finished for r in chunk.added.values()):
                        return self._outcomes(chunk, len(prepared)), chunk.engine_seconds
                    began = time.monotonic()
                    outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                    self._charge(time.monotonic() - began)
                    now = time.time()
                    for output in outputs:
                        if output.finished:
                            self._finished[output.request_id] = (output, now)
                            owner = self._owner.pop(output.request_id, None)
                            if owner is not None:
                                owner.running -= 1
                    self._tell_room()
        except BaseException:
            with self._lock:
                self.engine.abort_request(
                    [r for r in chunk.added.values() if r not in self._finished]
                )
                for r in chunk.added.values():
                    self._finished.pop(r, None)
                    self._owner.pop(r, None)
                if chunk in self._chunks:
                    self._chunks.remove(chunk)
            raise

    def _outcomes(self, chunk: _Chunk, n: int) -> list[Outcome]:
        self._chunks.remove(chunk)
        outcomes: list[Outcome | None] = [None] * n
        for k, request_id in chunk.added.items():
            outcomes[k] = self._finished.pop(request_id)
        for k, exc in chunk.refused.items():
            outcomes[k] = exc
        return [o for o in outcomes if o is not None]

    def _charge(self, seconds: float) -> None:
        """A step's time, split between the chunks by their requests in the engine."""
        running = sum(c.running for c in self._chunks)
        if running:
            for c in self._chunks:
                c.engine_seconds += seconds * c.running / running

    def _tell_room(self) -> None:
        if self._none_waiting():
            for chunk in self._chunks:
                if chunk.overlap is not None:
                    chunk.overlap.room.set()

    def _add(self, chunk: _Chunk, k: int, ids: list[int], params: Any, priority: int) -> None:
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY  # no output object per step
        request_id = f"oq-{next(self._ids)}"
        try:
            self.engine.add_request(request_id, tokens_input(ids), params, priority=priority)
        except (ValueError, TypeError) as exc:
            chunk.refused[k] = exc
        else:
            chunk.added[k] = request_id
            chunk.running += 1
            self._owner[request_id] = chunk

    def _none_waiting(self) -> bool:
        """Whether no request waits for a seat. Read from the scheduler when it is in this
        process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as on CPU); otherwise from the count: no
        more unfinished than the engine runs at once."""
        core = getattr(self.engine.engine_core, "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None:
            return bool(self.engine.get_num_unfinished_requests() <= self.max_num_seqs)
        return bool(scheduler.get_request_counts()[1] == 0)
