"""Will a batch make its window? An estimate of when it finishes, from its own throughput so far
and the work to be served ahead of the rest of it — known while there is still time to act (add
a node, raise its tier, cancel something), not when it expires. Simple, and errs late.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

from dataclasses import dataclass

from offline_queue.store.outlook import Outlook


@dataclass(frozen=True)
class Estimate:
    finish_at: float | None
    """Epoch seconds by the store's clock; None: nothing to estimate from yet."""
    rate: float | None
    """Requests per second the estimate assumes."""
    ahead: int
    """Requests counted before the batch's own."""
    late: bool
    """The estimate passes the batch's `expires_at`."""


def estimate(
    pending: int,
    in_progress_at: int | None,
    expires_at: int | None,
    outlook: Outlook,
) -> Estimate:
    """When a batch with `pending` requests left finishes: its own rate, or its tier's, behind
    the more urgent work (docs/ARCHITECTURE.md, `offline_queue/eta.py`)."""
    now = outlook.now
    if pending == 0:
        return Estimate(now, None, 0, False)
    rate: float | None = None
    ahead = outlook.urgent
    if outlook.served and in_progress_at is not None and now > in_progress_at:
        rate = outlook.served / (now - in_progress_at)
    else:
        ahead += outlook.earlier
        if outlook.tier_requests and outlook.tier_seconds > 0:
            rate = outlook.tier_requests / outlook.tier_seconds
    if not rate:
        return Estimate(None, None, ahead, False)
    finish_at = now + (pending + ahead) / rate
    return Estimate(finish_at, rate, ahead, expires_at is not None and finish_at > expires_at)
