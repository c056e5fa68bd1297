"""Signed webhooks: OpenAI's event payloads, signed as Standard Webhooks sign them (what the
`openai` SDK's `client.webhooks.unwrap` verifies), delivered at least once from the outbox
(store/outbox.py) by a dispatcher any process may run, each delivery leased while it is sent.
Retries, and the Prefect event raised beside each: docs/user-guide.md, Webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import time

import httpx
import orjson

from offline_queue.retry import RetryPolicy
from offline_queue.store import webhooks as store

log = logging.getLogger(__name__)

RETRIES = RetryPolicy(base_seconds=2.0, cap_seconds=3600.0)
DEFAULT_RETRY_SECONDS = 24 * 3600.0
TIMEOUT_SECONDS = 10.0
"""One attempt's wait for an answer: a slow endpoint costs its own lease, not a dispatcher."""
LEASE_SECONDS = 60.0
POLL_SECONDS = 0.5


def new_secret() -> str:
    """A signing secret as OpenAI and Standard Webhooks write it: `whsec_` + base64 of 32 bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        "content-type": "application/json",
    }


def payload(due: store.Due) -> bytes:
    """OpenAI's event object: id, object, type, created_at, data.id."""
    event = {
        "id": due.event_id,
        "object": "event",
        "type": due.type,
        "created_at": due.created_at,
        "data": {"id": due.data_id},
    }
    return orjson.dumps(event)


class Dispatcher:
    """Delivers what is due, concurrently, until stopped; `once()` is one round."""

    def __init__(self, db: str, batch: int = 64):
        self.db = db
        self.batch = batch
        self.owner = f"webhooks:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"

    async def once(self, client: httpx.AsyncClient) -> int:
        """Lease what is due, send it all at once, settle each; returns how many were sent."""
        due = await self._lease(self.batch)
        await asyncio.gather(*(self._send(client, d) for d in due))
        await asyncio.to_thread(announce, self.db)
        return len(due)

    async def _lease(self, room: int) -> list[store.Due]:
        """Up to `room` due deliveries, leased to this dispatcher."""
        if room <= 0:
            return []
        return await asyncio.to_thread(store.claim_due, self.db, self.owner, room, LEASE_SECONDS)

    async def _send(self, client: httpx.AsyncClient, due: store.Due) -> None:
        body = payload(due)
        headers = signed_headers(due.secret, due.event_id, int(time.time()), body)
        try:
            answer = await client.post(due.url, content=body, headers=headers)
            error = None if answer.is_success else f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            await asyncio.to_thread(store.delivered, self.db, due.delivery_id, self.owner)
            return
        wait = RETRIES.delay(due.attempts + 1)
        gave_up = await asyncio.to_thread(
            store.failed, self.db, due.delivery_id, self.owner, error, wait
        )
        log.log(
            logging.WARNING if gave_up else logging.INFO,
            "webhook %s to %s: %s (%s)",
            due.event_id,
            due.url,
            error,
            "given up" if gave_up else f"again in {wait:.0f} s",
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Until `stop` is set: every POLL_SECONDS, lease what is due and send each on a task
        of its own — a round never waits for a slow endpoint, whose deliveries hold only their
        own leases (PER_ENDPOINT of them at most)."""
        stop = stop or asyncio.Event()
        sending: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:
            while not stop.is_set():
                try:
                    for d in await self._lease(self.batch - len(sending)):
                        task = asyncio.create_task(self._send(client, d))
                        sending.add(task)
                        task.add_done_callback(sending.discard)
                    await asyncio.to_thread(announce, self.db)
                except Exception as exc:  # the store may be restarting: look again next time
                    log.warning("webhook round failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            await asyncio.gather(*sending, return_exceptions=True)


def announce(db: str) -> None:
    """Each recorded event once as a Prefect event (where a Prefect API is configured)."""
    events = store.unannounced(db)
    if not events:
        return
    from prefect.events import emit_event

    for e in events:
        with contextlib.suppress(Exception):  # no Prefect server: the webhook still goes
            emit_event(
                event=f"offline-queue.{e.type}",
                resource={
                    "prefect.resource.id": f"offline-queue.{e.type.split('.')[0]}.{e.data_id}",
                    "prefect.resource.name": e.data_id,
                    "offline-queue.tenant": e.tenant or "",
                },
                payload={"event_id": e.id, "created_at": e.created_at},
            )
    store.announced(db, [e.id for e in events])


def run_in_thread(db: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
    """A dispatcher on a daemon thread of its own (a node's process, `offline-queue run`)."""
    import threading

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(Dispatcher(db).run(stop))

    threading.Thread(target=main, name="webhooks", daemon=True).start()
    return loop, stop
