"""One in-process vLLM engine stepped for several chunks at once, so that it never runs
part-empty at a chunk boundary.

`LLM.generate` adds a list of prompts and steps the engine until every one is done: a chunk's
last wave runs with fewer requests than the engine could hold (on this CPU build the KV cache
holds ~91 short chat requests, a chunk is 256: a third of the chunk runs part-empty), and the
next chunk is claimed only after that. Here each chunk's thread registers its requests and the
engine is stepped in turn by whichever thread holds the lock; every finished output goes to the
chunk that asked for it. A chunk tells its worker when none of its requests waits to be started
(`Overlap.room`), and the worker claims the next one then.

The chunk claimed ahead is fed into the engine only as seats free up (one request for each one
finished, and one more while nothing waits), not queued in vLLM all at once: so when the worker
hands its GPU to a higher tier at the boundary, what of it has not started is handed back to the
queue untouched (`Overlap.hand_back`) and nothing running is killed. Once the worker makes it
the lead (the chunk before is settled), the rest of it goes in at once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from offline_queue.engines.base import Overlap

Outcome = tuple[Any, float] | Exception | None
"""Per request: (vLLM's output, when it finished), the error vLLM refused it with (ValueError,
TypeError), or None: handed back before it started."""


@dataclass
class _Chunk:
    pending: deque[tuple[int, list[int], Any]]
    """(position, token ids, SamplingParams) not in the engine yet."""
    overlap: Overlap | None
    added: dict[int, str] = field(default_factory=dict)
    refused: dict[int, Exception] = field(default_factory=dict)

    @property
    def leads(self) -> bool:
        return self.overlap is None or self.overlap.lead.is_set()


class SharedSteps:
    """The engine of one `vllm.LLM`, for callers in several threads."""

    def __init__(self, llm: Any):
        self.engine = llm.llm_engine
        self.max_num_seqs: int = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._finished: dict[str, tuple[Any, float]] = {}
        self._ids = itertools.count()
        self._count_lock = threading.Lock()
        self._arriving = 0

    def run(
        self, prepared: Sequence[tuple[list[int], Any]], overlap: Overlap | None = None
    ) -> list[Outcome]:
        """Each request's outcome, in order, stepping the engine (in turn with other callers)
        until every one that went in has finished. If the engine fails, this chunk's requests
        are aborted and the error is raised."""
        chunk = _Chunk(deque((k, ids, params) for k, (ids, params) in enumerate(prepared)), overlap)
        with self._count_lock:  # let in before the next step: a stepping thread could
            self._arriving += 1  # otherwise take the lock back again and again
        try:
            with self._lock:
                self._chunks.append(chunk)
                self._feed(0)
        finally:
            with self._count_lock:
                self._arriving -= 1
        try:
            while True:
                while self._arriving:
                    time.sleep(0.001)
                with self._lock:
                    if not chunk.pending and all(r in self._finished for r in chunk.added.values()):
                        return self._outcomes(chunk, len(prepared))
                    outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                    now, freed = time.time(), 0
                    for output in outputs:
                        if output.finished:
                            self._finished[output.request_id] = (output, now)
                            freed += 1
                    self._feed(freed)
        except BaseException:
            with self._lock:
                self.engine.abort_request(
                    [r for r in chunk.added.values() if r not in self._finished]
                )
                for r in chunk.added.values():
                    self._finished.pop(r, None)
                if chunk in self._chunks:
                    self._chunks.remove(chunk)
            raise

    def _outcomes(self, chunk: _Chunk, n: int) -> list[Outcome]:
        self._chunks.remove(chunk)
        outcomes: list[Outcome] = [None] * n
        for k, request_id in chunk.added.items():
            outcomes[k] = self._finished.pop(request_id)
        for k, exc in chunk.refused.items():
            outcomes[k] = exc
        return outcomes

    def _feed(self, freed: int) -> None:
        """Requests into the engine, oldest chunk first: a lead chunk all at once; a chunk
        behind another only into freed seats, and only once the chunks before it are all in.
        Then tell each chunk with nothing left to start that there is room for the next."""
        budget = freed + (1 if self._none_waiting() else 0)
        blocked = False
        for chunk in self._chunks:
            if chunk.overlap is not None and chunk.overlap.hand_back.is_set():
                chunk.pending.clear()  # what has not started goes back to the queue
            if chunk.pending and not blocked:
                if chunk.leads:
                    while chunk.pending:
                        self._add(chunk)
                else:
                    while chunk.pending and budget > 0:
                        self._add(chunk)
                        budget -= 1
            blocked = blocked or bool(chunk.pending)
        if self._none_waiting():
            for chunk in self._chunks:
                if chunk.overlap is not None and not chunk.pending:
                    chunk.overlap.room.set()

    def _add(self, chunk: _Chunk) -> None:
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        k, ids, params = chunk.pending.popleft()
        params.output_kind = RequestOutputKind.FINAL_ONLY  # no output object per step
        request_id = f"oq-{next(self._ids)}"
        try:
            self.engine.add_request(request_id, tokens_input(ids), params)
        except (ValueError, TypeError) as exc:
            chunk.refused[k] = exc
        else:
            chunk.added[k] = request_id

    def _none_waiting(self) -> bool:
        """Whether no request waits for a seat. Read from the scheduler when it is in this
        process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as on CPU); otherwise from the count: no
        more unfinished than the engine runs at once."""
        core = getattr(self.engine.engine_core, "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None:
            return bool(self.engine.get_num_unfinished_requests() <= self.max_num_seqs)
        return bool(scheduler.get_request_counts()[1] == 0)
