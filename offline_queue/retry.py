"""Exponential backoff with jitter: one rule for every retry we make (requests in the store,
requests to a server), so they spread out the same way after a shared fault."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 1.0
    """The first retry waits about this long; each later one twice as long as the one before."""
    cap_seconds: float = 60.0
    """No single wait is longer; keeps a long outage from parking requests for hours."""

    def delay(self, attempts: int) -> float:
        """Seconds to wait after `attempts` tries (±50 % jitter, so retries do not align).

        The jitter window is cut at the cap rather than the jittered wait clamped to it: waits
        past the cap stay spread over [cap/2, cap] instead of piling up at exactly the cap."""
        raw = min(self.cap_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return random.uniform(0.5 * raw, min(1.5 * raw, self.cap_seconds))
