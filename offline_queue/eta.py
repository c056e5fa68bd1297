"""Will a batch make its window? An estimate of when it finishes, from its own throughput so
far and the work that will be served before what is left of it — found out while there is
still time to act (add a node, raise its tier, cancel something), not when it expires.

- A batch that is being served has a rate of its own: the requests its engines answered since
  it went `in_progress`, by the store's clock. That rate already reflects what it shares its
  GPUs with; what can still take them from it is work of more urgent tiers (a loop serves a
  critical batch first), so that is counted ahead of its own remaining requests.
- A batch not served yet has no rate: its tier's recent throughput stands in for one, and the
  batches of its tier created before it are counted ahead too.
- Neither: no estimate yet (nothing of the tier ran in the last few minutes).

The estimate is deliberately simple and errs late: the work of a more urgent tier is counted
at this batch's own rate, where it will in fact get every GPU it asks for. A late estimate
raises one event per batch (flows/waiting.py); an automation decides what to do about it.
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
    """When a batch with `pending` requests left finishes (see the module)."""
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
