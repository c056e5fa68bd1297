"""Webhook endpoints and the deliveries of the outbox (store/outbox.py writes them): leased
by a dispatcher while sent, a few per endpoint at a time, so a slow or dead endpoint holds its
own deliveries and nobody else's."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select, update

from offline_queue.states import EventType
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import WebhookDelivery, WebhookEndpoint, WebhookEvent

PER_ENDPOINT = 4
"""Deliveries of one endpoint leased at once: what a slow endpoint can hold up is its own."""
OPEN = and_(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.given_up_at.is_(None))


def add_endpoint(
    db: str,
    tenant: str | None,
    url: str,
    secret: str,
    events: list[EventType],
    retry_seconds: float,
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        id=f"we_{uuid.uuid4().hex}",
        tenant=tenant,
        url=url,
        secret=secret,
        events=",".join(str(e) for e in events),
        retry_seconds=retry_seconds,
        created_at=clock.now_seconds(),
    )
    with session(db) as s:
        s.add(endpoint)
        s.flush()
        s.refresh(endpoint)
    return endpoint


def endpoints(db: str, tenant: str | None = None, every: bool = False) -> list[WebhookEndpoint]:
    """A tenant's endpoints (`every`: all of them)."""
    q = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if not every:
        q = q.where(
            WebhookEndpoint.tenant.is_(None) if tenant is None else WebhookEndpoint.tenant == tenant
        )
    with session(db, readonly=True) as s:
        return list(s.scalars(q))


def remove_endpoint(db: str, endpoint_id: str) -> bool:
    """The endpoint and its undelivered deliveries go; True if it existed."""
    with session(db) as s:
        gone = s.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id, OPEN)
            .values(given_up_at=clock.now(), last_error="endpoint removed")
        )
    return bool(getattr(gone, "rowcount", 0))


@dataclass(frozen=True)
class Due:
    """A leased delivery with what sending it needs."""

    delivery_id: int
    attempts: int
    url: str
    secret: str
    event_id: str
    type: str
    data_id: str
    created_at: int


def claim_due(db: str, owner: str, limit: int, lease_seconds: float) -> list[Due]:
    """Lease up to `limit` due deliveries, at most PER_ENDPOINT of any endpoint counting those
    already leased; the lease is what lets another dispatcher take over from a dead one."""
    with session(db) as s:
        now = clock.now()
        free = or_(WebhookDelivery.lease_expires.is_(None), WebhookDelivery.lease_expires < now)
        busy = (
            select(WebhookDelivery.endpoint_id, func.count().label("n"))
            .where(OPEN, ~free)
            .group_by(WebhookDelivery.endpoint_id)
            .subquery()
        )
        ranked = (
            select(
                WebhookDelivery.id,
                func.row_number()
                .over(
                    partition_by=WebhookDelivery.endpoint_id,
                    order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id),
                )
                .label("k"),
                func.coalesce(busy.c.n, 0).label("held"),
            )
            .outerjoin(busy, busy.c.endpoint_id == WebhookDelivery.endpoint_id)
            .where(OPEN, free, WebhookDelivery.next_attempt_at <= now)
            .subquery()
        )
        ids = list(
            s.scalars(
                select(ranked.c.id).where(ranked.c.k + ranked.c.held <= PER_ENDPOINT).limit(limit)
            )
        )
        if not ids:
            return []
        taken = list(
            s.scalars(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), OPEN, free)
                .values(lease_owner=owner, lease_expires=now + lease_seconds)
                .returning(WebhookDelivery.id)
            )
        )
        rows = s.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.attempts,
                WebhookEndpoint.url,
                WebhookEndpoint.secret,
                WebhookEvent.id,
                WebhookEvent.type,
                WebhookEvent.data_id,
                WebhookEvent.created_at,
            )
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id.in_(taken))
        ).all()
    return [Due(*row) for row in rows]


def delivered(db: str, delivery_id: int, owner: str) -> None:
    with session(db) as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == owner)
            .values(
                delivered_at=clock.now(),
                attempts=WebhookDelivery.attempts + 1,
                lease_owner=None,
                lease_expires=None,
                last_error=None,
            )
        )


def failed(db: str, delivery_id: int, owner: str, error: str, retry_in: float) -> bool:
    """Count the attempt; retry in `retry_in` seconds, or give up once past its endpoint's
    retry time. True if it was given up."""
    with session(db) as s:
        row = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == owner)
            .values(
                attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=clock.now() + retry_in,
                lease_owner=None,
                lease_expires=None,
                last_error=error[:1000],
            )
            .returning(WebhookDelivery.next_attempt_at, WebhookDelivery.give_up_at)
        ).first()
        if row is None or row[0] <= row[1]:
            return False
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(given_up_at=clock.now())
        )
    return True


def unannounced(db: str, limit: int = 100) -> list[WebhookEvent]:
    with session(db, readonly=True) as s:
        return list(
            s.scalars(
                select(WebhookEvent)
                .where(WebhookEvent.announced.is_(False))
                .order_by(WebhookEvent.created_at)
                .limit(limit)
            )
        )


def announced(db: str, event_ids: list[str]) -> None:
    with session(db) as s:
        s.execute(update(WebhookEvent).where(WebhookEvent.id.in_(event_ids)).values(announced=True))


def deliveries(db: str, event_id: str | None = None) -> list[WebhookDelivery]:
    """Every delivery (of one event): what `webhooks list --deliveries` and tests read."""
    q = select(WebhookDelivery).order_by(WebhookDelivery.id)
    if event_id:
        q = q.where(WebhookDelivery.event_id == event_id)
    with session(db, readonly=True) as s:
        return list(s.scalars(q))
