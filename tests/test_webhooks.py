"""Signed webhooks from the outbox: verified by the `openai` SDK's own `webhooks.unwrap`,
retried until accepted, kept across a dead dispatcher, never sent across tenants."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from sqlalchemy import update

from instruments.processes import BIN, stop, wait_for
from offline_queue.states import BatchStatus, EventType
from offline_queue.store import batches, owners
from offline_queue.store import webhooks as store
from offline_queue.store.db import session
from offline_queue.store.tables import Batch
from offline_queue.webhooks import Dispatcher, new_secret, run_in_thread
from tests.conftest import REPO, cli_env, run_cli
from tests.test_pipeline import line, write
from tests.test_store import make_batch

SDK = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def unwrap(body: bytes, headers: dict[str, str], secret: str) -> tuple[str, str]:
    """The SDK's own check of the signature, then the event's type and data.id."""
    event = SDK.webhooks.unwrap(body, headers, secret=secret).model_dump()
    return event["type"], event["data"]["id"]


@dataclass
class Receiver:
    """A webhook endpoint on loopback: what it was sent, and how many times to answer 500."""

    url: str
    got: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    fail_next: int = 0
    delay: float = 0.0
    """Seconds it takes to answer (a slow endpoint)."""

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b, status in self.got if status == 200]


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[tuple[ThreadingHTTPServer, Receiver]] = []

    def receiver() -> Receiver:
        rec = Receiver("")

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(rec.delay)
                status = 500 if rec.fail_next > 0 else 200
                rec.fail_next -= status == 500
                rec.got.append((dict(self.headers.items()), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        made.append((server, rec))
        return rec

    pool: list[Receiver] = [receiver() for _ in range(2)]
    yield pool
    for server, _ in made:
        server.shutdown()


def deliver_until(db: str, done: object, timeout: float = 30) -> None:
    """Dispatcher rounds until `done()` holds."""

    async def rounds() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            dispatcher = Dispatcher(db)
            deadline = time.monotonic() + timeout
            while not done():  # type: ignore[operator]
                assert time.monotonic() < deadline, "not delivered in time"
                await dispatcher.once(client)
                await asyncio.sleep(0.2)

    asyncio.run(rounds())


def ended_batch(db: str, tmp_path: Path, tenant: str | None, tag: str) -> str:
    (tmp_path / tag).mkdir()
    batch_id = make_batch(db, tmp_path / tag, 2, tag=tag)
    with session(db) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(tenant=tenant))
    batches.set_status(db, batch_id, BatchStatus.COMPLETED)  # what the flow's finalize does
    return batch_id


def test_an_ending_is_signed_and_sent_to_its_tenants_endpoints_only(
    db_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    a, b = receivers
    secret_a, secret_b = new_secret(), new_secret()
    store.add_endpoint(db_url, "acme", a.url, secret_a, list(EventType), 3600)
    store.add_endpoint(db_url, "globex", b.url, secret_b, [EventType.BATCH_FAILED], 3600)
    done = ended_batch(db_url, tmp_path, "acme", "a")
    deliver_until(db_url, lambda: len(a.accepted()) == 1)
    headers, body = a.accepted()[0]
    assert unwrap(body, headers, secret_a) == ("batch.completed", done)
    with pytest.raises(Exception, match="signature"):
        unwrap(body, headers, secret_b)
    # globex's endpoint saw nothing of acme's; its own failure reaches it, and not acme.
    (tmp_path / "g").mkdir()
    failed = make_batch(db_url, tmp_path / "g", 2, tag="g")
    with session(db_url) as s:
        s.execute(update(Batch).where(Batch.id == failed).values(tenant="globex"))
    assert owners.fail_run(db_url, owners.RUN_FAILED, "boom", batch_id=failed) == [failed]
    deliver_until(db_url, lambda: len(b.accepted()) == 1)
    headers, body = b.accepted()[0]
    assert unwrap(body, headers, secret_b) == ("batch.failed", failed)
    time.sleep(0.5)
    assert len(a.got) == 1 and len(b.got) == 1  # once each, nothing across tenants


def test_a_failing_endpoint_gets_it_again_until_it_accepts(
    sqlite_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    a, _ = receivers
    a.fail_next = 2
    secret = new_secret()
    store.add_endpoint(sqlite_url, "acme", a.url, secret, list(EventType), 3600)
    started = time.monotonic()
    ended_batch(sqlite_url, tmp_path, "acme", "a")
    deliver_until(sqlite_url, lambda: len(a.accepted()) == 1, timeout=60)
    took = time.monotonic() - started
    assert [status for _, _, status in a.got] == [500, 500, 200]
    ids = {h["webhook-id"] for h, _, _ in a.got}
    assert len(ids) == 1  # the same event each time: a receiver can deduplicate by it
    (row,) = store.deliveries(sqlite_url)
    assert row.attempts == 3 and row.delivered_at is not None and row.last_error is None
    print(f"delivered on the third attempt {took:.1f} s after the ending")
    time.sleep(1.0)
    deliver_until(sqlite_url, lambda: True)
    assert len(a.got) == 3  # accepted: never sent again


def test_a_dead_dispatchers_lease_ends_and_another_delivers(
    sqlite_url: str, tmp_path: Path, receivers: list[Receiver], prefect_api: str
) -> None:
    """The event waits in the outbox while nobody delivers it; a dispatcher that leased it and
    died (its lease runs out) leaves it to the next one — here a `webhooks deliver` process."""
    a, _ = receivers
    secret = new_secret()
    store.add_endpoint(sqlite_url, None, a.url, secret, list(EventType), 3600)
    ended_batch(sqlite_url, tmp_path, None, "a")
    held = store.claim_due(sqlite_url, "dead-dispatcher", 10, lease_seconds=3)
    assert len(held) == 1
    assert store.claim_due(sqlite_url, "other", 10, lease_seconds=3) == []  # leased: not twice
    deliverer = subprocess.Popen(
        [str(BIN / "offline-queue"), "webhooks", "deliver", "--db", sqlite_url],
        env=cli_env(prefect_api),
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(a.accepted()) == 1, timeout=60)
    finally:
        stop(deliverer)
    headers, body = a.accepted()[0]
    assert unwrap(body, headers, secret)[1] == held[0].data_id


@pytest.mark.vllm  # `offline-queue run` serves the batch
def test_a_run_announces_its_end_and_the_cli_manages_endpoints(
    sqlite_url: str, tmp_path: Path, receivers: list[Receiver], prefect_api: str
) -> None:
    """`webhooks add` prints the id and the secret once; `offline-queue run` delivers its own
    batch's ending before it exits; `list` never shows a secret; `remove` ends deliveries."""
    a, _ = receivers
    env = cli_env(prefect_api)
    added = run_cli("webhooks", "add", "--url", a.url, "--db", sqlite_url, env=env)
    assert added.returncode == 0, added.stderr
    fields = dict(x.split(None, 1) for x in added.stdout.splitlines())
    assert fields["secret"].startswith("whsec_") and fields["id"].startswith("we_")
    listed = run_cli("webhooks", "list", "--json", "--db", sqlite_url, env=env)
    assert fields["id"] in listed.stdout and "whsec_" not in listed.stdout
    path = write(tmp_path / "b.jsonl", [line("w0", max_tokens=4), line("w1", max_tokens=4)])
    ran = run_cli("run", str(path), "--db", sqlite_url, "--json", env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    batch_id = json.loads(ran.stdout.strip().splitlines()[-1])["id"]
    assert len(a.accepted()) == 1
    headers, body = a.accepted()[0]
    assert unwrap(body, headers, fields["secret"]) == ("batch.completed", batch_id)
    assert run_cli("webhooks", "remove", fields["id"], "--db", sqlite_url, env=env).returncode == 0
    assert run_cli("webhooks", "remove", fields["id"], "--db", sqlite_url, env=env).returncode == 1
    bad = run_cli("webhooks", "add", "--url", "ftp://x", "--db", sqlite_url, env=env)
    assert bad.returncode == 2 and "--url" in bad.stderr


def test_a_slow_endpoint_delays_nobody_elses(
    sqlite_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """acme's endpoint takes 6 s to answer; globex's event, raised after acme's, is delivered
    while acme's still waits (a dispatcher's round never waits for a slow endpoint)."""
    slow, fast = receivers
    slow.delay = 6.0
    store.add_endpoint(sqlite_url, "acme", slow.url, new_secret(), list(EventType), 3600)
    store.add_endpoint(sqlite_url, "globex", fast.url, new_secret(), list(EventType), 3600)
    loop, stopping = run_in_thread(sqlite_url)
    try:
        ended_batch(sqlite_url, tmp_path, "acme", "a")
        time.sleep(1.0)  # acme's delivery is on its way, and hangs
        ended_at = time.monotonic()
        ended_batch(sqlite_url, tmp_path, "globex", "g")
        wait_for(lambda: len(fast.accepted()) == 1, timeout=30)
        took = time.monotonic() - ended_at
        assert not slow.got, "acme's endpoint answered already: it was not slow"
        assert took < 3.0, took
        wait_for(lambda: len(slow.accepted()) == 1, timeout=30)
    finally:
        loop.call_soon_threadsafe(stopping.set)
    print(f"globex's event delivered {took:.1f} s after its batch ended, acme's still hanging")
