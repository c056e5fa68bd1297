"""Adaptive in-flight window for served engines: how many requests a process keeps outstanding at
a server, found under the cap `max_in_flight` instead of set, because the knee differs between
machines and a refusing server needs fewer requests, not only retries. Every change is kept in
`history` (and logged). (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_NOT_WORSE = 0.95
"""A round whose throughput is at least this share of the best so far counts as no loss."""
_OVERLOADED = 0.25
"""A round with at least this share of refusals halves the window."""
_MIN_ROUND = 16
"""Replies a round with a refusal has at least: below it one refusal would be a large share of
a small window's round, and a refused tenth would halve a window of 4 as often as it shrinks one
of 40. A round without one stays `size` replies: slow start from 4 must not take 4 rounds."""


@dataclass
class Window:
    cap: int
    start: int = 4
    size: float = 0.0
    history: list[tuple[float, int, str]] = field(default_factory=list)
    """(monotonic time, new size, why) at every change."""
    _slow_start: bool = True
    _round_answers: int = 0
    _round_refusals: int = 0
    _round_started: float = 0.0
    _best_rate: float = 0.0
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
        self._round_refusals = 0
        self._round_started = now

    def answered(self) -> None:
        """An answer (any that is not an overload) came back."""
        with self._lock:
            self._round_answers += 1
            self._maybe_end_round()

    def overloaded(self) -> None:
        """The server refused (429/503) or did not answer in time."""
        with self._lock:
            self._round_refusals += 1
            self._maybe_end_round()

    def _maybe_end_round(self) -> None:
        replies = self._round_answers + self._round_refusals
        if replies < (max(self.limit, _MIN_ROUND) if self._round_refusals else self.limit):
            return
        now = time.monotonic()
        refused = self._round_refusals / replies
        # Replies, not answers, per second: the share refused is judged on its own, and a
        # round with two refusals instead of one must not read as the throughput falling.
        rate = replies / max(now - self._round_started, 1e-6)
        if refused >= _OVERLOADED:
            self._slow_start = False
            self._best_rate = 0.0  # measure afresh once it recovers
            self._set(self.size / 2, "overloaded")
        elif rate >= self._best_rate * _NOT_WORSE:
            self._best_rate = max(self._best_rate, rate)
            shrink = self.size * refused / 2
            if shrink >= 1.0:
                # Refusals this common would outweigh a linear round's growth: from here their
                # share, not the server's load, sets the window (near 2/f), so doubling ends.
                self._slow_start = False
            grow = self.size if self._slow_start else 1.0
            if shrink > grow:
                # A smaller window carries less below the knee: measured against the best of
                # the larger one, the next round would read as a fall and step back again.
                self._best_rate = 0.0
            self._set(self.size + grow - shrink, "refusals" if shrink > grow else "throughput grew")
        else:
            self._slow_start = False
            self._best_rate = rate  # the knee moved, or the load did: measure from here
            self._set(self.size * (1 - refused / 2) - 1, "throughput fell")
        self._new_round(now)
