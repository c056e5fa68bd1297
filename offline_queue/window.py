"""Adaptive in-flight window for served engines (AIMD): how many requests a process keeps
outstanding at a server, found instead of set.

`max_in_flight` is the cap; the window starts small and doubles each round-trip's worth of
answers while throughput keeps growing (slow start), then grows by one per round while
throughput does not fall, and steps back one when it does (past the knee). An overload — 429,
503 or a timeout — halves it, at most once per round, so one burst of refusals is one
back-off. A round is `size` answers: about one round-trip of the whole window.

Why: the knee differs between machines (32 on this CPU; elsewhere on a GPU), and a refusing
server only got retries, never a smaller window. Every change is kept in `history` (and
logged), so a test or an operator can watch the window move.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_NOT_WORSE = 0.95
"""A round whose throughput is at least this share of the best so far counts as no loss."""


@dataclass
class Window:
    cap: int
    start: int = 4
    size: float = 0.0
    history: list[tuple[float, int, str]] = field(default_factory=list)
    """(monotonic time, new size, why) at every change."""
    _slow_start: bool = True
    _round_answers: int = 0
    _round_started: float = 0.0
    _best_rate: float = 0.0
    _backed_off: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.size = float(max(1, min(self.cap, self.start)))
        self._round_started = time.monotonic()
        self._record("start")

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return max(1, min(self.cap, int(self.size)))

    def _record(self, why: str) -> None:
        self.history.append((time.monotonic(), self.limit, why))
        log.debug("in-flight window %d (%s)", self.limit, why)

    def _set(self, size: float, why: str) -> None:
        size = max(1.0, min(float(self.cap), size))
        changed = int(size) != self.limit
        self.size = size
        if changed:
            self._record(why)

    def _new_round(self, now: float) -> None:
        self._round_answers = 0
        self._round_started = now
        self._backed_off = False

    def answered(self) -> None:
        """An answer (any that is not an overload) came back."""
        with self._lock:
            self._round_answers += 1
            if self._round_answers < self.limit:
                return
            now = time.monotonic()
            rate = self._round_answers / max(now - self._round_started, 1e-6)
            if rate >= self._best_rate * _NOT_WORSE:
                self._best_rate = max(self._best_rate, rate)
                grow = self.size if self._slow_start else 1.0
                self._set(self.size + grow, "throughput grew")
            else:
                self._slow_start = False
                self._best_rate = rate  # the knee moved, or the load did: measure afresh
                self._set(self.size - 1, "throughput fell")
            self._new_round(now)

    def overloaded(self) -> None:
        """The server refused (429/503) or did not answer in time: halve, once per round."""
        with self._lock:
            self._slow_start = False
            if self._backed_off:
                return
            self._set(self.size / 2, "overloaded")
            self._best_rate = 0.0
            self._new_round(time.monotonic())
            self._backed_off = True
