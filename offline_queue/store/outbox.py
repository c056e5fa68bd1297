"""The outbox: an ending is written in the transaction that ends it. Whatever moves a batch to
a terminal status (the flow's finalize, a lost run's reaper, a failed run's hook), the flush
that writes it also writes the event and one delivery per endpoint of the batch's tenant that
wants it — so no restart, on any node, can lose one, and no code path can forget to."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session

from offline_queue.states import BATCH_ENDINGS, RESPONSE_ENDINGS, BatchStatus, EventType
from offline_queue.store import clock
from offline_queue.store.tables import (
    Batch,
    Result,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def record(s: Session, tenant: str | None, type: EventType, data_id: str) -> str:
    """Write one event and its deliveries in `s`'s transaction; returns the event's id."""
    event_id = new_event_id()
    s.add(
        WebhookEvent(
            id=event_id,
            tenant=tenant,
            type=str(type),
            data_id=data_id,
            created_at=clock.now_seconds(),
            announced=False,
        )
    )
    same_tenant = (
        WebhookEndpoint.tenant.is_(None) if tenant is None else WebhookEndpoint.tenant == tenant
    )
    for endpoint in s.scalars(select(WebhookEndpoint).where(same_tenant)):
        if str(type) not in endpoint.events.split(","):
            continue
        s.add(
            WebhookDelivery(
                event_id=event_id,
                endpoint_id=endpoint.id,
                attempts=0,
                next_attempt_at=clock.now(),
                give_up_at=clock.now() + endpoint.retry_seconds,
            )
        )
    return event_id


_ENDINGS = {None: BATCH_ENDINGS, "response": RESPONSE_ENDINGS}
"""By a batch's source: a file's batch, or a single response. A stream's batches are the
queue's bookkeeping: its consumers have the answers, no event says so."""


def _ended(s: Session, batch: Batch) -> EventType | None:
    """The event of a batch this flush moves to a terminal status, if it does."""
    history = inspect(batch).attrs.status.history
    if not history.added:
        return None
    new = history.added[0]
    old = history.deleted[0] if history.deleted else None
    if new == old:
        return None
    endings = _ENDINGS.get(batch.source)
    if endings is None:
        return None
    try:
        kind = endings.get(BatchStatus(new))
    except ValueError:
        return None
    if kind == EventType.RESPONSE_COMPLETED and _cut(s, batch.id):
        return EventType.RESPONSE_INCOMPLETE  # OpenAI's: it stopped at max_output_tokens
    return kind


def _cut(s: Session, response_id: str) -> bool:
    """Whether a single response's answer is OpenAI's `incomplete` (cut at max_output_tokens)."""
    body = s.scalar(select(Result.body).where(Result.batch_id == response_id))
    if not body:
        return False
    try:
        return orjson.loads(body).get("status") == "incomplete"
    except (orjson.JSONDecodeError, AttributeError):
        return False


@event.listens_for(Session, "before_flush")
def _batch_endings(s: Session, _context: Any, _instances: Any) -> None:
    with s.no_autoflush:
        ended = [
            (batch, kind)
            for batch in list(s.dirty) + list(s.new)
            if isinstance(batch, Batch) and (kind := _ended(s, batch)) is not None
        ]
        for batch, kind in ended:
            record(s, batch.tenant, kind, batch.id)
