"""The states a batch and a request go through, and the priority tiers: defined once. String
enums, so the store's columns, the wire formats and the command line keep the plain words while
the code names each state; a member equals its word, so a row read back compares equal. A
request's path through them is in docs/ARCHITECTURE.md (Why the parts are as they are).
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """OpenAI's batch statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Nothing will change any more: the files are final."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class RequestState(StrEnum):
    """Where one accepted line is in the queue."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    TERMINATED = "terminated"


LIVE_STATES = (RequestState.QUEUED, RequestState.PROCESSING)
"""A request a worker may still have to serve."""
SETTLED_STATES = (RequestState.COMPLETED, RequestState.TERMINATED)
"""A request whose one result row is written."""


class Tier(StrEnum):
    """How urgent a batch is. A serving loop claims the most urgent tier's work first (strict),
    and the engine schedules its requests first (vLLM's priority); across runs, each tier is a
    work queue whose priority the cluster file sets (deployments/pools.yaml), in the same order."""

    CRITICAL = "critical"
    STANDARD = "standard"
    BULK = "bulk"

    @property
    def rank(self) -> int:
        """1 for the most urgent: the order of claims and of the work queues."""
        return _RANK[self]


_RANK = {Tier.CRITICAL: 1, Tier.STANDARD: 2, Tier.BULK: 3}


MAX_WEIGHT = 1000
"""The largest weight a batch can carry (the API refuses more): a weight is a batch's share of
its tier between a handful of batches, not a count."""


class EventType(StrEnum):
    """What a webhook (and a Prefect event) says ended: OpenAI's event types."""

    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_CANCELLED = "batch.cancelled"
    BATCH_EXPIRED = "batch.expired"
    RESPONSE_COMPLETED = "response.completed"
    RESPONSE_FAILED = "response.failed"
    RESPONSE_CANCELLED = "response.cancelled"
    RESPONSE_INCOMPLETE = "response.incomplete"


BATCH_ENDINGS = {
    BatchStatus.COMPLETED: EventType.BATCH_COMPLETED,
    BatchStatus.FAILED: EventType.BATCH_FAILED,
    BatchStatus.CANCELLED: EventType.BATCH_CANCELLED,
    BatchStatus.EXPIRED: EventType.BATCH_EXPIRED,
}
"""The event each terminal batch status raises."""

RESPONSE_ENDINGS = {
    BatchStatus.COMPLETED: EventType.RESPONSE_COMPLETED,
    BatchStatus.FAILED: EventType.RESPONSE_FAILED,
    BatchStatus.CANCELLED: EventType.RESPONSE_CANCELLED,
    BatchStatus.EXPIRED: EventType.RESPONSE_INCOMPLETE,
}
"""The event each terminal status of a single response raises."""

SERVICE_TIERS = {
    "priority": Tier.CRITICAL,
    "default": Tier.STANDARD,
    "auto": Tier.STANDARD,
    "flex": Tier.BULK,
}
"""OpenAI's `service_tier` of a single request, as the queue's tier."""
